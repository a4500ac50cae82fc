"""A checkpoint folder -> an ONNX package: graphs, tokenizer files and `manifest.json`.

The manifest is the runtime's only contract with the exporter (file names, input/output names,
symbolic shapes, checksums, and the source configs the pipeline needs). The package is built in a
temporary sibling folder and renamed into place at the end, so a failed export leaves nothing that
looks complete.

This module is the entry point (`export_package`, and the names the command line and tests import);
the work is done by the modules beside it, one job each:

- export.options: the graphs, `ExportOptions`, the errors, `ExportRun` (one export under way)
- export.components: loading a checkpoint component, the GraphSpecs made of it
- export.scheduler: which process exports which graph (here, or spawned workers)
- export.component_export, export.low_memory: a component's graphs, loaded whole or streamed
- export.one_graph: one GraphSpec -> one graph file and its manifest entry
- export.manifest_build: the typed manifest records, from the exported graphs and source configs
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from glm_image_onnx.atomic import staged_folder
from glm_image_onnx.export.manifest_build import build_manifest, pipeline_config
from glm_image_onnx.export.options import (EXPORT_MODULES, GRAPHS, LARGE_CHECKPOINT, ExportError, ExportOptions,
                                           ExportRun, ExportUsageError, checkpoint_bytes)
from glm_image_onnx.export.scheduler import Job, default_jobs, run_jobs
from glm_image_onnx.manifest import Layout, Manifest
from glm_image_onnx.models.inspect import inspect_checkpoint

__all__ = ["COPIED_FOLDERS", "EXPORT_MODULES", "GRAPHS", "LARGE_CHECKPOINT", "ExportError", "ExportOptions",
           "ExportUsageError", "checkpoint_bytes", "default_jobs", "export_package", "pipeline_config"]

# Folders copied verbatim: those the package's file layout points into (the runtime tokenises from
# them, without transformers), and the checkpoint's scheduler config, for reference.
COPIED_FOLDERS = (*dict.fromkeys(Path(p).parts[0] for p in dataclasses.astuple(Layout())), "scheduler")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    jobs = _component_jobs(selected)
    workers = min(options.jobs or default_jobs(info), len(jobs)) or 1
    if options.low_memory:
        workers = 1  # parallel workers would each hold a component
    t_start = time.perf_counter()
    with staged_folder(out) as tmp:
        steps = {g: f"[{i + 1}/{len(selected)}]" for i, g in enumerate(selected)}
        results = run_jobs(jobs, ExportRun(info.root, tmp, options, steps, log), workers)
        graphs = {g: results[g] for g in selected}
        for folder in COPIED_FOLDERS:
            shutil.copytree(info.root / folder, tmp / folder)
        manifest = build_manifest(info, options, graphs, tmp, t_start)
        manifest.write(tmp)  # last: a folder without a manifest is never a package
    log(f"wrote {out} ({options.target} {options.dtype}, {len(graphs)} graphs, "
        f"{sum(f.bytes for f in manifest.files.values()) / 1e6:.1f} MB) "
        f"in {manifest.export_seconds:.1f}s with {workers} worker{'s' if workers > 1 else ''}")
    return manifest


def _component_jobs(selected: list[str]) -> list[Job]:
    """One job per checkpoint component that has a selected graph: it loads the weights once and
    exports all its graphs."""
    jobs = [(folder, [g for g in selected if GRAPHS[g] == folder]) for folder in EXPORT_MODULES]
    return [(folder, wanted) for folder, wanted in jobs if wanted]
