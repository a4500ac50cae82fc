"""The ONNX package: every graph, a manifest whose checksums and signatures are true, atomic writes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from conftest import manifest_of, measured_errors
from glm_image_onnx.export import graph as graph_mod
from glm_image_onnx.export import one_graph
from glm_image_onnx.export.package import GRAPHS, ExportError, ExportOptions, export_package
from glm_image_onnx.manifest import FORMAT, FORMAT_VERSION, sha256_file


def test_manifest_lists_every_graph_verified(tiny_package: Path) -> None:
    m = manifest_of(tiny_package)
    assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION
    assert set(m["graphs"]) == set(GRAPHS)
    for name, g in m["graphs"].items():
        v = g["verify"]
        assert v["passed"] and v["cases"] >= 3 and "problems" not in v, name
        # every output of the graph was compared, and each one's worst error is within the bound
        assert set(v["outputs"]) == {o["name"] for o in g["outputs"]}, name
        assert all(o["max_rel"] < graph_mod.MAX_RELATIVE_ERROR for o in v["outputs"].values()), (name, v)
        assert v["max_rel"] == max(o["max_rel"] for o in v["outputs"].values()), name
        # verified at several distinct shapes, not only the export shape
        assert len({json.dumps(s, sort_keys=True) for s in v["input_shapes"]}) >= 3, name
    assert m["source"]["preset"] == "tiny"


def test_manifest_checksums_match_files(tiny_package: Path) -> None:
    m = manifest_of(tiny_package)
    on_disk = {p.relative_to(tiny_package).as_posix() for p in tiny_package.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert on_disk == set(m["files"])
    for rel, entry in m["files"].items():
        path = tiny_package / rel
        assert path.stat().st_size == entry["bytes"], rel
        assert sha256_file(path) == entry["sha256"], rel
    for name in GRAPHS:
        assert f"{name}.onnx" in m["files"]
    for rel in ("processor/tokenizer.json", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        assert rel in m["files"], rel


def test_manifest_signatures_match_sessions(tiny_package: Path) -> None:
    m = manifest_of(tiny_package)
    to_np = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(bool)": "bool",
             "tensor(int32)": "int32"}
    for name, g in m["graphs"].items():
        sess = ort.InferenceSession(str(tiny_package / g["file"]), providers=["CPUExecutionProvider"])
        for declared, actual in ((g["inputs"], sess.get_inputs()), (g["outputs"], sess.get_outputs())):
            assert [d["name"] for d in declared] == [a.name for a in actual], name
            assert [d["dtype"] for d in declared] == [to_np[a.type] for a in actual], name
            assert [len(d["shape"]) for d in declared] == [len(a.shape) for a in actual], name
        # the batch axis is symbolic in every graph's first input
        assert any(isinstance(d, str) for d in g["inputs"][0]["shape"]), name
        # the default domain's opset is the one the export asked for, as the manifest states
        opsets = {o.domain or "ai.onnx": o.version
                  for o in onnx.load(str(tiny_package / g["file"]), load_external_data=False).opset_import}
        assert opsets.get("ai.onnx") == g["opset"] == m["opset"] == graph_mod.OPSET, (name, opsets)
    p = m["pipeline"]
    assert p["vae"]["scale_factor"] == 8 and len(p["vae"]["latents_mean"]) == p["vae"]["latent_channels"]
    assert p["tokens"]["image_end_token_id"] == p["tokens"]["image_start_token_id"] + 1
    assert p["scheduler"]["num_train_timesteps"] == 1000


def test_selected_components_only(tiny_checkpoint: Path, tmp_path: Path) -> None:
    m = export_package(tiny_checkpoint, tmp_path / "pkg",
                       ExportOptions(graphs=("glyph_encoder", "vae_decoder")), log=lambda _: None)
    assert set(m.graphs) == {"glyph_encoder", "vae_decoder"}
    assert not (tmp_path / "pkg" / "dit_decoder.onnx").exists()


def test_failed_export_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, ckpt)
    weights = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    logs: list[str] = []
    with pytest.raises(ExportError, match="cannot load vae from .*broken/vae"):
        export_package(ckpt, tmp_path / "pkg", ExportOptions(graphs=("glyph_encoder", "vae_decoder"), jobs=1),
                       log=logs.append)
    assert any("glyph_encoder: exported" in line for line in logs)  # it failed part-way
    assert not (tmp_path / "pkg").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no partial folder left behind
    # the same with parallel workers: the worker's error surfaces and nothing is left
    with pytest.raises(ExportError, match="cannot load vae"):
        export_package(ckpt, tmp_path / "pkg", ExportOptions(graphs=("glyph_encoder", "vae_decoder"), jobs=2),
                       log=logs.append)
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_verify_failure_fails_the_export(tiny_checkpoint: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_mod, "MAX_RELATIVE_ERROR", 0.0)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        # A zero tolerance: any rounding difference must fail the export.
        export_package(tiny_checkpoint, tmp_path / "pkg", ExportOptions(graphs=("dit_decoder",), verify=True),
                       log=lambda _: None)
    assert not (tmp_path / "pkg").exists()


class _Affine(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = torch.nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _affine_spec(n_in: int, n_out: int) -> graph_mod.GraphSpec:
    batch = torch.export.Dim("batch", max=1024)
    return graph_mod.GraphSpec(
        name="affine", module=_Affine(n_in, n_out).eval(),
        example_inputs={"x": torch.randn(2, n_in)}, dynamic_shapes={"x": {0: batch}},
        output_names=["y"],
        verify_inputs=lambda g: [{"x": torch.randn(b, n_in, generator=g)} for b in (1, 3, 5)],
    )


def _check_external(spec: graph_mod.GraphSpec, tmp_path: Path) -> None:
    path = tmp_path / "affine.onnx"
    assert graph_mod.export_onnx(spec, path) == {}  # no onnxruntime fusions asked for
    files = graph_mod.onnx_files(path)
    assert len(files) == 2 and files[1].exists()
    assert path.stat().st_size < 1_000_000  # weights live in the data file
    result = graph_mod.verify(spec, path)
    assert result["passed"], result


def test_verify_reports_the_error_it_measures_and_fails_a_perturbed_graph(tmp_path: Path) -> None:
    """graph.verify's numbers are the ones measured independently here; a graph whose weight is off
    by 1e-2 of the weights' scale fails it, by the error measured here."""
    torch.manual_seed(0)
    spec = _affine_spec(64, 32)
    path = tmp_path / "affine.onnx"
    graph_mod.export_onnx(spec, path)
    result = graph_mod.verify(spec, path)
    mine = measured_errors(spec, path)
    assert set(result["outputs"]) == set(mine) == {"y"} and result["cases"] == 3
    assert result["passed"] and max(mine.values()) < graph_mod.MAX_RELATIVE_ERROR
    assert result["outputs"]["y"]["max_rel"] == pytest.approx(mine["y"], rel=1e-6, abs=1e-12)

    model = onnx.load(str(path))
    [weight] = [t for t in model.graph.initializer if numpy_helper.to_array(t).shape == (32, 64)
                or numpy_helper.to_array(t).shape == (64, 32)]
    w = numpy_helper.to_array(weight).copy()
    w.flat[7] += 1e-2 * np.abs(w).max()
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(model, str(bad))
    result = graph_mod.verify(spec, bad)
    mine = measured_errors(spec, bad)
    assert mine["y"] > graph_mod.MAX_RELATIVE_ERROR  # the perturbation is measurable
    assert not result["passed"] and result["outputs"]["y"]["max_rel"] == pytest.approx(mine["y"], rel=1e-6)
    with pytest.raises(ExportError, match=r"affine: output 'y' differs from PyTorch by .* relative \(limit 1e-04\)"):
        one_graph.passed("affine", result, graph_mod.MAX_RELATIVE_ERROR)


def test_compare_fails_when_it_compares_nothing_or_not_every_output() -> None:
    """graph.compare passes only when every output was compared on every case."""
    torch.manual_seed(0)
    spec = _affine_spec(8, 4)
    cases = spec.verify_inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = [[spec.module(*c.values()).numpy()] for c in cases]  # exactly PyTorch's: error 0
    good = graph_mod.compare(spec, cases, outputs)
    assert good["passed"] and good["max_rel"] == 0.0 and set(good["outputs"]) == {"y"} and "problems" not in good
    for bad_spec, bad_cases, bad_outputs, problem in (
            (spec, cases, [[] for _ in cases], "case 0: PyTorch returned 1 outputs and onnxruntime 0, expected 1 (y)"),
            (spec, cases, outputs[:1], "1 onnxruntime results for 3 cases"),
            (spec, cases, [o + o for o in outputs], "case 0: PyTorch returned 1 outputs and onnxruntime 2"),
            (spec, [], [], "no verification cases"),
            (replace(spec, output_names=["y", "z"]), cases, outputs, "expected 2 (y, z)"),
            (replace(spec, output_names=[]), cases, outputs, "no output names to compare")):
        result = graph_mod.compare(bad_spec, bad_cases, bad_outputs)
        assert result["passed"] is False and any(problem in p for p in result["problems"]), (problem, result)
    # the export stops on such a result, naming what went wrong
    with pytest.raises(ExportError, match="affine: verification against PyTorch compared the wrong things: "
                                          "no verification cases"):
        one_graph.passed("affine", graph_mod.compare(spec, [], []), graph_mod.MAX_RELATIVE_ERROR)


def test_external_data_written_past_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_mod, "EXTERNAL_DATA_THRESHOLD", 1000)
    _check_external(_affine_spec(64, 32), tmp_path)


@pytest.mark.slow
def test_external_data_model_over_2gb(tmp_path: Path) -> None:
    # 16384 x 33000 fp32 = 2.16 GB: protobuf alone cannot hold it.
    _check_external(_affine_spec(16384, 33000), tmp_path)


def test_big_component_graphs_share_one_weights_file(tiny_checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the external-data threshold the DiT's two graphs store their common weights once."""
    from diffusers import GlmImageTransformer2DModel

    from glm_image_onnx.export import dit_decoder

    monkeypatch.setattr(graph_mod, "EXTERNAL_DATA_THRESHOLD", 1000)  # tiny as if it were 7B
    pkg = tmp_path / "pkg"
    m = export_package(tiny_checkpoint, pkg, ExportOptions(graphs=("dit_decoder", "dit_condition_write"), jobs=1),
                       log=lambda _: None)
    for name in ("dit_decoder", "dit_condition_write"):
        assert m.graphs[name].external_data == ["transformer.weights"]
    assert sorted(p.name for p in pkg.iterdir() if p.suffix in (".data", ".weights")) == ["transformer.weights"]
    model = GlmImageTransformer2DModel.from_pretrained(tiny_checkpoint / "transformer").eval()
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert (pkg / "transformer.weights").stat().st_size < 1.3 * weight_bytes  # once, not twice
    for spec in dit_decoder.graph_specs(model, tiny_checkpoint):
        result = graph_mod.verify(spec, pkg / f"{spec.name}.onnx")
        assert result["passed"], (spec.name, result)
    for rel, entry in m.files.items():
        assert sha256_file(pkg / rel) == entry.sha256, rel
