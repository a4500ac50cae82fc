"""An fp32 graph -> the same graph in float16 or bfloat16, for GPU targets (and the fp16 recipe).

onnxruntime's `float16` converter decides which nodes compute in half precision: everything but
the sensitive ops (normalisations, softmax, the reductions and powers of the decomposed RMSNorm and
LayerNorm, and the eps Add between them), and every node that computes a rotary or timestep angle
(upstream of Sin/Cos), which stay fp32 with Casts around them. bfloat16 takes the converter's decisions unchanged and retypes every
float16 tensor, Cast and constant to bfloat16, with weights rounded from the original fp32 values
(not from their float16 copies, which the converter clamps to +-65504).

Graph inputs and outputs stay float32 (the runtime feeds numpy arrays) except `native_io`: the AR
planner's KV cache, which then reaches GroupQueryAttention with no Cast in between, so that the
runtime can bind one buffer in the package dtype as both `past` and `present`.

No torch here: the quantiser's fp16 recipe uses the same conversion.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from glm_image_onnx.export.onnx_info import (EXTERNAL_DATA_THRESHOLD, all_initializers, outer_inputs, save_model,
                                             subgraphs, tensor_nbytes)

FP16_MAX = 65504.0
# convert(low_memory=True) writes a graph whose weights exceed this with a data file.
LOW_MEMORY_INLINE_BYTES = 256_000_000
FP16_MIN_POSITIVE = 5.96e-08  # the smallest fp16 subnormal

# Kept in fp32: normalisations, softmax, and the reductions/powers of the decomposed RMSNorm
# (opset 18 has no RMSNormalization). Rotary and timestep tables (Sin/Cos and everything that
# computes their angles) are found by walking the graph, see `angle_nodes`.
KEEP_FP32_OPS = (
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization",
    "InstanceNormalization", "BatchNormalization", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "Pow", "Sqrt", "Reciprocal",
    "Sin", "Cos", "RotaryEmbedding",
)


class PrecisionError(RuntimeError):
    """A graph that cannot be converted; the message is one readable line."""


def convert(src: Path | str, dst: Path | str, dtype: str, native_io: Sequence[str] = (),
            keep_fp32_ops: Sequence[str] = KEEP_FP32_OPS, provider: str | None = None,
            low_memory: bool = False, weights: Mapping[str, Callable[[], np.ndarray]] | None = None
            ) -> dict[str, Any]:
    """Write `src` converted to `dtype` ("fp16" or "bf16") at `dst`; returns what was done.

    With `provider` (export.placement's name, e.g. "cuda"), a node whose op that provider has no
    kernel for in `dtype` (the CUDA EP has no bfloat16 Conv, Resize or Einsum, no float16 GridSample)
    stays float32 too, found by the placement check on the converted graph and converted again.

    `low_memory`: the graph is converted without its external data (the converter only retypes
    those initializers), then each one is read, converted and written on its own: the same result,
    in the memory of one tensor. `weights` (with low_memory): loaders by initializer name for the
    external tensors whose data was never written (export --low-memory's weightless graph: the
    weights go from the checkpoint straight into the converted graph); the others are read from
    their data files beside `src`."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from glm_image_onnx.export.attention import restore_node_order
    from glm_image_onnx.export.placement import check_model

    if dtype not in ("fp16", "bf16"):
        raise PrecisionError(f"dtype must be fp16 or bf16, got {dtype!r}")
    model = onnx.load(str(src), load_external_data=not low_memory)
    external = {t.name: t.data_type for t in all_initializers(model.graph)
                if t.data_location == onnx.TensorProto.EXTERNAL} if low_memory else {}
    io = [v.name for v in (*model.graph.input, *model.graph.output)
          if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    unknown = sorted(set(native_io) - set(io))
    if unknown:
        raise PrecisionError(f"{Path(src).name}: {unknown[0]!r} is not a float32 input or output of the graph")
    originals = {t.name: t for t in all_initializers(model.graph)
                 if t.data_type == onnx.TensorProto.FLOAT and t.name not in external} if dtype == "bf16" else {}
    def read(t: onnx.TensorProto, data_type: int) -> np.ndarray:
        if weights is not None and t.name in weights:
            return np.asarray(weights[t.name]())
        return _read_external(t, Path(src).parent, data_type)

    overflow = fp16_range_report(model, read if low_memory else None) if dtype == "fp16" else None
    blocked = angle_nodes(model) | norm_statistic_nodes(model)
    large = sum(tensor_nbytes(t) for t in all_initializers(model.graph)) > EXTERNAL_DATA_THRESHOLD
    kept = sum(1 for n in model.graph.node if n.op_type in set(keep_fp32_ops)) + len(blocked)
    for_kernels: dict[str, int] = {}
    report = None
    for _ in range(4):  # each round keeps fp32 the nodes the last one left without a kernel
        with _quiet_converter(), _weightless_converter(low_memory):
            converted = convert_float_to_float16(
                _copy(model), min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX,
                keep_io_types=[n for n in io if n not in set(native_io)], disable_shape_infer=large,
                op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops)),
                node_block_list=sorted(blocked))
        drop_half_round_trips(converted.graph)
        if dtype == "bf16":
            _fp16_to_bf16(converted.graph, originals)
        if provider is None:
            break
        report = check_model(converted, Path(src).stem, provider)
        falling = {v.node: v.op for v in report.problems
                   if v.status == "fallback" and v.node and v.node not in blocked}
        if not falling:
            break
        blocked |= set(falling)
        for op in falling.values():
            for_kernels[op] = for_kernels.get(op, 0) + 1
    # The converter inserts Casts after the graph inputs without re-sorting; ONNX needs topological order.
    wrapped = OnnxModel(converted)
    wrapped.topological_sort()
    if low_memory:
        _save_streamed(wrapped.model, Path(dst), read, external)
    else:
        save_model(wrapped.model, dst)
    restore_node_order(dst)  # that sort ignores what an If's branches read
    try:
        onnx.checker.check_model(str(dst))  # by path: external data allowed
    except onnx.checker.ValidationError as e:
        raise PrecisionError(f"{Path(dst).name}: onnx.checker rejects the {dtype} graph: "
                             f"{str(e).splitlines()[0]}") from None
    info: dict[str, Any] = {"dtype": dtype,
                            "io": f"float32 except {len(native_io)} in {dtype} (the cache)" if native_io else "float32",
                            "kept_fp32_op_types": list(keep_fp32_ops),
                            "kept_fp32_nodes": kept + sum(for_kernels.values())}
    if for_kernels:
        info["kept_fp32_for_kernels"] = {"provider": provider, "ops": for_kernels}
    if provider is not None and report.problems:  # not fixed by fp32 either: the export says so
        info["falls_back"] = report.summary()
    if overflow is not None:
        info["fp16_range"] = overflow
    return info


def drop_half_round_trips(graph: onnx.GraphProto) -> int:
    """Remove the float16 round trips between fp32 nodes; returns how many consumers were rewired.

    The converter gives every node it keeps fp32 a Cast to float16 after each output and a Cast back
    to float32 before each input, also where one kept node feeds another (Pow -> ReduceMean -> the
    eps Add -> Sqrt of a decomposed norm): such a value would pass through float16 anyway, and a
    mean square beyond 65504 would come back inf. Wherever `Cast(to=float32)` reads the output of
    `Cast(to=float16)` of a float32 tensor, its readers read that float32 tensor instead; Casts left
    without readers go. Names a subgraph reads, and graph outputs, are left as they are."""
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    outputs = {o.name for o in graph.output}
    # what subgraphs read: only this graph's own node inputs are rewired
    in_subgraphs = {i for n in graph.node for sub in subgraphs(n) for m in sub.node for i in outer_inputs(m)}

    def cast_to(node: onnx.NodeProto) -> int | None:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producers = {o: n for n in graph.node for o in n.output}
    replace: dict[str, str] = {}  # a float32 copy of a float16 copy -> the float32 original
    for node in graph.node:
        first = producers.get(node.input[0]) if node.input else None
        if (cast_to(node) == f32 and first is not None and cast_to(first) == f16
                and types.get(first.input[0]) == f32
                and node.output[0] not in outputs and node.output[0] not in in_subgraphs):
            replace[node.output[0]] = first.input[0]
    rewired = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
                rewired += 1
    # Casts nothing reads any more (the float32 copies, and float16 copies only they read)
    dropped: set[str] = set()
    while True:
        read = {i for n in graph.node for i in n.input} | outputs | in_subgraphs
        keep = [n for n in graph.node if cast_to(n) is None or n.output[0] in read]
        if len(keep) == len(graph.node):
            break
        dropped |= {n.output[0] for n in graph.node if cast_to(n) is not None and n.output[0] not in read}
        del graph.node[:]
        graph.node.extend(keep)
    kept_info = [v for v in graph.value_info if v.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return rewired


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _bf16_tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
    import ml_dtypes  # onnx's own dependency for its bfloat16 arrays

    tensor = numpy_helper.from_array(np.asarray(array, np.float32).astype(ml_dtypes.bfloat16), name)
    assert tensor.data_type == onnx.TensorProto.BFLOAT16
    return tensor


def _fp16_to_bf16(graph: onnx.GraphProto, originals: dict[str, onnx.TensorProto]) -> None:
    """Retype every float16 tensor of a converted graph to bfloat16 (weights from their fp32 originals)."""
    f16, bf16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16

    def retype(tensor: onnx.TensorProto) -> None:
        if tensor.data_type != f16:
            return
        if tensor.data_location == onnx.TensorProto.EXTERNAL:  # low_memory: _save_streamed converts it
            tensor.data_type = bf16
            return
        source = originals.get(tensor.name)
        values = numpy_helper.to_array(source) if source is not None else numpy_helper.to_array(tensor)
        tensor.CopyFrom(_bf16_tensor(values.reshape(tuple(tensor.dims)), tensor.name))

    for tensor in graph.initializer:
        retype(tensor)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == f16:
            value.type.tensor_type.elem_type = bf16
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                retype(attr.t)
            elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise PrecisionError(f"node {node.name!r} ({node.op_type}) has a subgraph; bf16 conversion "
                                     "does not handle subgraphs")
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == f16:
                attr.i = bf16


def fp16_range_report(model: onnx.ModelProto, read: WeightReader | None = None) -> dict[str, Any]:
    """Float weights that float16 cannot hold: beyond +-65504 (clamped) or so small they flush to 0.
    `read`: external data not loaded, read one tensor at a time with it."""
    over, under, max_abs, worst = 0, 0, 0.0, []
    for t in all_initializers(model.graph):
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        if read is not None and t.data_location == onnx.TensorProto.EXTERNAL:
            values = read(t, onnx.TensorProto.FLOAT)
        else:
            values = numpy_helper.to_array(t)
        n_over = 0
        for part in _chunks(values):  # |x| and the masks of one chunk at a time, not of a whole embedding
            a = np.abs(part)
            n_over += int(np.count_nonzero(a > FP16_MAX))
            under += int(np.count_nonzero((a > 0) & (a < FP16_MIN_POSITIVE)))
            max_abs = max(max_abs, float(a.max()))
        over += n_over
        if n_over:
            worst.append(t.name)
    return {"overflow_values": over, "underflow_values": under, "max_abs_weight": max_abs,
            "overflow_tensors": worst[:10]}


def angle_nodes(model: onnx.ModelProto) -> set[str]:
    """Sin/Cos and every float node upstream of them (positions x inverse frequencies, exp of the
    frequency ramp): in float16 a position of a few thousand loses the angle entirely."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out: set[str] = set()
    stack = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    while stack:
        node = stack.pop()
        if not node.name or node.name in out:
            continue
        out.add(node.name)
        for name in node.input:
            p = producers.get(name)
            if p is not None and p.op_type not in ("Shape", "Size"):
                stack.append(p)
    return out


def norm_statistic_nodes(model: onnx.ModelProto) -> set[str]:
    """The eps Add between a ReduceMean and a Sqrt (a decomposed RMSNorm / LayerNorm variance): kept
    fp32 with the ops around it, since a variance above 65504 (activations beyond ~256) is inf in fp16."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    return {n.name for n in model.graph.node
            if n.op_type == "Add" and n.name
            and any(producers.get(i) is not None and producers[i].op_type == "ReduceMean" for i in n.input)
            and any(c.op_type == "Sqrt" for c in consumers.get(n.output[0], []))}


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """The converter logs every node it touches at INFO."""
    logger = logging.getLogger("onnxruntime.transformers.float16")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _weightless_converter(active: bool) -> Iterator[None]:
    """The converter takes each converted initializer's shape from its values; without external data
    loaded, from its dims."""
    if not active:
        yield
        return
    from onnx import helper
    from onnxruntime.transformers import float16

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
             onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
             onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
             onnx.TensorProto.BOOL: np.bool_}


def external_bytes(t: onnx.TensorProto, base_dir: Path) -> bytes:
    """An external-data tensor's bytes, read from its file under `base_dir`."""
    info = {e.key: e.value for e in t.external_data}
    with open(base_dir / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


CHUNK_ELEMENTS = 16 << 20  # 64 MB of fp32: what a streamed conversion holds besides the tensor itself


def _chunks(values: np.ndarray) -> Iterator[np.ndarray]:
    """Views of consecutive CHUNK_ELEMENTS-element pieces of `values`, flattened."""
    flat = values.reshape(-1)
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        yield flat[start:start + CHUNK_ELEMENTS]


# Reads one external-data initializer of a graph loaded without its weights, as that data type.
WeightReader = Callable[[onnx.TensorProto, int], np.ndarray]


def _read_external(t: onnx.TensorProto, base_dir: Path, data_type: int) -> np.ndarray:
    return np.frombuffer(external_bytes(t, base_dir), dtype=_NP_TYPES[data_type]).reshape(tuple(t.dims))


def set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point `tensor` at `length` bytes at `offset` of `location` (onnx's set_external_data wants the
    bytes in raw_data first)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _save_streamed(model: onnx.ModelProto, dst: Path, read: WeightReader, src_types: dict[str, int],
                   align: int = 4096) -> None:
    """Save a graph converted without its external data: each such initializer is read with `read`
    in its original dtype, converted to the dtype the converter gave it, and written to dst's own
    data file (inline when the whole graph is small enough, as save_model would)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    tensors = [t for t in all_initializers(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    # Inline only when small: an inline save holds the weights two or three times over (proto and
    # serialised bytes); a bigger graph gets its data file even below the 1.8 GB protobuf limit.
    inline = sum(tensor_nbytes(t) for t in all_initializers(model.graph)) <= min(EXTERNAL_DATA_THRESHOLD,
                                                                               LOW_MEMORY_INLINE_BYTES)
    data_name = dst.name + ".data"

    def converted(t: onnx.TensorProto) -> Iterator[bytes]:
        """The tensor's bytes in its new dtype, a chunk at a time (a whole fp32 embedding and its
        converted copies would be several times the tensor)."""
        src_type = src_types[t.name]
        values = read(t, src_type)
        if t.data_type != src_type and src_type != onnx.TensorProto.FLOAT:
            raise PrecisionError(f"{t.name}: unexpected retype from {src_type} to {t.data_type}")
        for part in _chunks(values):
            if t.data_type == src_type:
                yield part.tobytes()
            elif t.data_type == onnx.TensorProto.FLOAT16:
                yield convert_np_to_float16(part, FP16_MIN_POSITIVE, FP16_MAX).tobytes()
            elif t.data_type == onnx.TensorProto.BFLOAT16:
                import ml_dtypes

                yield part.astype(ml_dtypes.bfloat16).tobytes()
            else:
                raise PrecisionError(f"{t.name}: cannot convert float32 to data type {t.data_type}")

    if inline:
        for t in tensors:
            raw = b"".join(converted(t))
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw
        onnx.save(model, str(dst))
        return
    with open(dst.parent / data_name, "wb") as f:
        for t in tensors:
            f.write(b"\0" * (-f.tell() % align))
            offset = f.tell()
            for raw in converted(t):
                f.write(raw)
            set_external(t, data_name, offset, f.tell() - offset)  # the bytes never enter the proto
    onnx.save(model, str(dst))
