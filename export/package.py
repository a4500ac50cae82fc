"""A checkpoint folder -> an ONNX package: graphs, tokenizer files and `manifest.json`.

The manifest is the runtime's only contract with the exporter (file names, input/output names,
symbolic shapes, checksums, and the source configs the pipeline needs). The package is built in a
temporary sibling folder and renamed into place at the end, so a failed export leaves nothing that
looks complete.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Callable, Iterator

from glm_image_onnx.errors import UsageError
from glm_image_onnx.atomic import staged_folder
from glm_image_onnx.manifest import (FORMAT, FORMAT_VERSION, Defaults, Generation, Grid, Layout, Manifest, Pipeline,
                                     Source, Target, Tokens, Vae, file_table, read_graphs,
                                     token_string_defaults)
from glm_image_onnx.models.inspect import CheckpointInfo, inspect_checkpoint
from glm_image_onnx.runtime.prompt import token_content
from glm_image_onnx.targets import ELEMENT_TYPE, SHAPE_BUCKETS, check_dtype, get_target


# graph name -> checkpoint folder it comes from (also the order of export).
GRAPHS: dict[str, str] = {
    "ar_planner": "vision_language_encoder",
    "vision_tokenizer": "vision_language_encoder",
    "glyph_encoder": "text_encoder",
    "dit_decoder": "transformer",
    "dit_condition_write": "transformer",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}
# checkpoint folder -> export modules (each returns GraphSpecs for the loaded component).
EXPORT_MODULES: dict[str, tuple[str, ...]] = {
    "vision_language_encoder": ("ar_planner", "vision_tokenizer"),
    "text_encoder": ("glyph_encoder",),
    "transformer": ("dit_decoder",),
    "vae": ("vae",),
}
# Folders copied verbatim: those the package's file layout points into (the runtime tokenises from
# them, without transformers), and the checkpoint's scheduler config, for reference.
COPIED_FOLDERS = (*dict.fromkeys(Path(p).parts[0] for p in dataclasses.astuple(Layout())), "scheduler")


class ExportError(RuntimeError):
    """An export that cannot go on; the message is one readable line."""


class ExportUsageError(ExportError, UsageError):
    """An export that cannot start as asked (options, checkpoint, output folder): exit 2."""


@dataclass
class ExportOptions:
    graphs: tuple[str, ...] = tuple(GRAPHS)
    verify: bool = False
    opset: int = 18
    overwrite: bool = False
    seed: int = 0
    jobs: int | None = None  # parallel component exports; None = default_jobs()
    target: str = "cpu"  # glm_image_onnx.targets: the provider the package is built for
    dtype: str | None = None  # None: the target's default (cpu fp32, cuda bf16)
    # Trace weightless models and stream each weight from the checkpoint's safetensors into the
    # graph (export.streaming), the same graphs as without; fp16 / bf16 convert the weightless fp32
    # graph, each weight read from the checkpoint as it is written (precision.convert(weights=...),
    # no fp32 weights on disk). One component at a time; --verify
    # runs onnxruntime first, then loads the fp32 PyTorch model, never both in memory together.
    # None: on for checkpoints of LARGE_CHECKPOINT bytes or more (the real one), off below.
    low_memory: bool | None = None

    def __post_init__(self) -> None:
        try:
            self.dtype = check_dtype(get_target(self.target), self.dtype)
        except ValueError as e:
            raise ExportUsageError(str(e)) from None


def _load_component(folder: str, path: Path) -> Any:
    """The checkpoint component in fp32, eval mode. A file that cannot be read (a truncated
    download, a foreign format) is the caller's to fix: an ExportUsageError naming the folder."""
    try:
        return _from_pretrained(folder, path)
    except KeyError:
        raise
    except Exception as e:  # from_pretrained raises OSError, ValueError, safetensors' own errors, ...
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ExportUsageError(f"cannot load {folder} from {path}: {type(e).__name__}: {first}") from None


def _from_pretrained(folder: str, path: Path) -> Any:
    import torch

    if folder == "vision_language_encoder":
        from transformers import GlmImageForConditionalGeneration as cls

        return cls.from_pretrained(path, dtype=torch.float32).eval()
    if folder == "text_encoder":
        from transformers import T5EncoderModel

        # sdpa fails at dynamo decomposition; eager exports cleanly.
        return T5EncoderModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    if folder == "transformer":
        from diffusers import GlmImageTransformer2DModel

        return GlmImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    if folder == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()
    raise KeyError(folder)


def _first(size: int | list[int]) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def pipeline_config(info: CheckpointInfo) -> Pipeline:
    """What the runtime needs from the source configs besides the graphs."""
    c = info.configs
    ar, vae = c["vision_language_encoder"], c["vae"]
    text = ar["text_config"]
    root = info.root
    layout = Layout()
    tok_cfg = json.loads((root / layout.ar_config).read_text()) if (root / layout.ar_config).exists() else {}
    gen_path = root / "vision_language_encoder" / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    latent_channels = vae["latent_channels"]
    return Pipeline(
        tokens=Tokens(
            image_start_token_id=ar["image_start_token_id"],
            image_end_token_id=ar["image_end_token_id"],
            image_token_id=ar["image_token_id"],
            pad_token_id=text.get("pad_token_id"),
            codebook_size=ar["vq_config"]["num_embeddings"],
            vision_vocab_size=text["vision_vocab_size"],
            **{k: token_content(tok_cfg.get(k, default)) for k, default in token_string_defaults().items()},
        ),
        generation=Generation(**{k: gen[k] for k in ("do_sample", "temperature", "top_p", "top_k") if k in gen}),
        scheduler=c["scheduler"],
        vae=Vae(
            scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            latent_channels=latent_channels,
            latents_mean=vae.get("latents_mean") or [0.0] * latent_channels,
            latents_std=vae.get("latents_std") or [1.0] * latent_channels,
            # the runtime's VAE tile size (diffusers: tile_sample_min_size = sample_size, or its first entry)
            sample_size=_first(vae.get("sample_size", 1024)),
        ),
        # GLM-Image's grid and the copied files' places: the schema's defaults
        grid=Grid(), defaults=Defaults(), tokenizers=layout,
    )


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Above this many bytes of safetensors a checkpoint exports one component at a time, streaming its
# weights (ExportOptions.low_memory): several fully loaded components would not fit beside each other.
LARGE_CHECKPOINT = 2_000_000_000


def checkpoint_bytes(info: CheckpointInfo) -> int:
    return sum(p.stat().st_size for p in info.root.rglob("*.safetensors"))


def default_jobs(info: CheckpointInfo) -> int:
    """Components export in parallel processes only while several fit in memory at once: a small
    checkpoint on a multi-core machine gets 2 workers, a real 9B/7B one exports one at a time."""
    return 2 if (os.cpu_count() or 1) >= 2 and checkpoint_bytes(info) < LARGE_CHECKPOINT else 1


def export_package(checkpoint: Path | str, out: Path | str, options: ExportOptions | None = None,
                   log: Callable[[str], None] = _log) -> Manifest:
    """Export the selected graphs of `checkpoint` into the package folder `out`; returns the manifest."""
    options = options or ExportOptions()
    unknown = [g for g in options.graphs if g not in GRAPHS]
    if unknown:
        raise ExportUsageError(f"unknown component {unknown[0]!r}; choose from {', '.join(GRAPHS)}")
    info = inspect_checkpoint(checkpoint)
    if options.low_memory is None:
        options = dataclasses.replace(options, low_memory=checkpoint_bytes(info) >= LARGE_CHECKPOINT)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not options.overwrite:
            raise ExportUsageError(f"output {out} already exists; pass --overwrite to replace it")
    selected = [g for g in GRAPHS if g in options.graphs]
    # One job per checkpoint component: it loads the weights once and exports all its graphs.
    jobs = [(folder, [g for g in selected if GRAPHS[g] == folder]) for folder in EXPORT_MODULES]
    jobs = [(folder, wanted) for folder, wanted in jobs if wanted]
    workers = min(options.jobs or default_jobs(info), len(jobs)) or 1
    if options.low_memory:
        workers = 1  # parallel workers would each hold a component
    t_start = time.perf_counter()
    with staged_folder(out) as tmp:
        steps = {g: f"[{i + 1}/{len(selected)}]" for i, g in enumerate(selected)}
        results = _run_jobs(jobs, info.root, tmp, options, steps, workers, log)
        graphs = {g: results[g] for g in selected}
        for folder in COPIED_FOLDERS:
            shutil.copytree(info.root / folder, tmp / folder)
        # Graph entries are built as JSON records along the way (workers send them back): the schema
        # reads them here, strictly, so that an export cannot write what the runtime does not take.
        entries = read_graphs(graphs, strict=True)
        manifest = Manifest(
            format=FORMAT, format_version=FORMAT_VERSION, created_by=_created_by(),
            source=Source(str(info.root.resolve()), info.preset), target=_target_record(options),
            opset=options.opset, graphs=entries, pipeline=pipeline_config(info), files=file_table(tmp),
            export_seconds=round(time.perf_counter() - t_start, 3))
        manifest.write(tmp)  # last: a folder without a manifest is never a package
    log(f"wrote {out} ({options.target} {options.dtype}, {len(graphs)} graphs, "
        f"{sum(f.bytes for f in manifest.files.values()) / 1e6:.1f} MB) "
        f"in {manifest.export_seconds:.1f}s with {workers} worker{'s' if workers > 1 else ''}")
    return manifest


def _target_record(options: ExportOptions) -> Target:
    """The manifest's `target`: name and dtype, and for static-shapes targets the length buckets the
    runtime pads to (runtime.shapes)."""
    static = get_target(options.target).static_shapes
    return Target(options.target, options.dtype, SHAPE_BUCKETS if static else None)


def _run_jobs(jobs: list[tuple[str, list[str]]], root: Path, tmp: Path, options: ExportOptions,
              steps: dict[str, str], workers: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the component jobs here (one worker) or one graph per task in spawned processes whose
    log lines come back through a queue, so progress shows as it happens either way."""
    if workers == 1:
        results: dict[str, Any] = {}
        for folder, wanted in jobs:
            results.update(_export_component(folder, wanted, root, tmp, options, steps, log))
        return results
    import multiprocessing as mp

    # One task per graph rather than per component: the DiT alone is ~45% of the work, so whole
    # components cannot be split evenly between two workers. Longest first (LPT); a worker keeps
    # the component it loaded last, so a component's graphs that land on one worker share a load.
    tasks = sorted(((folder, name) for folder, wanted in jobs for name in wanted),
                   key=lambda t: -_GRAPH_COST.get(t[1], 1))
    ctx = mp.get_context("spawn")  # torch and fork do not mix
    # Handed over at worker start (no Manager process to spawn and shut down); a SimpleQueue's put
    # writes to the pipe before it returns, so a finished task's lines are all there.
    lines = ctx.SimpleQueue()
    threads = max(1, (os.cpu_count() or 1) // workers)

    def drain() -> None:
        while not lines.empty():
            log(lines.get())

    # multiprocessing's Pool for its terminate(): once every result is in (or one failed) the
    # workers are stopped, not waited for while they tear down interpreters full of traced models
    # (1-3 s each after their last task; their files are closed and their results sent by then).
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(lines, threads))
    try:
        running = [pool.apply_async(_export_graph, (folder, name, root, tmp, options, steps[name]))
                   for folder, name in tasks]
        while True:
            drain()
            for r in running:
                if r.ready() and not r.successful():
                    r.get()  # re-raises the worker's error here
            waiting = [r for r in running if not r.ready()]
            if not waiting:
                break
            waiting[0].wait(0.2)
        results = {}
        for r in running:
            results.update(r.get())
    finally:
        pool.terminate()
        pool.join()
    drain()
    for folder, wanted in jobs:  # once all of a component's graphs exist, whichever worker wrote them
        _share_component_weights(folder, {g: results[g] for g in wanted}, tmp, log)
    return results


# Export + verify seconds per graph (bench preset, one thread per worker): the pool hands out the
# longest first.
_GRAPH_COST = {"dit_decoder": 24, "ar_planner": 15, "dit_condition_write": 10, "vae_decoder": 7,
               "vae_encoder": 6, "glyph_encoder": 6, "vision_tokenizer": 5}

# Each worker process's own state (set by _init_worker, kept between its tasks): the log queue, its
# torch threads, and the component it loaded last (folder, model), which its next task may reuse.
_lines: Any = None
_threads = 1
_loaded: tuple[str, Any] | None = None


def _init_worker(lines: Any, threads: int) -> None:
    global _lines, _threads
    _lines, _threads = lines, threads


def _export_graph(folder: str, name: str, root: Path, tmp: Path, options: ExportOptions,
                  step: str) -> dict[str, Any]:
    """Export (and verify) one graph in a worker, reusing the component it loaded last."""
    import torch

    global _loaded
    torch.set_num_threads(_threads)  # the workers share the cores
    log = _lines.put
    if _loaded is None or _loaded[0] != folder:
        _loaded = None
        gc.collect()
        log(f"loading {folder} from {root / folder}")
        _loaded = (folder, _load_component(folder, root / folder))
    from glm_image_onnx.export import graph as graph_mod

    for spec in _graph_specs(folder, _loaded[1], root, options.target):
        if spec.name == name:
            return {name: _export_one(spec, tmp, options, step, log, graph_mod)}
    raise KeyError(name)


def _graph_specs(folder: str, model: Any, root: Path, target: str) -> Iterator[Any]:
    """Every GraphSpec the export modules of one checkpoint component make from its model for `target`."""
    for module_name in EXPORT_MODULES[folder]:
        module = importlib.import_module(f"{__package__}.{module_name}")
        yield from module.graph_specs(model, root, get_target(target))


def _export_component(folder: str, wanted: list[str], root: Path, tmp: Path, options: ExportOptions,
                      steps: dict[str, str], log: Callable[[str], None]) -> dict[str, Any]:
    """Load one checkpoint component once and export (and verify) the wanted graphs of it."""
    from glm_image_onnx.export import graph as graph_mod

    if options.low_memory:
        return _export_component_streamed(folder, wanted, root, tmp, options, steps, log)
    log(f"loading {folder} from {root / folder}")
    model = _load_component(folder, root / folder)
    entries: dict[str, Any] = {}
    for spec in _graph_specs(folder, model, root, options.target):
        if spec.name in wanted:
            entries[spec.name] = _export_one(spec, tmp, options, steps[spec.name], log, graph_mod)
        del spec
        gc.collect()
    del model
    gc.collect()
    _share_component_weights(folder, entries, tmp, log)
    return entries


def _export_component_streamed(folder: str, wanted: list[str], root: Path, tmp: Path, options: ExportOptions,
                               steps: dict[str, str], log: Callable[[str], None]) -> dict[str, Any]:
    """`_export_component` without loading the weights (export.streaming); with --verify, each
    graph's onnxruntime outputs are computed first, then the PyTorch model is loaded to compare."""
    from functools import partial

    from glm_image_onnx.export import graph as graph_mod
    from glm_image_onnx.export import streaming

    log(f"tracing {folder} without weights, streaming them from {root / folder}")
    try:
        specs, prov, reader = streaming.component_specs(folder, root, options.target, _graph_specs)
    except KeyError as e:
        raise ExportUsageError(f"--low-memory: {e.args[0]}") from None
    # A graph to convert keeps every weight in its data file, so that the conversion can stream them.
    export = partial(streaming.export_streamed, prov=prov, reader=reader,
                     external=True if options.dtype != "fp32" else None)
    entries: dict[str, Any] = {}
    io: dict[str, Any] = {}  # what verifying needs of each spec: its inputs, output names, in-place buffers
    for spec in specs:
        if spec.name in wanted:
            entries[spec.name] = _export_one(spec, tmp, options, steps[spec.name], log, graph_mod,
                                             export=export, verify_now=False)
            io[spec.name] = SimpleNamespace(verify_inputs=spec.verify_inputs, output_names=spec.output_names,
                                            shared_buffers=spec.shared_buffers)
    del specs, prov, reader, export
    gc.collect()
    if options.verify:
        _verify_streamed(folder, entries, io, root, tmp, options, steps, log, graph_mod)
    _share_component_weights(folder, entries, tmp, log)
    return entries


def _verify_streamed(folder: str, entries: dict[str, Any], io: dict[str, Any], root: Path, tmp: Path,
                     options: ExportOptions, steps: dict[str, str], log: Callable[[str], None],
                     graph_mod: Any) -> None:
    """--verify for low-memory exports, on the plain export's inputs and limit: onnxruntime on every
    case of every graph (one session at a time, outputs kept), then the fp32 PyTorch model, loaded
    once, on the same cases. Peak: the larger of one session and the model, not their sum."""
    import torch

    t0 = time.perf_counter()
    if options.dtype in graph_mod.UNVERIFIED_DTYPES:
        for name, entry in entries.items():
            entry["verify"] = {options.dtype: graph_mod.UNVERIFIED_DTYPES[options.dtype]}
            log(f"{steps[name]} {name}: not verified (not run on CPU: {graph_mod.UNVERIFIED_DTYPES[options.dtype]})")
        return
    cases = {name: spec.verify_inputs(torch.Generator().manual_seed(options.seed)) for name, spec in io.items()}
    outputs = {name: graph_mod.run_onnx(spec, tmp / entries[name]["file"], cases[name]) for name, spec in io.items()}
    gc.collect()
    log(f"loading {folder} from {root / folder} to verify")
    model = _load_component(folder, root / folder)
    # the graph as written (fp16: converted, at that dtype's limit; the fp32 one was not kept)
    limit = graph_mod.MAX_RELATIVE_ERROR_BY_DTYPE.get(options.dtype, graph_mod.MAX_RELATIVE_ERROR)
    for spec in _graph_specs(folder, model, root, options.target):
        if spec.name not in entries:
            continue
        result = graph_mod.compare(spec, cases[spec.name], outputs.pop(spec.name), limit)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["order"] = "low-memory: onnxruntime on every case first, then PyTorch"
        entries[spec.name]["verify"] = _passed(spec.name, result, limit)
        log(f"{steps[spec.name]} {spec.name}: verified on {result['cases']} shapes: max rel error {result['max_rel']:.2e}")
    del model
    gc.collect()


def _share_component_weights(folder: str, entries: dict[str, Any], tmp: Path, log: Callable[[str], None]) -> None:
    """Big graphs of one component (the DiT's decoder and condition write) share one weights file;
    nothing to do for a single graph or graphs small enough to hold their weights inline."""
    if len(entries) < 2 or not any(e["external_data"] for e in entries.values()):
        return
    from glm_image_onnx.export import graph as graph_mod

    paths = [tmp / e["file"] for e in entries.values()]
    before = sum(e["bytes"] for e in entries.values())
    data = graph_mod.share_external_data(paths, f"{folder}.weights")
    for entry, path in zip(entries.values(), paths):
        files = graph_mod.onnx_files(path)
        entry["external_data"] = [f.name for f in files[1:]]
        entry["bytes"] = sum(f.stat().st_size for f in files)
    after = data.stat().st_size + sum(p.stat().st_size for p in paths)
    log(f"{folder}: {len(paths)} graphs share {data.name} ({before / 1e9:.2f} GB -> {after / 1e9:.2f} GB)")


def _export_one(spec: Any, tmp: Path, options: ExportOptions, step: str,
                log: Callable[[str], None], graph_mod: Any, export: Callable[..., dict[str, int]] | None = None,
                verify_now: bool = True) -> dict[str, Any]:
    path = tmp / f"{spec.name}.onnx"
    t0 = time.perf_counter()
    log(f"{step} {spec.name}: exporting")
    target = get_target(options.target)
    streamed_half = options.low_memory and options.dtype != "fp32"
    # A low-memory fp16 / bf16 export writes the fp32 graph without weights where the conversion
    # reads it, which takes each weight from the checkpoint through its loader in `weights`.
    export_path = path.with_name(path.stem + ".fp32.onnx") if streamed_half else path
    weights: dict[str, Callable[[], Any]] = {}
    fusions = (export or graph_mod.export_onnx)(spec, export_path, opset=options.opset, basic_ops=target.static_shapes,
                                                **({"weights": weights} if streamed_half else {}))
    if spec.flash_mask_input and fusions and target.provider == "cpu":
        from glm_image_onnx.export.attention import flash_when_unmasked

        fusions["FlashWhenUnmasked"] = flash_when_unmasked(export_path, spec.flash_mask_input)
    msg = ""
    verify: dict[str, Any] = {}
    if options.verify and verify_now:  # the fp32 graph against PyTorch, always: a conversion below starts from it
        verify = _verified(spec, path, graph_mod, options.seed, graph_mod.MAX_RELATIVE_ERROR)
        msg += f", verified on {verify['cases']} shapes: max rel error {verify['max_rel']:.2e}"
    config = dict(spec.config)
    precision_info = None
    if options.dtype != "fp32":
        from glm_image_onnx.export import precision

        fp32 = path.with_name(path.stem + ".fp32.onnx")
        if export_path != fp32:
            _move_graph(path, fp32, graph_mod)
        try:
            precision_info = precision.convert(fp32, path, options.dtype, native_io=_cache_io(spec),
                                               provider=target.provider, low_memory=options.low_memory,
                                               weights=weights)
        except precision.PrecisionError as e:
            raise ExportError(str(e)) from None
        for f in graph_mod.onnx_files(fp32):
            f.unlink(missing_ok=True)  # a weightless graph's `.unwritten` never existed
        if "kv_cache" in config:
            config["kv_cache"] = {**config["kv_cache"], "dtype": ELEMENT_TYPE[options.dtype]}
        extra = precision_info.get("kept_fp32_for_kernels", {}).get("ops")
        over = precision_info.get("fp16_range", {}).get("overflow_values", 0)
        msg += (f", {options.dtype} ({precision_info['kept_fp32_nodes']} nodes kept fp32"
                + (f"; for lack of {options.dtype} kernels: {', '.join(f'{o} x{n}' for o, n in extra.items())}"
                   if extra else "")
                + (f"; {over} weights beyond +-65504 clamped" if over else "") + ")")
        if "falls_back" in precision_info:
            msg += f"; WARNING, still not all on {options.target}: {precision_info['falls_back']}"
        # (verify_now False: _verify_streamed checks the converted graph after the component's graphs)
        if verify_now and options.verify and options.dtype in graph_mod.MAX_RELATIVE_ERROR_BY_DTYPE:
            converted = _verified(spec, path, graph_mod, options.seed,
                                  graph_mod.MAX_RELATIVE_ERROR_BY_DTYPE[options.dtype])
            verify = {**converted, "fp32": verify}
            msg += f" verified: max rel error {converted['max_rel']:.2e}"
        elif verify_now and options.verify:
            verify = {**verify, options.dtype: graph_mod.UNVERIFIED_DTYPES[options.dtype]}
            msg += f" (not run on CPU: {graph_mod.UNVERIFIED_DTYPES[options.dtype]})"
    elif target.name != "cpu":  # no conversion ran the placement check: run it here
        import onnx

        from glm_image_onnx.runtime.placement import check_model

        report = check_model(onnx.load(str(path), load_external_data=False), spec.name, target.provider)
        if report.problems:
            msg += f"; WARNING, not all on {options.target}: {report.summary()}"
    export_s = time.perf_counter() - t0
    files = graph_mod.onnx_files(path)
    entry: dict[str, Any] = {
        "file": path.name,
        "external_data": [f.name for f in files[1:]],
        "description": spec.description,
        "dtype": options.dtype,
        **graph_mod.signature(path),
        "config": config,
        "export_seconds": round(export_s, 3),
        **({"ort_fusions": fusions} if fusions else {}),
        **({"precision": precision_info} if precision_info else {}),
        **({"verify": verify} if verify else {}),
        "bytes": sum(f.stat().st_size for f in files),
    }
    log(f"{step} {spec.name}: exported in {export_s:.1f}s ({entry['bytes'] / 1e6:.1f} MB){msg}")
    return entry


def _cache_io(spec: Any) -> list[str]:
    """The graph inputs/outputs that take the package dtype: the cache updated in place."""
    return [name for pair in spec.shared_buffers.items() for name in pair]


def _verified(spec: Any, path: Path, graph_mod: Any, seed: int, limit: float) -> dict[str, Any]:
    t1 = time.perf_counter()
    result = graph_mod.verify(spec, path, seed=seed, limit=limit)
    result["seconds"] = round(time.perf_counter() - t1, 3)
    return _passed(spec.name, result, limit)


def _passed(name: str, result: dict[str, Any], limit: float) -> dict[str, Any]:
    """`result` (graph.verify / graph.compare); ExportError naming the worst output above `limit`."""
    if not result["passed"]:
        if result.get("problems"):  # compared nothing, or not every output (graph.compare)
            raise ExportError(f"{name}: verification against PyTorch compared the wrong things: "
                              + "; ".join(result["problems"]))
        worst = max(result["outputs"].items(), key=lambda kv: kv[1]["max_rel"])
        raise ExportError(f"{name}: output {worst[0]!r} differs from PyTorch by "
                          f"{worst[1]['max_rel']:.2e} relative (limit {limit:.0e})")
    return result


def _move_graph(src: Path, dst: Path, graph_mod: Any) -> None:
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


def _created_by() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("glm-image-onnx", "torch", "transformers", "diffusers", "onnx", "onnxruntime"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out

