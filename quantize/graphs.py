"""One graph, one recipe: onnxruntime's quantisation tools applied to an exported ONNX file.

Every transform reads the fp32 graph at `src` and writes the new graph at `dst` (with external data
when it passes protobuf's 2 GB limit), keeping the graph's input/output names and dtypes. The work
itself is onnxruntime's: `quant_pre_process` (constant folding, so that `Transpose(W)` patterns
become plain weights), `quantize_dynamic`, `quantize_static` (QDQ), `MatMulNBitsQuantizer` and
`onnxruntime.transformers.float16`. This module only chooses their settings and measures the result.

No torch here: quantisation runs on a serving host.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from glm_image_onnx.export.onnx_info import DTYPES as _DTYPES, EXTERNAL_DATA_THRESHOLD, all_initializers, save_model, signature  # noqa: F401 (re-exported)
from glm_image_onnx.export.onnx_info import onnx_files as graph_files  # noqa: F401 (re-exported)
from glm_image_onnx.export import precision
from glm_image_onnx.export.onnx_info import tensor_nbytes as _tensor_nbytes
# Weights smaller than this are biases, norm scales, constants: not counted as "large" weights.
LARGE_WEIGHT_ELEMENTS = 4096

class GraphQuantizeError(RuntimeError):
    """A graph that the recipe cannot transform; the message is one readable line."""


# ----------------------------------------------------------------------------------- inspection
def graph_bytes(path: Path | str) -> int:
    return sum(p.stat().st_size for p in graph_files(path))


def weight_stats(path: Path | str) -> dict[str, Any]:
    """Initializer bytes by dtype; fp32 bytes held by large weights (>= LARGE_WEIGHT_ELEMENTS)."""
    model = onnx.load(str(path), load_external_data=False)
    by_dtype: dict[str, int] = {}
    large_fp32: dict[str, int] = {}
    for t in all_initializers(model.graph):
        nbytes = _tensor_nbytes(t)
        name = _DTYPES.get(t.data_type, str(t.data_type))
        by_dtype[name] = by_dtype.get(name, 0) + nbytes
        if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims or [1])) >= LARGE_WEIGHT_ELEMENTS:
            large_fp32[t.name] = nbytes
    return {"bytes_by_dtype": by_dtype, "total": sum(by_dtype.values()),
            "large_fp32": sum(large_fp32.values()),
            "largest_fp32": sorted(large_fp32, key=large_fp32.get, reverse=True)[:5]}


def count_constant_transposes(path: Path | str) -> int:
    """`Transpose(initializer)` nodes: weights that a MatMul quantiser cannot see."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "Transpose" and n.input and n.input[0] in inits)


# --------------------------------------------------------------------------------------- saving
def normalize_external_data(path: Path) -> None:
    """A graph written by a tool with external data under another name -> `<graph>.onnx.data`,
    its nodes in an order valid for subgraphs too (`export.attention.restore_node_order`)."""
    from glm_image_onnx.export.attention import restore_node_order

    path = Path(path)
    restore_node_order(path)
    files = graph_files(path)
    if len(files) > 1 and [f.name for f in files[1:]] != [path.name + ".data"]:
        model = onnx.load(str(path))
        for f in files[1:]:
            f.unlink()
        save_model(model, path)


def check_model(path: Path) -> None:
    """onnx.checker on the saved file (by path, so that external data is allowed)."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise GraphQuantizeError(f"{Path(path).name}: onnx.checker rejects the result: "
                                 f"{str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------- prepare
def prepare(src: Path, dst: Path) -> dict[str, Any]:
    """onnxruntime's `quant_pre_process`: constant folding (every `Transpose(W)` becomes a plain
    weight the quantisers can see) and ONNX shape inference. The dynamo graphs need no symbolic
    shape inference (and onnxruntime's does not handle all of their ops)."""
    from onnxruntime.quantization import quant_pre_process

    before = count_constant_transposes(src)
    large = graph_bytes(src) > EXTERNAL_DATA_THRESHOLD
    with _quiet():
        quant_pre_process(str(src), str(dst), skip_optimization=False, skip_onnx_shape=False,
                          skip_symbolic_shape=True, save_as_external_data=large,
                          all_tensors_to_one_file=True,
                          external_data_location=Path(dst).name + ".data" if large else None)
    return {"constant_transposes_before": before, "constant_transposes_after": count_constant_transposes(dst)}


def gemm_to_matmul(path: Path) -> int:
    """Rewrite `Gemm(A, W, C)` with a constant W as `MatMul(A, W') + C`, in place.

    onnxruntime's dynamic and 4-bit quantisers handle MatMul only (the DiT's adaLN modulation
    linears, a third of its weights, export as Gemm). Runs after `prepare`, whose optimiser would
    fuse a MatMul + Add back into a Gemm. Returns the number of rewritten nodes.
    """
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        w_name = f"{node.input[1]}__matmul{count}"
        model.graph.initializer.append(numpy_helper.from_array(weight, w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        save_model(model, path)
    return count


# ------------------------------------------------------------------------------------- recipes
def _reader(feeds: Sequence[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def __len__(self) -> int:
            return len(feeds)

        def rewind(self) -> None:
            self._it = iter(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            """quantize_static's `CalibStridedMinMax`: the next collection reads these feeds only."""
            self._it = iter(feeds[start_index:end_index])

    return Reader()


def saturating_int8_cpu(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """True on an x86 CPU without VNNI (AVX2 only): onnxruntime's u8 x s8 kernels there add pairs
    of products in int16 (vpmaddubsw), which saturates with full-range 8-bit weights (tiny DiT:
    relative L2 6.8% instead of 0.5%). Weights are then quantised to 7 bits (`reduce_range`), as
    onnxruntime advises for non-VNNI machines; recorded per graph (`weight_bits`).
    `cpuinfo` / `machine`: /proc/cpuinfo's text and platform.machine() (read here when None)."""
    machine = platform.machine() if machine is None else machine
    if machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def int8_dynamic(prepared: Path, dst: Path, per_channel: bool, op_types: Sequence[str]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce = saturating_int8_cpu()
    with _quiet():
        quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
                         reduce_range=reduce, weight_type=QuantType.QInt8,
                         use_external_data_format=graph_bytes(prepared) > EXTERNAL_DATA_THRESHOLD,
                         extra_options={"MatMulConstBOnly": True})
    return {"per_channel": per_channel, "weight_type": "int8", "weight_bits": 7 if reduce else 8,
            "activations": "uint8, dynamic per tensor", "op_types": list(op_types)}


def int8_static(prepared: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], op_types: Sequence[str],
                calibrate_method: str = "minmax", per_channel: bool = True) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise GraphQuantizeError(f"{Path(prepared).name}: no calibration inputs were captured for it")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibrate_method]
    extra = {"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False,
             "CalibMovingAverage": False}
    if method == CalibrationMethod.Percentile:
        extra["CalibPercentile"] = 99.999
    if method != CalibrationMethod.MinMax:
        # The histogram calibrators stack each tensor's values over all the inputs of one collection
        # (np.asarray of a list): inputs of several shapes (the AR planner's prefill and decode
        # steps) fail there. One input per collection; the histograms are merged across them.
        extra["CalibStridedMinMax"] = 1
    reduce = saturating_int8_cpu()
    # (the histogram calibrators also print a line per collection to stdout)
    with _quiet(), contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(prepared), str(dst), _reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), per_channel=per_channel, reduce_range=reduce,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=graph_bytes(prepared) > EXTERNAL_DATA_THRESHOLD,
                        calibrate_method=method, calibration_providers=["CPUExecutionProvider"],
                        extra_options=extra)
    return {"format": "QDQ", "per_channel": per_channel, "weight_type": "int8", "weight_bits": 7 if reduce else 8,
            "activation_type": "uint8",
            "calibration": calibrate_method, "calibration_inputs": len(feeds), "op_types": list(op_types)}


def int4_weight(prepared: Path, dst: Path, block_size: int, accuracy_level: int | None,
                symmetric: bool = True, op_types: Sequence[str] = ("MatMul",)) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(prepared))
    with _quiet():
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, op_types_to_quantize=tuple(op_types))
        quantizer.process()
    out = quantizer.model.model
    save_model(out, dst)
    return {"bits": 4, "block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level,
            "op_types": list(op_types)}


def fp16(src: Path, dst: Path, native_io: Sequence[str] = ()) -> dict[str, Any]:
    """float16 weights and compute (export.precision); fp32 graph inputs/outputs except `native_io`."""
    try:
        return precision.convert(src, dst, "fp16", native_io, provider="cuda")  # the result is a cuda package
    except precision.PrecisionError as e:
        raise GraphQuantizeError(str(e)) from None


# ------------------------------------------------------------------------------------- helpers
class _quiet:
    """onnxruntime's quantisers log every node at INFO and below, through their own loggers and the
    root logger; keep the CLI readable. Scoped to those records: the onnxruntime.quantization
    loggers' level, and a root-logger filter on the records its files log there (other code's
    logging, a server's included, is left as it is)."""

    _LOGGER = "onnxruntime.quantization"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self._dir)

    def __enter__(self) -> "_quiet":
        import onnxruntime.quantization

        self._dir = str(Path(onnxruntime.quantization.__file__).parent)
        logger = logging.getLogger(self._LOGGER)
        self._level = logger.level
        logger.setLevel(logging.WARNING)
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().removeFilter(self)
        logging.getLogger(self._LOGGER).setLevel(self._level)
