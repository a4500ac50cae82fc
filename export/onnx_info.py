"""What an ONNX file declares, read without its weights and without torch: the signature written
into the manifest, and the external-data files a graph needs. Shared by export and quantize."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

# Protobuf cannot hold a model over 2 GB; leave margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4",
}


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs in `node`'s attributes (If branches, Loop / Scan bodies)."""
    return [g for attr in node.attribute
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)]


def outer_inputs(node: onnx.NodeProto) -> set[str]:
    """Every value `node` reads, its subgraphs' outer-scope reads included."""
    names = set(node.input)
    for sub in subgraphs(node):
        produced = {o for n in sub.node for o in n.output}
        names |= {i for n in sub.node for i in outer_inputs(n)} - produced
    return names


def all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every initializer, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_initializers(sub)


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


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer's data (computed from dims and dtype: works for external data too)."""
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    bits = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
            onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.INT64: 64, onnx.TensorProto.INT32: 32,
            onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.BOOL: 8,
            onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT16: 16,
            onnx.TensorProto.UINT16: 16}.get(t.data_type, 32)
    return (n * bits + 7) // 8


def save_model(model: onnx.ModelProto, dst: Path | str) -> list[Path]:
    """Save `model` at `dst`; external data in `<dst>.data` past the 2 GB limit. Returns its files."""
    dst = Path(dst)
    if sum(tensor_nbytes(t) for t in all_initializers(model.graph)) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    return onnx_files(dst)
