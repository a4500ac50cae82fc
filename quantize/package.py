"""An fp32 ONNX package -> a quantised package in the same format, with a quality report.

The new package is complete and loadable by the runtime unchanged: every graph keeps its input and
output names and dtypes, graphs a recipe does not touch are copied, `files` is recomputed, and a
`quantization` section records the recipe, each graph's settings, sizes and the quality report.
It is built in a temporary sibling folder and renamed at the end: a failure (including a quality
threshold that is not met) leaves nothing behind.

Steps: capture calibration inputs with the fp32 runtime (int8-static; int8-dynamic uses a few to
choose per-channel or per-tensor weights per graph), transform each selected graph, write the
package, then evaluate it against the fp32 package (see `quality`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from glm_image_onnx.errors import UsageError
from glm_image_onnx.atomic import staged_folder
from glm_image_onnx.manifest import (GRAPH_CONFIGS, I2I_GRAPHS, MANIFEST, ArPlannerConfig, Graph, Manifest, Target,
                                     file_table, read_graphs, sha256_file, to_json)
from glm_image_onnx.quantize import capture as capture_mod
from glm_image_onnx.quantize import graphs as G
from glm_image_onnx.quantize import quality as Q
from glm_image_onnx.targets import recipe_refusal

Log = Callable[[str], None]


class QuantizeError(RuntimeError):
    """A quantisation that cannot go on or whose quality is below the thresholds; one line."""


class QuantizeUsageError(QuantizeError, UsageError):
    """A quantisation that cannot start as asked (options, input package, output folder): exit 2."""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    default_graphs: tuple[str, ...]
    needs_calibration: bool = False


ALL_GRAPHS = tuple(GRAPH_CONFIGS)
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("int8-dynamic", "int8 MatMul weights, activations quantised at run time (quantize_dynamic)",
           ("ar_planner", "vision_tokenizer", "glyph_encoder", "dit_decoder", "dit_condition_write")),
    Recipe("int8-static", "int8 QDQ weights and activations, ranges calibrated on captured inputs (quantize_static)",
           ("ar_planner", "glyph_encoder", "dit_decoder", "dit_condition_write"), needs_calibration=True),
    Recipe("int4-weight", "4-bit block-wise MatMul weights (MatMulNBits), activations in the package dtype",
           ("ar_planner", "dit_decoder", "dit_condition_write")),
    Recipe("fp16", "float16 weights and compute for GPUs (a cuda/fp16 package, as export --target cuda --dtype fp16 "
           "makes); fp32 I/O except the AR cache, fp32 norms, softmax and rotary", ALL_GRAPHS),
)}


@dataclass
class QuantizeOptions:
    recipe: str = "int8-dynamic"
    graphs: tuple[str, ...] | None = None  # None: the recipe's defaults that the package has
    overwrite: bool = False
    # int8-dynamic: "auto" tries both on calibration inputs and keeps the more accurate.
    per_channel: str = "auto"
    # int8-static
    calibration_prompts: str | None = None  # file, one prompt a line; None: the shipped set
    calibration_limit: int | None = None  # prompts used (int8-dynamic "auto" uses 2 by default)
    calibrate_method: str = "minmax"
    # int4-weight
    block_size: int = 32
    accuracy_level: int | None = None
    # evaluation (and calibration runs)
    height: int = 256
    width: int = 256
    steps: int = 8
    eval_prompts: int = 3
    seed: int = 0
    threads: int | None = None
    thresholds: Q.Thresholds = field(default_factory=Q.Thresholds)


EVAL_PROMPTS = (
    'A lighthouse on a cliff at dusk, the sign reads "HARBOR"',
    "a bowl of ramen with chopsticks, top view, soft light",
    "an astronaut riding a horse on the moon, oil painting",
    'a vintage poster with the words "SUMMER FESTIVAL" in bold letters',
    "macro photo of a dew drop on a green leaf",
    "a cozy reading nook with a cat sleeping on a pile of books",
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("glm-image-onnx", "onnx", "onnxruntime"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def select_graphs(recipe: Recipe, manifest: Manifest, wanted: tuple[str, ...] | None) -> list[str]:
    present = list(manifest.graphs)
    if wanted is None:
        return [g for g in present if g in recipe.default_graphs]
    for g in wanted:
        if g not in ALL_GRAPHS:
            raise QuantizeUsageError(f"unknown component {g!r}; choose from {', '.join(ALL_GRAPHS)}")
        if g not in present:
            raise QuantizeUsageError(f"the package has no {g!r} graph (it has: {', '.join(present)})")
    return [g for g in present if g in wanted]


def quantize_package(package: Path | str, out: Path | str, options: QuantizeOptions | None = None,
                     log: Log = _log) -> Manifest:
    """Quantise `package` into the new package folder `out`; returns the new manifest."""
    import onnxruntime as ort

    # onnxruntime's C++ warnings (constant folding skipped for fp16 nodes, ...) are noise here; the
    # severity is process-wide, so it goes back to onnxruntime's default (warnings) afterwards.
    ort.set_default_logger_severity(3)
    try:
        return _quantize(package, out, options, log)
    finally:
        ort.set_default_logger_severity(2)


def _quantize(package: Path | str, out: Path | str, options: QuantizeOptions | None, log: Log) -> Manifest:
    from glm_image_onnx.runtime.package import Package, PackageError

    options = options or QuantizeOptions()
    t_start = time.perf_counter()
    if options.recipe not in RECIPES:
        raise QuantizeUsageError(f"unknown recipe {options.recipe!r}; choose from {', '.join(RECIPES)}")
    recipe = RECIPES[options.recipe]
    _check_options(options)
    src = Path(package).resolve()
    try:
        source = Package.open(src, verify_files=True)
    except PackageError as e:
        raise QuantizeUsageError(str(e)) from None
    if source.manifest.quantization is not None:
        raise QuantizeUsageError(f"{src} is already quantised ({source.manifest.quantization.get('recipe')}); "
                                 "start from an exported package")
    for name in ("height", "width"):  # the evaluation's image size, on the package's grid
        error = source.pipeline.grid.side_error(name, getattr(options, name))
        if error:
            raise QuantizeUsageError(error)
    target = source.manifest.target
    refusal = recipe_refusal(target.name, recipe.name)
    if refusal:
        raise QuantizeUsageError(f"{src}: {refusal}")
    if target.dtype == "bf16":
        raise QuantizeUsageError(f"{src} is a bf16 package: the quality report runs it on the CPU, which has no "
                            "bfloat16 kernels; quantise the fp16 package of the same target instead")
    out = Path(out).resolve()
    if out == src:
        raise QuantizeUsageError("the output folder must differ from the input package")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.overwrite:
        raise QuantizeUsageError(f"output {out} already exists; pass --overwrite to replace it")
    selected = select_graphs(recipe, source.manifest, options.graphs)
    if not selected:
        raise QuantizeUsageError(f"none of the graphs {recipe.name} applies to is in the package")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        with staged_folder(out) as tmp:
            calibration = _calibration_feeds(recipe, options, src, selected, log)
            entries, per_graph = {}, {}
            for i, name in enumerate(selected):
                t0 = time.perf_counter()
                log(f"[{i + 1}/{len(selected)}] {name}: {recipe.name}")
                entry, info = _quantize_graph(recipe, options, source, name, tmp, work,
                                              calibration.get(name, []), log)
                info["seconds"] = round(time.perf_counter() - t0, 3)
                entries[name], per_graph[name] = entry, info
                log(f"[{i + 1}/{len(selected)}] {name}: {info['bytes_before'] / 1e6:.1f} MB -> "
                    f"{info['bytes_after'] / 1e6:.1f} MB ({info['summary']}) in {info['seconds']:.1f}s")
            graphs = _assemble(source, src, tmp, entries, selected)
            # fp16 makes graphs for a GPU, as `export --target cuda --dtype fp16` does; others keep the target.
            target = Target("cuda", "fp16") if recipe.name == "fp16" else target
            _check_placement(tmp, target, graphs, selected)
            quantization = {
                "recipe": recipe.name,
                "description": recipe.description,
                "source": {"package": str(src), "manifest_sha256": sha256_file(src / MANIFEST)},
                "created_by": _versions(),
                "options": _options_record(options),
                "graphs": per_graph,
                "unchanged": [g for g in source.graphs if g not in selected],
            }
            if recipe.name == "fp16":
                quantization["cpu"] = ("loads and runs on CPU (onnxruntime inserts no fp16 kernels it lacks: "
                                       "slower than fp32 there); meant for CUDA/CANN")
            manifest = source.manifest.replace(graphs=graphs, files=file_table(tmp), target=target,
                                               quantization=quantization)
            manifest.write(tmp)  # the runtime evaluates the staged package

            log("evaluating against the fp32 package")
            report = evaluate(src, tmp, selected, options, log)
            sizes = {g: per_graph.get(g) or {"bytes_before": source.graphs[g].bytes,
                                             "bytes_after": source.graphs[g].bytes, "summary": "unchanged"}
                     for g in source.graphs}
            table = Q.format_table(recipe.name, sizes, report)
            report["table"] = table
            log(table)
            failures = options.thresholds.failures(report)
            quantization.update({"report": report, "thresholds": options.thresholds.as_dict(),
                                 "passed": not failures, "seconds": round(time.perf_counter() - t_start, 3)})
            if failures:
                raise QuantizeError(f"{recipe.name} is below the quality thresholds: " + "; ".join(failures)
                                    + "; nothing written")
            manifest.write(tmp)  # last: a folder without a manifest is never a package
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(f.bytes for f in manifest.files.values())
    log(f"wrote {out} ({recipe.name}, {total / 1e6:.1f} MB) in {quantization['seconds']:.1f}s")
    return manifest


def _check_options(o: QuantizeOptions) -> None:
    if o.per_channel not in ("auto", "on", "off"):
        raise QuantizeUsageError(f"per-channel must be auto, on or off, got {o.per_channel!r}")
    if o.calibrate_method not in ("minmax", "entropy", "percentile"):
        raise QuantizeUsageError(f"calibration method must be minmax, entropy or percentile, got {o.calibrate_method!r}")
    if o.block_size < 16 or o.block_size & (o.block_size - 1):
        raise QuantizeUsageError(f"block size must be a power of two >= 16, got {o.block_size}")
    if o.accuracy_level is not None and o.accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizeUsageError(f"accuracy level must be 0..4, got {o.accuracy_level}")
    if o.steps < 1 or o.eval_prompts < 1:
        raise QuantizeUsageError("steps and eval prompts must be >= 1")
    if o.calibration_limit is not None and o.calibration_limit < 1:
        raise QuantizeUsageError("calibration limit must be >= 1")


def _options_record(o: QuantizeOptions) -> dict[str, Any]:
    d = asdict(o)
    d.pop("thresholds", None)
    d.pop("overwrite", None)
    d["graphs"] = list(o.graphs) if o.graphs else None
    return d


# ---------------------------------------------------------------------------------- calibration
def _calibration_feeds(recipe: Recipe, o: QuantizeOptions, src: Path, selected: list[str], log: Log
                       ) -> dict[str, list[dict[str, Any]]]:
    choose = recipe.name == "int8-dynamic" and o.per_channel == "auto"
    if not (recipe.needs_calibration or choose):
        return {}
    try:
        prompts = capture_mod.read_prompts(o.calibration_prompts)
    except (OSError, ValueError) as e:
        raise QuantizeUsageError(f"calibration prompts: {e}") from None
    limit = o.calibration_limit or (None if recipe.needs_calibration else 2)
    prompts = prompts[:limit] if limit else prompts
    i2i = 1 if any(g in I2I_GRAPHS for g in selected) else 0
    log(f"capturing calibration inputs: {len(prompts)} prompts{' + 1 image edit' if i2i else ''} "
        f"at {o.height}x{o.width}, {o.steps} steps (fp32 runtime)")
    # Seeds far from the evaluation's, so that evaluation inputs are fresh.
    feeds = capture_mod.capture(src, prompts, o.height, o.width, o.steps, seed=o.seed + 10_000,
                                image_to_image=i2i, threads=o.threads)
    log("captured " + ", ".join(f"{g}: {len(f)}" for g, f in feeds.items()) + " calls")
    return feeds


# --------------------------------------------------------------------------------------- graphs
def _quantize_graph(recipe: Recipe, o: QuantizeOptions, source: Any, name: str, tmp: Path, work: Path,
                    feeds: list[dict[str, Any]], log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    src_path = source.graph_path(name)
    dst = tmp / f"{name}.onnx"
    before = G.weight_stats(src_path)
    info: dict[str, Any] = {"bytes_before": G.graph_bytes(src_path)}
    try:
        if recipe.name == "fp16":
            settings = G.fp16(src_path, dst, native_io=cache_names(source.graphs[name]))
            fr = settings["fp16_range"]
            summary = (f"fp16, {settings['kept_fp32_nodes']} nodes fp32, "
                       f"{fr['overflow_values']} weights beyond fp16")
        elif recipe.name == "int4-weight" and source.graphs[name].dtype != "fp32":
            # A half-precision graph goes to the quantiser as it is: quant_pre_process would run
            # onnxruntime's CPU optimiser, which wraps every fp16 weight in a Cast the quantiser skips.
            settings = G.int4_weight(src_path, dst, o.block_size, o.accuracy_level)
            summary = f"int4 block {o.block_size}, {source.graphs[name].dtype} activations"
            G.normalize_external_data(dst)
            G.check_model(dst)
        else:
            prepared = work / f"{name}.prepared.onnx"
            info["prepare"] = G.prepare(src_path, prepared)
            if recipe.name in ("int8-dynamic", "int4-weight"):
                info["prepare"]["gemm_to_matmul"] = G.gemm_to_matmul(prepared)
            if recipe.name == "int8-dynamic":
                settings = _int8_dynamic(o, name, prepared, dst, work, feeds)
                summary = f"int8 {'per-channel' if settings['per_channel'] else 'per-tensor'}"
            elif recipe.name == "int8-static":
                op_types = ["MatMul", "Gemm", "Conv"]
                settings = G.int8_static(prepared, dst, capture_feeds_limit(feeds), op_types,
                                         o.calibrate_method)
                summary = f"QDQ int8, {settings['calibration_inputs']} calibration inputs"
            else:
                settings = G.int4_weight(prepared, dst, o.block_size, o.accuracy_level)
                summary = f"int4 block {o.block_size}" + (f", accuracy level {o.accuracy_level}"
                                                          if o.accuracy_level is not None else "")
            G.normalize_external_data(dst)
            G.check_model(dst)
    except G.GraphQuantizeError as e:
        raise QuantizeError(str(e)) from None
    except Exception as e:  # onnxruntime's tools raise anything
        raise QuantizeError(f"{name}: {recipe.name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    native = cache_names(source.graphs[name]) if recipe.name == "fp16" else []
    _check_signature(name, source.graphs[name], dst, native)
    after = G.weight_stats(dst)
    files = G.graph_files(dst)
    info.update({
        "settings": settings,
        "summary": summary,
        "bytes_after": sum(f.stat().st_size for f in files),
        "weights_before": before["total"],
        "weights_after": after["total"],
        "weights_after_by_dtype": after["bytes_by_dtype"],
        # Share of the graph's original weight bytes still stored as fp32 (biases and norms included).
        "fp32_weight_share": after["bytes_by_dtype"].get("float32", 0) / max(before["total"], 1),
        "largest_fp32_left": after["largest_fp32"],
    })
    entry = to_json(source.graphs[name])
    entry.pop("verify", None)  # the fp32 graph's check against PyTorch; this graph's is in the report
    if recipe.name == "fp16":
        entry["dtype"] = "fp16"
        if native:
            entry["config"] = {**entry["config"], "kv_cache": {**entry["config"]["kv_cache"], "dtype": "float16"}}
    entry.update({"file": dst.name, "external_data": [f.name for f in files[1:]], "bytes": info["bytes_after"],
                  **G.signature(dst),  # inputs, outputs (the fp16 recipe retypes the AR cache), opset
                  "quantization": {"recipe": recipe.name, **{k: v for k, v in settings.items() if k != "fp16_range"}}})
    return entry, info


def capture_feeds_limit(feeds: list[dict[str, Any]], limit: int = 256) -> list[dict[str, Any]]:
    return Q.subsample(feeds, limit)


def _int8_dynamic(o: QuantizeOptions, name: str, prepared: Path, dst: Path, work: Path,
                  feeds: list[dict[str, Any]]) -> dict[str, Any]:
    op_types = ["MatMul", "Gather"]
    if o.per_channel != "auto" or not feeds:
        settings = G.int8_dynamic(prepared, dst, o.per_channel != "off", op_types)
        settings["per_channel_choice"] = o.per_channel if o.per_channel != "auto" else "auto (no calibration inputs: on)"
        return settings
    # "Where it helps": both variants on the calibration inputs, per-channel only if clearly more accurate.
    trials = {}
    sample = Q.subsample(feeds, 16)
    for pc in (False, True):
        path = work / f"{name}.int8-{'pc' if pc else 'pt'}.onnx"
        made = G.int8_dynamic(prepared, path, pc, op_types)
        trials[pc] = (Q.graph_errors(prepared, path, sample, o.threads)["worst_rel_l2"], path, made)
    best = choose_per_channel(trials[False][0], trials[True][0])
    G.save_model(onnx.load(str(trials[best][1])), dst)
    settings = {**trials[best][2], "per_channel": best, "per_channel_choice": "auto",
                "per_channel_rule": f"per-channel if its error is >= {PER_CHANNEL_MIN_GAIN:.0%} below per-tensor's",
                "calibration_rel_l2": {"per_tensor": trials[False][0], "per_channel": trials[True][0]}}
    return settings


# Per-channel scales are not free: onnxruntime's DynamicQuantizeMatMul with a per-column scale took
# 25 us against 18 us per-tensor for one 512x3072 weight at M = 1 (an AR decode step; 20% of the
# int8 AR time on the bench preset). Random weights gain ~1-10% accuracy from it, real weights with
# outlier channels far more, so per-channel must buy at least this much.
PER_CHANNEL_MIN_GAIN = 0.25


def choose_per_channel(per_tensor_error: float, per_channel_error: float) -> bool:
    """The int8-dynamic "auto" rule: per-channel when its calibration error is clearly lower."""
    return per_channel_error <= (1 - PER_CHANNEL_MIN_GAIN) * per_tensor_error


def cache_names(graph: Graph) -> list[str]:
    """The AR planner's cache inputs and outputs (from its manifest config); [] for other graphs."""
    return graph.config.cache_names() if isinstance(graph.config, ArPlannerConfig) else []


def _check_signature(name: str, entry: Graph, path: Path, retyped: Sequence[str] = ()) -> None:
    """Same input/output names and dtypes as the source graph (except `retyped`, the cache whose
    dtype the manifest's kv_cache states): the runtime loads it unchanged."""
    sig = G.signature(path)
    for kind in ("inputs", "outputs"):
        want = [(v.name, "*" if v.name in retyped else v.dtype) for v in getattr(entry, kind)]
        got = [(v["name"], "*" if v["name"] in retyped else v["dtype"]) for v in sig[kind]]
        if want != got:
            diff = next(((w, g) for w, g in zip(want, got) if w != g), (want[len(got):], got[len(want):]))
            raise QuantizeError(f"{name}: the quantised graph's {kind} differ from the fp32 graph's ({diff[0]} -> {diff[1]})")


def _check_placement(folder: Path, target: Target, graphs: dict[str, Graph], selected: list[str]) -> None:
    """Every quantised graph runs on its target's provider, or the recipe is refused (one line)."""
    from glm_image_onnx.export.placement import check_model
    from glm_image_onnx.targets import get_target

    provider = get_target(target.name).provider
    for name in selected:
        report = check_model(onnx.load(str(folder / graphs[name].file), load_external_data=False), name, provider)
        if report.problems:
            raise QuantizeError(f"the result would not run on its target: {report.summary()}; nothing written")


def _assemble(source: Any, src: Path, tmp: Path, entries: dict[str, Any], selected: list[str]) -> dict[str, Graph]:
    """Copy unchanged graphs and every non-graph file; the new package's graphs."""
    graph_files: set[str] = set()
    for g, e in source.graphs.items():
        graph_files.update([e.file, *e.external_data])
    for g, e in source.graphs.items():
        if g in selected:
            continue
        for rel in [e.file, *e.external_data]:
            target = tmp / rel
            if not target.exists():
                shutil.copy2(src / rel, target)
    for rel in source.manifest.files:
        if rel not in graph_files:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, target)
    return {**source.graphs, **read_graphs(entries, strict=True)}


# ------------------------------------------------------------------------------------ evaluation
def _input_names(package: Any, graph: str) -> list[str]:
    return [i.name for i in package.graphs[graph].inputs]


def evaluate(src: Path, new: Path, selected: list[str], o: QuantizeOptions, log: Log) -> dict[str, Any]:
    """The quality report of package `new` against the fp32 package `src` (see `quality`)."""
    ref = capture_mod.open_pipeline(src, o.threads)
    got = capture_mod.open_pipeline(new, o.threads)
    # Every fp32 call made during the evaluation is recorded: those are the fresh graph inputs.
    recorder = capture_mod.Recorder()
    ref.observe_feeds(recorder)
    prompts = [EVAL_PROMPTS[i % len(EVAL_PROMPTS)] for i in range(o.eval_prompts)]
    report: dict[str, Any] = {"prompts": prompts}
    t0 = time.perf_counter()
    ar, priors = Q.ar_agreement(ref, got, prompts, o.height, o.width, compare="ar_planner" in selected)
    if ar:
        report["ar_planner"] = ar
    log(f"  AR agreement done in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    report["end_to_end"] = Q.end_to_end(ref, got, prompts, priors, o.height, o.width, o.steps, o.seed)
    if any(g in I2I_GRAPHS for g in selected) and ref.supports_image_to_image:
        recorder.new_run()
        image = capture_mod.source_image(min(o.height, o.width), o.seed)
        kw = dict(height=o.height, width=o.width, num_inference_steps=o.steps, seed=o.seed, image=image)
        a = ref(prompts[0], **kw).images[0]
        b = got(prompts[0], **kw).images[0]
        ia, ib = np.asarray(a, np.float32) / 255, np.asarray(b, np.float32) / 255
        report["end_to_end"]["image_to_image"] = {"psnr_db": Q.psnr(ia, ib), "ssim": Q.ssim(ia, ib)}
    log(f"  images done in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    report["graphs"] = {}
    for name in selected:
        feeds = recorder.feeds.get(name, [])
        if not feeds:
            report["graphs"][name] = {"cases": 0, "note": "no evaluation inputs captured"}
            continue
        if _input_names(ref.package, name) != _input_names(got.package, name):
            # Another target's contract (a cann AR planner writes by cache_position): the end-to-end
            # comparison above covers it, the reference's feeds do not fit it.
            report["graphs"][name] = {"cases": 0, "note": "inputs differ from the reference graph's"}
            continue
        report["graphs"][name] = Q.graph_errors(ref.package.graph_path(name), new / f"{name}.onnx",
                                                Q.subsample(feeds, 24), o.threads)
    log(f"  graph errors done in {time.perf_counter() - t0:.1f}s")
    return report
