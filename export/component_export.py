"""A checkpoint component's graphs, exported from the component loaded whole (in fp32): all the
wanted graphs of one load in this process (`export_component`), or one graph per task in a worker
process that keeps the component it loaded last (`LoadedComponent`); then the big graphs of one
component are made to share one weights file (`share_component_weights`)."""

from __future__ import annotations

import gc
from typing import Any

from glm_image_onnx.export import graph as graph_mod
from glm_image_onnx.export.components import graph_specs, load_component
from glm_image_onnx.export.manifest_build import refreshed_files
from glm_image_onnx.export.one_graph import export_one
from glm_image_onnx.export.options import ExportRun
from glm_image_onnx.manifest import Graph


def export_component(folder: str, wanted: list[str], run: ExportRun) -> dict[str, Graph]:
    """Load one checkpoint component once and export (and verify) the wanted graphs of it."""
    run.log(f"loading {folder} from {run.root / folder}")
    model = load_component(folder, run.root / folder)
    entries: dict[str, Graph] = {}
    for spec in graph_specs(folder, model, run.root, run.options.target):
        if spec.name in wanted:
            entries[spec.name] = export_one(spec, run)
        del spec
        gc.collect()
    del model
    gc.collect()
    return share_component_weights(folder, entries, run)


class LoadedComponent:
    """A worker process's last loaded component, kept for its next task: the graphs of one
    component that land on the same worker share one load."""

    def __init__(self) -> None:
        self.folder: str | None = None
        self.model: Any = None

    def export_graph(self, folder: str, name: str, run: ExportRun) -> Graph:
        """Export (and verify) the graph `name` of `folder`, loading it unless it is the one held."""
        if self.folder != folder:
            self.folder = self.model = None
            gc.collect()  # the previous component goes before the next one is loaded
            run.log(f"loading {folder} from {run.root / folder}")
            self.model = load_component(folder, run.root / folder)
            self.folder = folder
        for spec in graph_specs(folder, self.model, run.root, run.options.target):
            if spec.name == name:
                return export_one(spec, run)
        raise KeyError(name)


def share_component_weights(folder: str, entries: dict[str, Graph], run: ExportRun) -> dict[str, Graph]:
    """Big graphs of one component (the DiT's decoder and condition write) share one weights file;
    nothing to do for a single graph or graphs small enough to hold their weights inline. Returns
    the entries as they are on disk afterwards."""
    if len(entries) < 2 or not any(e.external_data for e in entries.values()):
        return entries
    paths = [run.tmp / e.file for e in entries.values()]
    before = sum(e.bytes for e in entries.values())
    data = graph_mod.share_external_data(paths, f"{folder}.weights")
    shared = {name: refreshed_files(entry, path) for (name, entry), path in zip(entries.items(), paths)}
    after = data.stat().st_size + sum(p.stat().st_size for p in paths)
    run.log(f"{folder}: {len(paths)} graphs share {data.name} ({before / 1e9:.2f} GB -> {after / 1e9:.2f} GB)")
    return shared
