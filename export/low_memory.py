"""The low-memory export of one checkpoint component (ExportOptions.low_memory, CLI --low-memory):
its graphs traced without weights, each weight streamed from the checkpoint (export.streaming);
with --verify, onnxruntime runs every case first and the fp32 PyTorch model is loaded only then,
so that the two are never in memory together."""

from __future__ import annotations

import dataclasses
import gc
import time
from functools import partial
from types import SimpleNamespace
from typing import Any

from glm_image_onnx.export import graph as graph_mod
from glm_image_onnx.export import streaming
from glm_image_onnx.export.component_export import share_component_weights
from glm_image_onnx.export.components import graph_specs, load_component
from glm_image_onnx.export.one_graph import export_one, passed
from glm_image_onnx.export.options import ExportRun, ExportUsageError
from glm_image_onnx.manifest import Graph


def export_component_streamed(folder: str, wanted: list[str], run: ExportRun) -> dict[str, Graph]:
    """component_export.export_component without loading the weights; with --verify, each
    graph's onnxruntime outputs are computed first, then the PyTorch model is loaded to compare."""
    options = run.options
    run.log(f"tracing {folder} without weights, streaming them from {run.root / folder}")
    try:
        specs, prov, reader = streaming.component_specs(folder, run.root, options.target, graph_specs)
    except KeyError as e:
        raise ExportUsageError(f"--low-memory: {e.args[0]}") from None
    # A graph to convert keeps every weight in its data file, so that the conversion can stream them.
    export = partial(streaming.export_streamed, prov=prov, reader=reader,
                     external=True if options.dtype != "fp32" else None)
    entries: dict[str, Graph] = {}
    io: dict[str, Any] = {}  # what verifying needs of each spec: its inputs, output names, in-place buffers
    for spec in specs:
        if spec.name in wanted:
            entries[spec.name] = export_one(spec, run, export=export, verify_now=False)
            io[spec.name] = SimpleNamespace(verify_inputs=spec.verify_inputs, output_names=spec.output_names,
                                            shared_buffers=spec.shared_buffers)
    del specs, prov, reader, export
    gc.collect()
    if options.verify:
        entries = _verify_streamed(folder, entries, io, run)
    return share_component_weights(folder, entries, run)


def _verify_streamed(folder: str, entries: dict[str, Graph], io: dict[str, Any], run: ExportRun) -> dict[str, Graph]:
    """--verify for low-memory exports, on the plain export's inputs and limit: onnxruntime on every
    case of every graph (one session at a time, outputs kept), then the fp32 PyTorch model, loaded
    once, on the same cases. Peak: the larger of one session and the model, not their sum.
    Returns the entries with their `verify` records."""
    import torch

    options = run.options
    t0 = time.perf_counter()
    if options.dtype in graph_mod.UNVERIFIED_DTYPES:
        why = graph_mod.UNVERIFIED_DTYPES[options.dtype]
        for name in entries:
            run.log(f"{run.steps[name]} {name}: not verified (not run on CPU: {why})")
        return {name: dataclasses.replace(e, verify={options.dtype: why}) for name, e in entries.items()}
    cases = {name: spec.verify_inputs(torch.Generator().manual_seed(options.seed)) for name, spec in io.items()}
    outputs = {name: graph_mod.run_onnx(spec, run.tmp / entries[name].file, cases[name]) for name, spec in io.items()}
    gc.collect()
    run.log(f"loading {folder} from {run.root / folder} to verify")
    model = load_component(folder, run.root / folder)
    # the graph as written (fp16: converted, at that dtype's limit; the fp32 one was not kept)
    limit = graph_mod.MAX_RELATIVE_ERROR_BY_DTYPE.get(options.dtype, graph_mod.MAX_RELATIVE_ERROR)
    verified = dict(entries)
    for spec in graph_specs(folder, model, run.root, options.target):
        if spec.name not in entries:
            continue
        result = graph_mod.compare(spec, cases[spec.name], outputs.pop(spec.name), limit)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["order"] = "low-memory: onnxruntime on every case first, then PyTorch"
        verified[spec.name] = dataclasses.replace(entries[spec.name], verify=passed(spec.name, result, limit))
        run.log(f"{run.steps[spec.name]} {spec.name}: verified on {result['cases']} shapes: "
                f"max rel error {result['max_rel']:.2e}")
    del model
    gc.collect()
    return verified
