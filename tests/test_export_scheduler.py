"""The exporter's parts that need no export to check: a graph's manifest entry is typed and read
through the schema as it is made, and the parent side of the worker pool turns whatever a worker
sends back (or its death) into the export's error."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto, helper

from glm_image_onnx.export import scheduler
from glm_image_onnx.export.manifest_build import graph_entry
from glm_image_onnx.export.options import ExportError, ExportUsageError
from glm_image_onnx.manifest import GlyphEncoderConfig, Graph, ManifestError, Tensor


def _identity_graph(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def test_a_graph_entry_is_typed_by_the_schema_as_it_is_made(tmp_path: Path) -> None:
    path = _identity_graph(tmp_path / "glyph_encoder.onnx")
    entry = graph_entry("glyph_encoder", path, description="d", dtype="fp32",
                        config={"d_model": 8, "num_layers": 1, "vocab_size": 384}, export_seconds=0.5,
                        ort_fusions={}, verify={})
    assert isinstance(entry, Graph) and isinstance(entry.config, GlyphEncoderConfig)
    assert entry.inputs == [Tensor("x", "float32", ["batch", 4])] and entry.outputs[0].name == "y"
    assert entry.opset == 18 and entry.bytes == path.stat().st_size and entry.external_data == []
    assert entry.ort_fusions is None and entry.verify is None  # empty: left out of the manifest
    # a config key the runtime would not take fails here, named, not after the other graphs
    with pytest.raises(ManifestError, match=r"graphs\.glyph_encoder\.config\.d_ff: not in the manifest schema"):
        graph_entry("glyph_encoder", path, description="d", dtype="fp32",
                    config={"d_model": 8, "num_layers": 1, "vocab_size": 384, "d_ff": 2}, export_seconds=0.5)


def _worker(conn: object, task: tuple[str, str] | None = ("vae", "vae_decoder")) -> scheduler._Worker:
    process = SimpleNamespace(join=lambda timeout=None: None, exitcode=-9)
    return scheduler._Worker(process, conn, task)  # type: ignore[arg-type]


def test_a_worker_that_dies_fails_the_export_naming_its_graph() -> None:
    here, there = mp.Pipe()
    there.close()
    with pytest.raises(ExportError, match=r"worker for vae_decoder stopped \(exit code -9\) without a result"):
        _worker(here).receive(lambda line: None)


def test_a_workers_lines_result_and_error_come_through_in_order() -> None:
    here, there = mp.Pipe()
    worker, lines = _worker(here), []
    there.send(("log", "[1/2] vae_decoder: exporting"))
    there.send(("done", "vae_decoder", "entry"))
    there.send(("error", ExportUsageError("cannot load vae"), "Traceback: in the worker\n"))
    assert worker.receive(lines.append) is None and lines == ["[1/2] vae_decoder: exporting"]
    assert worker.receive(lines.append) == ("vae_decoder", "entry")
    with pytest.raises(ExportUsageError, match="cannot load vae") as raised:
        worker.receive(lines.append)
    assert "in the worker" in str(raised.value.__cause__)  # the worker's own traceback, as the cause


class _TwoArgError(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} {b}")


def test_an_error_that_would_not_survive_the_pipe_keeps_its_type_and_message() -> None:
    portable = scheduler._portable(_TwoArgError("bad", "thing"))
    assert isinstance(portable, ExportError) and str(portable) == "_TwoArgError: bad thing"
    usage = ExportUsageError("x")
    assert scheduler._portable(usage) is usage
