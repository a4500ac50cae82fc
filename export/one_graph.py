"""One GraphSpec -> one graph file in the staging folder and its manifest entry.

The steps, in order: the fp32 ONNX export (graph.export_onnx, or the low-memory export's streamed
one), the CPU attention rewrite for unmasked calls, --verify of the fp32 graph against PyTorch,
then either the fp16 / bf16 conversion (and --verify of the converted graph) or, for an fp32
graph on another provider, the placement check that the conversion would otherwise have run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from glm_image_onnx.export import graph as graph_mod
from glm_image_onnx.export.graph import GraphSpec
from glm_image_onnx.export.manifest_build import graph_entry
from glm_image_onnx.export.options import ExportError, ExportOptions, ExportRun
from glm_image_onnx.manifest import Graph
from glm_image_onnx.targets import ELEMENT_TYPE, get_target


def export_one(spec: GraphSpec, run: ExportRun, export: Callable[..., dict[str, int]] | None = None,
               verify_now: bool = True) -> Graph:
    """Export `spec` into `run.tmp` (and with --verify, check it); `export` replaces
    graph.export_onnx, and `verify_now` False leaves the checks to the caller (the low-memory
    export verifies a component's graphs after all of them are written)."""
    options, step = run.options, run.steps[spec.name]
    path = run.tmp / f"{spec.name}.onnx"
    t0 = time.perf_counter()
    run.log(f"{step} {spec.name}: exporting")
    weights: dict[str, Callable[[], Any]] = {}
    export_path, fusions = _write_fp32(spec, path, options, export, weights)
    msg = ""
    verify: dict[str, Any] = {}
    if options.verify and verify_now:  # the fp32 graph against PyTorch, always: a conversion below starts from it
        verify = verified(spec, path, options.seed, graph_mod.MAX_RELATIVE_ERROR)
        msg += f", verified on {verify['cases']} shapes: max rel error {verify['max_rel']:.2e}"
    config = dict(spec.config)
    precision_info = None
    target = get_target(options.target)
    if options.dtype != "fp32":
        precision_info = _convert(spec, path, export_path, options, weights)
        if "kv_cache" in config:
            config["kv_cache"] = {**config["kv_cache"], "dtype": ELEMENT_TYPE[options.dtype]}
        msg += _precision_note(precision_info, options)
        if verify_now and options.verify:
            verify, note = _verify_converted(spec, path, options, verify)
            msg += note
    elif target.name != "cpu":  # no conversion ran the placement check: run it here
        msg += _placement_note(spec.name, path, options.target, target.provider)
    export_s = time.perf_counter() - t0
    entry = graph_entry(spec.name, path, description=spec.description, dtype=options.dtype, config=config,
                        export_seconds=round(export_s, 3), ort_fusions=fusions, precision=precision_info,
                        verify=verify)
    run.log(f"{step} {spec.name}: exported in {export_s:.1f}s ({entry.bytes / 1e6:.1f} MB){msg}")
    return entry


def _write_fp32(spec: GraphSpec, path: Path, options: ExportOptions, export: Callable[..., dict[str, int]] | None,
                weights: dict[str, Callable[[], Any]]) -> tuple[Path, dict[str, int]]:
    """The fp32 graph on disk: where it was written, and the onnxruntime fusions applied to it."""
    target = get_target(options.target)
    streamed_half = options.low_memory and options.dtype != "fp32"
    # A low-memory fp16 / bf16 export writes the fp32 graph without weights where the conversion
    # reads it, which takes each weight from the checkpoint through its loader in `weights`.
    export_path = path.with_name(path.stem + ".fp32.onnx") if streamed_half else path
    fusions = (export or graph_mod.export_onnx)(spec, export_path, opset=options.opset, basic_ops=target.static_shapes,
                                                **({"weights": weights} if streamed_half else {}))
    if spec.flash_mask_input and fusions and target.provider == "cpu":
        from glm_image_onnx.export.attention import flash_when_unmasked

        fusions["FlashWhenUnmasked"] = flash_when_unmasked(export_path, spec.flash_mask_input)
    return export_path, fusions


def _convert(spec: GraphSpec, path: Path, export_path: Path, options: ExportOptions,
             weights: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """The fp32 graph at `export_path` converted to the package dtype at `path`; the fp32 one is
    removed. Returns what precision.convert did."""
    from glm_image_onnx.export import precision

    fp32 = path.with_name(path.stem + ".fp32.onnx")
    if export_path != fp32:
        _move_graph(path, fp32)
    try:
        info = precision.convert(fp32, path, options.dtype, native_io=_cache_io(spec),
                                 provider=get_target(options.target).provider, low_memory=options.low_memory,
                                 weights=weights)
    except precision.PrecisionError as e:
        raise ExportError(str(e)) from None
    for f in graph_mod.onnx_files(fp32):
        f.unlink(missing_ok=True)  # a weightless graph's `.unwritten` never existed
    return info


def _precision_note(info: dict[str, Any], options: ExportOptions) -> str:
    """The progress line's account of a conversion: what stayed fp32 and why, what was clamped."""
    extra = info.get("kept_fp32_for_kernels", {}).get("ops")
    over = info.get("fp16_range", {}).get("overflow_values", 0)
    msg = (f", {options.dtype} ({info['kept_fp32_nodes']} nodes kept fp32"
           + (f"; for lack of {options.dtype} kernels: {', '.join(f'{o} x{n}' for o, n in extra.items())}"
              if extra else "")
           + (f"; {over} weights beyond +-65504 clamped" if over else "") + ")")
    if "falls_back" in info:
        msg += f"; WARNING, still not all on {options.target}: {info['falls_back']}"
    return msg


def _verify_converted(spec: GraphSpec, path: Path, options: ExportOptions,
                      fp32: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The converted graph's `verify` record (the fp32 graph's kept inside it) and its progress note;
    a dtype onnxruntime's CPU cannot run is recorded as not verified, with the reason."""
    limit = graph_mod.MAX_RELATIVE_ERROR_BY_DTYPE.get(options.dtype)
    if limit is None:
        why = graph_mod.UNVERIFIED_DTYPES[options.dtype]
        return {**fp32, options.dtype: why}, f" (not run on CPU: {why})"
    converted = verified(spec, path, options.seed, limit)
    return {**converted, "fp32": fp32}, f" verified: max rel error {converted['max_rel']:.2e}"


def _placement_note(name: str, path: Path, target: str, provider: str) -> str:
    """A warning for the progress line when some node of the graph has no `provider` kernel."""
    import onnx

    from glm_image_onnx.export.placement import check_model

    report = check_model(onnx.load(str(path), load_external_data=False), name, provider)
    return f"; WARNING, not all on {target}: {report.summary()}" if report.problems else ""


def _cache_io(spec: GraphSpec) -> list[str]:
    """The graph inputs/outputs that take the package dtype: the cache updated in place."""
    return [name for pair in spec.shared_buffers.items() for name in pair]


def verified(spec: GraphSpec, path: Path, seed: int, limit: float) -> dict[str, Any]:
    """graph.verify's record of the graph at `path`, timed; ExportError when it does not pass."""
    t1 = time.perf_counter()
    result = graph_mod.verify(spec, path, seed=seed, limit=limit)
    result["seconds"] = round(time.perf_counter() - t1, 3)
    return passed(spec.name, result, limit)


def passed(name: str, result: dict[str, Any], limit: float) -> dict[str, Any]:
    """`result` (graph.verify / graph.compare); ExportError naming the worst output above `limit`."""
    if not result["passed"]:
        if result.get("problems"):  # compared nothing, or not every output (graph.compare)
            raise ExportError(f"{name}: verification against PyTorch compared the wrong things: "
                              + "; ".join(result["problems"]))
        worst = max(result["outputs"].items(), key=lambda kv: kv[1]["max_rel"])
        raise ExportError(f"{name}: output {worst[0]!r} differs from PyTorch by "
                          f"{worst[1]['max_rel']:.2e} relative (limit {limit:.0e})")
    return result


def _move_graph(src: Path, dst: Path) -> None:
    """Rename a graph file; one with external data is re-saved so that it points at its new data file."""
    files = graph_mod.onnx_files(src)
    if len(files) == 1:
        src.rename(dst)
        return
    import onnx

    from glm_image_onnx.export.onnx_info import save_model

    model = onnx.load(str(src))
    for f in files:
        f.unlink()
    save_model(model, dst)
