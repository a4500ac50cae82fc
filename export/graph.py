"""One exported graph: its torch wrapper, how it is exported, and how it is checked.

Every component module in `export/` returns `GraphSpec`s; this module turns a spec into an ONNX
file (dynamo exporter, external data past protobuf's 2 GB limit) and compares onnxruntime against
PyTorch on fresh inputs at several shapes.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch

from glm_image_onnx.export.onnx_info import EXTERNAL_DATA_THRESHOLD, all_initializers, onnx_files, signature  # noqa: F401 (re-exported)

OPSET = 18
# `--verify` fails an export whose relative error exceeds this.
MAX_RELATIVE_ERROR = 1e-4
# A half-precision graph is compared with the same fp32 PyTorch module: fp16 weights and
# activations keep ~3 decimal digits, so the bound is that of the dtype. Measured on tiny and bench:
# float outputs at worst 1.3e-2 (the glyph encoder), and 1.7% of the vision tokenizer's codebook
# ids flip between near-equal distances (for integer outputs the error is the share that differs).
MAX_RELATIVE_ERROR_BY_DTYPE = {"fp16": 5e-2}
# Dtypes whose graphs the CPU cannot run (onnxruntime's CPU EP has no bfloat16 MatMul, Conv, ...).
UNVERIFIED_DTYPES = {"bf16": "no bfloat16 MatMul/Conv on onnxruntime's CPU; scripts/check_cuda.sh compares on a GPU"}


@dataclass
class GraphSpec:
    """An export-friendly module plus everything needed to export and verify it.

    `example_inputs` is ordered like `module.forward`'s parameters (its keys are the ONNX input
    names); `dynamic_shapes` is keyed by `forward`'s parameter names (a *varargs parameter takes a
    tuple, one entry per tensor), each {axis: torch.export.Dim, Dim.AUTO or an axis name}; `verify_inputs(generator)` returns fresh random
    inputs at several shapes, not only the export shape. `config` is copied into the manifest
    entry (what the runtime needs to drive this graph, e.g. layer count, name templates).
    """

    name: str
    module: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    dynamic_shapes: dict[str, Any]
    output_names: list[str]
    verify_inputs: Callable[[torch.Generator], list[dict[str, torch.Tensor]]]
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    # torch op -> onnxscript function, for ops the exporter should emit as something else (the AR
    # planner's attention becomes onnxruntime's GroupQueryAttention).
    custom_translation_table: dict[Any, Callable[..., Any]] = field(default_factory=dict)
    custom_schemas: list[Any] = field(default_factory=list)  # onnx.defs.OpSchema of the ops it emits
    # output name -> input name bound to the same buffer when verifying: graphs that update a
    # cache in place are checked the way the runtime calls them.
    shared_buffers: dict[str, str] = field(default_factory=dict)
    # Run onnxscript's onnxruntime fusions (`optimize_for_ort`) on the exported graph. onnxruntime's
    # own optimiser misses the dynamo graphs' tanh-GELU and attention patterns; fused, the DiT
    # gets FastGelu and MultiHeadAttention nodes (about -8% per step in fp32, -12% in int8).
    ort_fusions: bool = False
    # The mask input whose all-real case lets a cpu package's biased attention take onnxruntime's
    # flash kernel (export.attention.flash_when_unmasked).
    flash_mask_input: str | None = None


@contextlib.contextmanager
def _registered(schemas: list[Any]) -> Iterator[None]:
    """Register op schemas with onnx for the duration of an export only."""
    # onnx.reference indexes every schema by bare op name when first imported; a contrib op that
    # shares a name with a standard one (RotaryEmbedding) would make that import fail mid-export.
    import onnx.reference  # noqa: F401

    added = []
    try:
        for schema in schemas:
            if not onnx.defs.has(schema.name, schema.domain):
                onnx.defs.register_schema(schema)
                added.append(schema)
        yield
    finally:
        for schema in added:
            onnx.defs.deregister_schema(schema.name, schema.since_version, schema.domain)


@contextlib.contextmanager
def _rare_gc() -> Iterator[None]:
    """Tracing allocates millions of objects (FX nodes, fake tensors, sympy expressions) that live
    until the export ends; at the default thresholds the collector re-scans them over and over
    (~5% of the export time). Garbage cycles wait a little longer instead."""
    old = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*old)


def _layer_norm(x: Any, normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5,
                cudnn_enable: bool = True) -> Any:
    """aten.layer_norm in basic ops: (x - mean) / sqrt(var + eps) * w + b. The variance is a Pow,
    which (with the ReduceMeans, the eps Add and the Sqrt) a half-precision conversion keeps fp32."""
    from onnxscript import opset18 as op

    axes = op.Constant(value_ints=[-(i + 1) for i in range(len(normalized_shape))])
    centred = op.Sub(x, op.ReduceMean(x, axes, keepdims=1))
    variance = op.ReduceMean(op.Pow(centred, op.CastLike(2.0, x)), axes, keepdims=1)
    y = op.Div(centred, op.Sqrt(op.Add(variance, op.CastLike(eps, x))))
    if weight is not None:
        y = op.Mul(y, weight)
    if bias is not None:
        y = op.Add(y, bias)
    return y


def basic_translations() -> dict[Any, Callable[..., Any]]:
    """torch ops the exporter would emit as something outside CANN graph mode's whitelist, emitted
    as basic ai.onnx ops instead (LayerNormalization: no CANN kernel). Attention, rotary and GELU
    already export as basic ops; what their wrappers do differently for such targets is in models/."""
    return {torch.ops.aten.layer_norm.default: _layer_norm}


def export_onnx(spec: GraphSpec, path: Path, opset: int = OPSET, basic_ops: bool = False) -> dict[str, int]:
    """Export `spec` to `path`; weights go to `<path>.data` when the model is too big for protobuf.
    Returns the onnxruntime fusions applied (`spec.ort_fusions`), by name: {} when none ran.
    `basic_ops` (targets.Target.static_shapes): only ai.onnx ops, no onnxruntime fusions."""
    path = Path(path)
    args = tuple(spec.example_inputs.values())
    translations = {**(basic_translations() if basic_ops else {}), **spec.custom_translation_table}
    with torch.no_grad(), _registered(spec.custom_schemas), _rare_gc():
        program = torch.onnx.export(
            spec.module,
            args,
            input_names=list(spec.example_inputs),
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            custom_translation_table=translations or None,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    fusions: dict[str, int] = {}
    if spec.ort_fusions and not basic_ops:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        _, counts = optimize_for_ort(program.model)  # rewrites the IR model in place
        fusions = {name: n for name, n in counts.items() if n}
    weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in spec.module.buffers())
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    program.save(str(path), external_data=external)
    del program
    gc.collect()
    return fusions


def _errors(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    if ref.shape != got.shape:
        raise AssertionError(f"shape {got.shape} != PyTorch's {ref.shape}")
    if ref.dtype.kind in "iub":
        mismatch = float(np.mean(ref != got)) if ref.size else 0.0
        return {"max_abs": float(np.max(np.abs(ref.astype(np.int64) - got.astype(np.int64)), initial=0)),
                "max_rel": mismatch}
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    max_abs = float(np.max(np.abs(ref64 - got64), initial=0.0))
    scale = float(np.max(np.abs(ref64), initial=0.0))
    # Relative to the output's own scale: elementwise ratios blow up where the reference crosses 0.
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}


def _run(session: Any, spec: GraphSpec, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    if not spec.shared_buffers:
        return session.run(spec.output_names, feed)
    # In-place outputs: bind each to a private copy of its input, as the runtime binds one buffer.
    feed = {k: np.array(v, copy=True) for k, v in feed.items()}
    io = session.io_binding()
    for name, value in feed.items():
        io.bind_cpu_input(name, value)
    for name in spec.output_names:  # bound in output order, so the copies come back in it
        if name in spec.shared_buffers:
            buf = feed[spec.shared_buffers[name]]
            io.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        else:
            io.bind_output(name, "cpu")
    session.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()


def verify(spec: GraphSpec, path: Path, seed: int = 0, providers: tuple[str, ...] = ("CPUExecutionProvider",),
           limit: float = MAX_RELATIVE_ERROR) -> dict[str, Any]:
    """Run the graph in onnxruntime against PyTorch on `spec.verify_inputs`; worst error per output."""
    cases = spec.verify_inputs(torch.Generator().manual_seed(seed))
    return compare(spec, cases, run_onnx(spec, path, cases, providers), limit)


def run_onnx(spec: GraphSpec, path: Path, cases: list[dict[str, torch.Tensor]],
             providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> list[list[np.ndarray]]:
    """onnxruntime's outputs of the graph at `path` for each of `cases` (the session is closed after:
    `compare` may then load the PyTorch model without both being in memory at once)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()  # parallel export workers share the cores
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    from glm_image_onnx.runtime.providers import input_types

    feed_types = input_types(session)  # the graph's own dtypes: a half-precision graph takes its cache in fp16
    outputs = []
    for inputs in cases:
        feed = {k: v.numpy().astype(feed_types[k], copy=False) for k, v in inputs.items() if k in feed_types}
        outputs.append(_run(session, spec, feed))
    del session
    return outputs


def compare(spec: GraphSpec, cases: list[dict[str, torch.Tensor]], outputs: list[list[np.ndarray]],
            limit: float = MAX_RELATIVE_ERROR) -> dict[str, Any]:
    """`spec.module` (PyTorch) on `cases` against the graph's `outputs` (run_onnx); worst error per output.

    Passes only when every output in `spec.output_names` was compared on every case: no cases, a
    result count other than the case count, or a case where PyTorch or onnxruntime returned another
    number of outputs than `spec.output_names` is a failure, stated in `problems` (never a pass
    over whatever `zip` happened to pair up)."""
    worst: dict[str, dict[str, float]] = {}
    shapes = []
    problems = []
    if not cases:
        problems.append("no verification cases")
    if not spec.output_names:
        problems.append("no output names to compare")
    if len(outputs) != len(cases):
        problems.append(f"{len(outputs)} onnxruntime results for {len(cases)} cases")
    for i, (inputs, got) in enumerate(zip(cases, outputs)):
        with torch.no_grad():
            ref = spec.module(*inputs.values())
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        shapes.append({k: list(v.shape) for k, v in inputs.items()})
        if not len(ref) == len(got) == len(spec.output_names):
            problems.append(f"case {i}: PyTorch returned {len(ref)} outputs and onnxruntime {len(got)}, "
                            f"expected {len(spec.output_names)} ({', '.join(spec.output_names)})")
        for name, r, g in zip(spec.output_names, ref, got):
            e = _errors(r.detach().numpy(), g)
            w = worst.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0})
            w["max_abs"] = max(w["max_abs"], e["max_abs"])
            w["max_rel"] = max(w["max_rel"], e["max_rel"])
    result = {"cases": len(cases), "input_shapes": shapes, "outputs": worst,
              "max_rel": max((w["max_rel"] for w in worst.values()), default=0.0),
              "limit": limit, "passed": not problems and all(w["max_rel"] <= limit for w in worst.values())}
    if problems:
        result["problems"] = problems
    return result


def share_external_data(paths: list[Path], data_name: str, min_bytes: int = 1024, align: int = 4096) -> Path:
    """Rewrite graphs of one component so that identical weights are stored once, in `data_name`.

    The DiT's decoder and condition-write graphs carry the same 7B weights; exported alone each
    would hold its own copy. Tensors are matched by content (dtype, shape, bytes), so whatever the
    exporter named or folded differently simply gets its own slot. Offsets are page aligned so
    that onnxruntime can map the file.
    """
    from glm_image_onnx.export.precision import external_bytes, set_external

    folder = Path(paths[0]).parent
    data_path = folder / data_name
    tmp_path = data_path.with_name(data_path.name + ".tmp")
    slots: dict[tuple[int, tuple[int, ...], str], tuple[int, int]] = {}
    old_files: set[Path] = set()
    with open(tmp_path, "wb") as f:
        for path in paths:
            old_files.update(p for p in onnx_files(path)[1:])
            # Without its external data: tensors are read one at a time (memory stays one tensor).
            model = onnx.load(str(path), load_external_data=False)
            for tensor in all_initializers(model.graph):
                external = tensor.data_location == onnx.TensorProto.EXTERNAL
                raw = external_bytes(tensor, Path(path).parent) if external else _inline_bytes(tensor)
                if len(raw) < min_bytes:  # kept inline (a small external one is brought in)
                    if external:
                        del tensor.external_data[:]
                        tensor.raw_data = raw
                        tensor.data_location = onnx.TensorProto.DEFAULT
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest())
                if key not in slots:
                    f.write(b"\0" * (-f.tell() % align))
                    slots[key] = (f.tell(), len(raw))
                    f.write(raw)
                del raw
                # The bytes never enter the proto: protobuf keeps a cleared field's memory until the
                # whole message goes, which would hold every weight.
                for data_field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                                   "raw_data"):
                    tensor.ClearField(data_field)
                set_external(tensor, data_name, *slots[key])
            onnx.save(model, str(path))
            del model
    for old in old_files - {data_path}:
        old.unlink(missing_ok=True)
    os.replace(tmp_path, data_path)
    return data_path


def _inline_bytes(tensor: onnx.TensorProto) -> bytes:
    """An inline tensor's little-endian bytes."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).tobytes()
