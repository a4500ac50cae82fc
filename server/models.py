"""Served models: the common interface, and one plain model per ONNX graph of the package.

A model turns decoded input tensors into a validated request (`prepare`, cheap, on the event loop,
raising INVALID_ARGUMENT that names the field), runs it off the event loop (`submit`) and describes
itself as KServe metadata and a Triton `ModelConfig`. Names are the package's graph names
(`ar_planner`, `dit_decoder`, ...), the same in the manifest, the server and the metrics.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from glm_image_onnx.manifest import Graph
from glm_image_onnx.runtime.ar import Progress
from glm_image_onnx.server.envelope import InputBound
from glm_image_onnx.server import errors
from glm_image_onnx.server.admission import Admission
from glm_image_onnx.server.batching import DynamicBatcher
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.limits import ComponentLimits, to_parameters
from glm_image_onnx.server.memory import Cost, rows_and_size
from glm_image_onnx.server.result import Result
from glm_image_onnx.server.specs import TensorSpec, graph_specs, select_outputs
from glm_image_onnx.server.stats import ModelStats
from glm_image_onnx.server.tensors import CONFIG_TYPE, datatype_of

VERSION = "1"


@dataclass
class Decoded:
    """A request as its front end read it off the wire: tensors and parameters, or (a front end
    that speaks the model's own request type, as the OpenAI API does glm_image's) the typed request."""

    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # requested output names (none: all)
    request: Any = None


@dataclass
class Prepared:
    """A validated request, ready to run: a component's input tensors, or glm_image's typed request."""

    inputs: dict[str, Any]
    outputs: list[str]
    rows: int = 1
    request: Any = None
    memory: int = 0  # its estimated peak bytes (server.memory), reserved while it is in flight


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 8  # rows per execution; 1 disables dynamic batching
    max_queue_delay_us: int = 0


class Model:
    name: str
    platform = ""
    backend = ""
    max_batch_size = 0
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_batching: BatchingOptions | None = None
    instance_kind = "KIND_CPU"

    def __init__(self) -> None:
        self.stats = ModelStats()
        self.ready = True
        self.cost: Cost | None = None  # peak bytes in a request's size, measured at load (server.memory)

    # ----------------------------------------------------------------------------- description
    def _shape(self, spec: TensorSpec) -> list[int]:
        dims = spec.dims()
        return [-1] + dims[1:] if self.max_batch_size > 0 else dims

    def _tensor(self, spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": spec.datatype, "shape": self._shape(spec)}

    def metadata(self) -> dict[str, Any]:
        """KServe's model metadata, as plain data (`dataplane` says why)."""
        return {"name": self.name, "versions": [VERSION], "platform": self.platform,
                "inputs": [self._tensor(s) for s in self.inputs], "outputs": [self._tensor(s) for s in self.outputs]}

    def _config_tensor(self, spec: TensorSpec) -> dict[str, Any]:
        dims = spec.dims()[1:] if self.max_batch_size > 0 else spec.dims()
        return {"name": spec.name, "data_type": CONFIG_TYPE[spec.datatype], "dims": dims}

    def parameters(self) -> dict[str, str]:
        """The model config's `parameters` (string values), for a subclass to extend."""
        return {}

    def config(self) -> dict[str, Any]:
        """Triton's `ModelConfig`, as plain data."""
        cfg: dict[str, Any] = {
            "name": self.name, "platform": self.platform, "backend": self.backend,
            "max_batch_size": self.max_batch_size,
            "input": [{**self._config_tensor(s), "optional": s.optional} for s in self.inputs],
            "output": [self._config_tensor(s) for s in self.outputs],
            "instance_group": [{"name": self.name, "count": 1, "kind": self.instance_kind}],
            "version_policy": {"latest": {"num_versions": 1}},
            "parameters": {k: {"string_value": v} for k, v in self.parameters().items()},
        }
        if self.dynamic_batching is not None:
            cfg["dynamic_batching"] = {"max_queue_delay_microseconds": self.dynamic_batching.max_queue_delay_us}
        return cfg

    def output_names(self, requested: list[str]) -> list[str]:
        return select_outputs(self.name, self.outputs, requested)

    # ------------------------------------------------------------------------------- execution
    def prepare(self, decoded: Decoded) -> Prepared:
        """Validate (INVALID_ARGUMENT naming the field); cheap, on the event loop."""
        raise NotImplementedError

    def submit(self, prepared: Prepared, ctx: RequestContext, admission: Admission,
               progress: Progress | None = None) -> Future:
        """Start the work off the event loop; `finish` turns the future's value into a `Result`."""
        raise NotImplementedError

    def finish(self, prepared: Prepared, value: Any) -> Result:
        return value

    def close(self) -> None:
        pass


def _ort_error(name: str, e: Exception) -> errors.RequestError:
    kind = type(e).__name__
    message = str(e).split("\n")[0]
    if kind in ("InvalidArgument", "InvalidGraph"):
        return errors.invalid(f"{name}: onnxruntime rejected the inputs: {message}")
    return errors.internal(f"{name}: onnxruntime failed ({kind}): {message}")


class ComponentModel(Model):
    """One ONNX graph of the package, run as is by an onnxruntime session (shared with the pipeline)."""

    platform = "onnxruntime_onnx"
    backend = "onnxruntime"

    def __init__(self, name: str, graph: Graph, session: ort.InferenceSession,
                 batching: BatchingOptions = BatchingOptions(),
                 on_execution: Callable[[str, int, float], None] | None = None,
                 limits: ComponentLimits = ComponentLimits(), bounds: dict[str, InputBound] | None = None):
        super().__init__()
        self.name = name
        self.limits = limits
        self.bounds = bounds or {}  # the largest inputs glm_image's pipeline sends (server.envelope)
        self.session = session
        self.description = graph.description
        self.quantization = (graph.quantization or {}).get("recipe", "none")
        self.inputs, self.outputs, self.batchable = graph_specs(graph)
        self.instance_kind = "KIND_CPU" if session.get_providers()[0] == "CPUExecutionProvider" else "KIND_GPU"
        self.batcher: DynamicBatcher | None = None
        if self.batchable:
            self.max_batch_size = max(1, batching.max_batch_size)
            if self.max_batch_size > 1:
                self.dynamic_batching = batching

                def executed(rows: int, seconds: float) -> None:
                    self.stats.execution_done(rows, seconds)
                    if on_execution:
                        on_execution(name, rows, seconds)

                self.batcher = DynamicBatcher(name, self._run, self.max_batch_size,
                                              batching.max_queue_delay_us / 1e6, executed)
        self._on_execution = on_execution

    def prepare(self, decoded: Decoded) -> Prepared:
        inputs = decoded.inputs
        specs = {s.name: s for s in self.inputs}
        for name in inputs:
            if name not in specs:
                raise errors.invalid(f"unknown input '{name}' for {self.name} (inputs: {', '.join(specs)})")
        sizes: dict[str, tuple[int, str]] = {}  # symbolic axis -> (size, the input that set it)
        for spec in self.inputs:
            if spec.name not in inputs:
                raise errors.invalid(f"input '{spec.name}' is missing ({self.name} needs {', '.join(specs)})")
            array = inputs[spec.name]
            if array.size > self.limits.max_tensor_elements:
                raise errors.invalid(f"input '{spec.name}': {array.size} elements, more than this server's limit "
                                     f"of {self.limits.max_tensor_elements}")
            got = datatype_of(array.dtype)
            if got != spec.datatype:
                raise errors.invalid(f"input '{spec.name}' must be {spec.datatype}, got {got}")
            if array.ndim != len(spec.shape):
                raise errors.invalid(f"input '{spec.name}' must have {len(spec.shape)} dimensions "
                                     f"{list(spec.dims())}, got shape {list(array.shape)}")
            for axis, (want, size) in enumerate(zip(spec.shape, array.shape)):
                if isinstance(want, int):
                    if size != want:
                        raise errors.invalid(f"input '{spec.name}': dimension {axis} must be {want}, "
                                             f"got shape {list(array.shape)}")
                elif want != "batch" and size > self.limits.max_axis_size:
                    raise errors.invalid(f"input '{spec.name}': dimension {axis} ('{want}') is {size}, more than "
                                         f"this server's limit of {self.limits.max_axis_size}")
                elif want in sizes and sizes[want][0] != size:
                    first, other = sizes[want]
                    raise errors.invalid(f"input '{spec.name}': dimension {axis} ('{want}') is {size} but input "
                                         f"'{other}' has {first}")
                else:
                    sizes.setdefault(want, (size, spec.name))
        for name, bound in self.bounds.items():
            error = bound.error(name, inputs[name].shape)
            if error:
                raise errors.invalid(f"{self.name}: {error}")
        rows = int(sizes.get("batch", (1, ""))[0]) if self.batchable else 1
        if self.max_batch_size > 0 and not 1 <= rows <= self.max_batch_size:
            raise errors.invalid(f"{self.name}: batch size {rows} is outside 1..{self.max_batch_size} (max_batch_size)")
        prepared = Prepared(dict(inputs), self.output_names(decoded.outputs), rows)
        if self.cost is not None:
            per, n = rows_and_size(self.name, inputs, self.batchable)
            prepared.memory = self.cost(n) * per + sum(a.nbytes for a in inputs.values())  # measured without them
        return prepared

    def _run(self, feeds: dict[str, np.ndarray], outputs: list[str],
             run_options: ort.RunOptions | None = None) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(outputs, feeds, run_options)
        except Exception as e:
            raise _ort_error(self.name, e) from None
        return dict(zip(outputs, values))

    def parameters(self) -> dict[str, str]:
        specs = {s.name: s for s in self.inputs}
        shapes = {f"max_shape.{name}": json.dumps([self._most(d, want) for d, want in zip(b.shape, specs[name].shape)])
                  for name, b in self.bounds.items()}
        return {**to_parameters(self.limits), "quantization": self.quantization, **shapes}

    def _most(self, bound: int | None, want: int | str) -> int:
        """An axis' largest accepted size for the model config: the envelope's bound, at most
        --max-axis-size (which alone bounds the axes the envelope leaves open); -1 for the batch axis."""
        if isinstance(want, int):
            return want
        if want == "batch":
            return -1
        return min(bound or self.limits.max_axis_size, self.limits.max_axis_size)

    def finish(self, prepared: Prepared, value: dict[str, np.ndarray]) -> Result:
        specs = {s.name: s for s in self.outputs}
        return Result([(n, value[n], specs[n].datatype) for n in prepared.outputs])

    def submit(self, prepared: Prepared, ctx: RequestContext, admission: Admission,
               progress: Progress | None = None) -> Future:
        if self.batcher is not None:
            return self.batcher.submit(ctx, prepared.inputs, prepared.outputs)

        def work() -> dict[str, np.ndarray]:
            options = ort.RunOptions()
            ctx.on_cancel(lambda: setattr(options, "terminate", True))  # onnxruntime stops mid-graph
            t0 = time.perf_counter()
            try:
                values = self._run(prepared.inputs, prepared.outputs, options)
            except errors.RequestError:
                ctx.check()  # a terminated run reports the cancellation, not onnxruntime's error
                raise
            seconds = time.perf_counter() - t0
            self.stats.execution_done(prepared.rows, seconds)
            if self._on_execution:
                self._on_execution(self.name, prepared.rows, seconds)
            return values

        return admission.run(ctx, work)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
