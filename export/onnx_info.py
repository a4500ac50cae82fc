"""What an ONNX file declares, read without its weights and without torch: the signature written
into the manifest, and the external-data files a graph needs. Shared by export and quantize."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import onnx

DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4",
}


def all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every initializer, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_initializers(g)


def onnx_files(path: Path | str) -> list[Path]:
    """The graph file and its external-data files, if any."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in all_initializers(model.graph)
                 for entry in tensor.external_data if entry.key == "location"}
    return [path] + [path.parent / loc for loc in sorted(locations)]


def signature(path: Path | str) -> dict[str, Any]:
    """Inputs and outputs of a graph: names, dtypes and symbolic shapes (str = dynamic axis), opset."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                    for d in t.shape.dim]
            out.append({"name": v.name, "dtype": DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output),
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}
