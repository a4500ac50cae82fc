"""Low-memory export (export.streaming): weightless trace, weights streamed from the safetensors.

Its graphs must equal the plain export's (op histogram and initializer contents), its packages must
generate the same tokens and image, and --verify must still run (onnxruntime first, then PyTorch).
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import manifest_of
from glm_image_onnx.export.package import ExportOptions, export_package


def _summary(path: Path) -> tuple[collections.Counter, collections.Counter]:
    import onnx_ir as ir

    model = ir.load(str(path))
    ops = collections.Counter(f"{n.domain}:{n.op_type}" for n in model.graph.all_nodes())
    inits = collections.Counter(
        (str(v.dtype), tuple(v.shape), hashlib.sha256(v.const_value.tobytes()).hexdigest())
        for v in model.graph.initializers.values())
    return ops, inits


def _assert_same_graphs(a: Path, b: Path, graphs: list[str]) -> None:
    for name in graphs:
        ops_a, inits_a = _summary(a / f"{name}.onnx")
        ops_b, inits_b = _summary(b / f"{name}.onnx")
        assert ops_a == ops_b, f"{name}: ops differ: {ops_a - ops_b} vs {ops_b - ops_a}"
        assert inits_a == inits_b, f"{name}: initializer contents differ"


@pytest.fixture(scope="module")
def low_memory_package(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lowmem") / "tiny-low"
    export_package(tiny_checkpoint, out, ExportOptions(verify=True, low_memory=True), log=lambda _: None)
    return out


def test_same_graphs_as_plain_export(tiny_package: Path, low_memory_package: Path) -> None:
    plain, low = manifest_of(tiny_package), manifest_of(low_memory_package)
    assert list(low["graphs"]) == list(plain["graphs"])
    _assert_same_graphs(tiny_package, low_memory_package, list(plain["graphs"]))
    for name, entry in low["graphs"].items():
        ref = plain["graphs"][name]
        assert (entry["inputs"], entry["outputs"]) == (ref["inputs"], ref["outputs"]), name
        assert entry.get("ort_fusions") == ref.get("ort_fusions"), name
        # verified after the export, on the plain export's inputs: the same errors
        assert entry["verify"]["passed"] and entry["verify"]["cases"] == ref["verify"]["cases"], name
        assert entry["verify"]["max_rel"] == pytest.approx(ref["verify"]["max_rel"], rel=1e-3, abs=1e-7), name


def test_same_generation_as_plain_export(tiny_package: Path, low_memory_package: Path) -> None:
    from glm_image_onnx.runtime import GlmImageOnnxPipeline

    outs = []
    for pkg in (tiny_package, low_memory_package):
        pipe = GlmImageOnnxPipeline.from_package(pkg, verify_files=False)
        outs.append(pipe("a red cube", height=64, width=64, num_inference_steps=2, seed=3, do_sample=False))
    a, b = outs
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_external_data_and_shared_weights(tiny_checkpoint: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the external-data threshold (lowered here): weights stream into .data files, and the DiT's
    two graphs then share one weights file, as in the plain export."""
    from glm_image_onnx.export import graph as graph_mod

    monkeypatch.setattr(graph_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    graphs = ("dit_decoder", "dit_condition_write")
    pkgs = {}
    for low in (False, True):
        pkgs[low] = tmp_path / f"dit-{low}"
        export_package(tiny_checkpoint, pkgs[low], ExportOptions(graphs=graphs, low_memory=low, jobs=1),
                       log=lambda _: None)
    manifest = json.loads((pkgs[True] / "manifest.json").read_text())
    for name in graphs:
        assert manifest["graphs"][name]["external_data"] == ["transformer.weights"], name
    assert (pkgs[True] / "transformer.weights").stat().st_size == (pkgs[False] / "transformer.weights").stat().st_size
    _assert_same_graphs(pkgs[False], pkgs[True], list(graphs))


def test_sharded_bf16_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A bf16 checkpoint in shards with an index (the published layout) exports to the fp32 graph of
    its upcast weights, what from_pretrained gives the plain export."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    ck = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    single = ck / "vae" / "diffusion_pytorch_model.safetensors"
    state = {k: v.to(torch.bfloat16) for k, v in load_file(single).items()}
    single.unlink()
    keys = list(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, ck / "vae" / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (ck / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    pkgs = {}
    for low in (False, True):
        pkgs[low] = tmp_path / f"vae-{low}"
        export_package(ck, pkgs[low], ExportOptions(graphs=("vae_decoder",), low_memory=low, jobs=1),
                       log=lambda _: None)
    _assert_same_graphs(pkgs[False], pkgs[True], ["vae_decoder"])


@pytest.mark.parametrize("dtype,graphs", [("fp16", ("ar_planner", "dit_decoder")), ("bf16", ("vae_decoder",))])
def test_half_precision_same_as_plain(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      dtype: str, graphs: tuple[str, ...]) -> None:
    """fp16 / bf16: the weightless fp32 graph converted with each weight read from the checkpoint
    equals precision.convert's graph of the plain export; no fp32 weights are ever written (with
    the threshold at 0 they would be, in data files); the AR planner's KV cache stays native half, as in the plain export."""
    from glm_image_onnx.export import graph as graph_mod
    from glm_image_onnx.export import precision

    monkeypatch.setattr(graph_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    seen: list[tuple[str, int, list[str]]] = []
    convert = precision.convert

    def observed(src, dst, dtype, **kw):  # the real conversion; records what it was given
        files = [f.name for f in graph_mod.onnx_files(src)[1:] if f.exists()]
        seen.append((Path(src).name, len(kw.get("weights") or {}), files))
        return convert(src, dst, dtype, **kw)

    monkeypatch.setattr(precision, "convert", observed)
    pkgs = {}
    for low in (False, True):
        pkgs[low] = tmp_path / f"{dtype}-{low}"
        export_package(tiny_checkpoint, pkgs[low],
                       ExportOptions(graphs=graphs, target="cuda", dtype=dtype, low_memory=low, jobs=1,
                                     verify=(dtype == "fp16")), log=lambda _: None)
    plain, low = manifest_of(pkgs[False]), manifest_of(pkgs[True])
    for name in graphs:
        a, b = plain["graphs"][name], low["graphs"][name]
        assert (a["inputs"], a["outputs"], a["config"]) == (b["inputs"], b["outputs"], b["config"]), name
        assert a["precision"] == b["precision"], name
        assert b["external_data"] == a["external_data"], name
        if dtype == "fp16":
            assert b["verify"]["passed"], name
    _assert_same_graphs(pkgs[False], pkgs[True], list(graphs))
    plain_runs, low_runs = seen[:len(graphs)], seen[len(graphs):]
    assert not any(n for _, n, _ in plain_runs), plain_runs  # the plain export converts what it wrote
    assert low_runs and all(n and not files for _, n, files in low_runs), low_runs  # loaders, no files
