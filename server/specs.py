"""Tensor specs of the served models, from the manifest (component graphs) or fixed (glm_image).

Shared by the gRPC server and the Triton repository writer, so that both describe a model the same
way: Triton's rule applies, a model batches (max_batch_size > 0, dims without the batch axis) only
when every input and output starts with the manifest's `batch` axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from glm_image_onnx.manifest import Graph
from glm_image_onnx.server import errors
from glm_image_onnx.server.tensors import datatype_of


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe datatype
    shape: tuple  # ints, or names for dynamic axes (the manifest's symbolic shapes)
    optional: bool = False

    def dims(self) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in self.shape]


def graph_specs(graph: Graph) -> tuple[list[TensorSpec], list[TensorSpec], bool]:
    """(inputs, outputs, batchable) of one manifest graph entry."""
    inputs = [TensorSpec(t.name, datatype_of(t.dtype), tuple(t.shape)) for t in graph.inputs]
    outputs = [TensorSpec(t.name, datatype_of(t.dtype), tuple(t.shape)) for t in graph.outputs]
    batchable = all(s.shape and s.shape[0] == "batch" for s in inputs + outputs)
    return inputs, outputs, batchable


def select_outputs(model: str, outputs: list[TensorSpec], requested: list[str]) -> list[str]:
    """The outputs a request asks for (none: all), each checked to be one of the model's."""
    known = [s.name for s in outputs]
    for name in requested:
        if name not in known:
            raise errors.invalid(f"requested output '{name}' is not an output of {model} "
                                 f"(outputs: {', '.join(known)})")
    return list(dict.fromkeys(requested)) or known
