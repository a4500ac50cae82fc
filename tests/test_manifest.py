"""The manifest schema (glm_image_onnx.manifest): what the exporter writes is what the readers take,
a bad field is named, and the facts it carries (token grid, special tokens, file layout) drive the
runtime and the server rather than constants of theirs."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from tokenizers import Tokenizer

from glm_image_onnx.cli import main
from glm_image_onnx.manifest import (GRAPH_CONFIGS, I2I_GRAPHS, MANIFEST, T2I_GRAPHS, Grid, Layout, Manifest,
                                     ManifestError, to_json)
from glm_image_onnx.runtime import GlmImageOnnxPipeline
from glm_image_onnx.runtime.package import Package, PackageError
from glm_image_onnx.server import glm_image_request as glm
from glm_image_onnx.server.errors import RequestError


def edited_copy(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None],
                moves: dict[str, str] | None = None) -> Path:
    """A copy of package `src` whose manifest `edit` changed; `moves` renames folders (old -> new),
    in the files table too, so that the copy still verifies."""
    shutil.copytree(src, dst)
    moves = moves or {}
    for old, new in moves.items():
        (dst / old).rename(dst / new)
    data = json.loads((dst / MANIFEST).read_text())
    edit(data)

    def moved(rel: str) -> str:
        head, sep, rest = rel.partition("/")
        return f"{moves.get(head, head)}{sep}{rest}"

    data["files"] = {moved(rel): entry for rel, entry in data["files"].items()}
    (dst / MANIFEST).write_text(json.dumps(data))
    return dst


def test_the_exported_manifest_reads_strictly_and_writes_back_unchanged(tiny_package: Path) -> None:
    data = json.loads((tiny_package / MANIFEST).read_text())
    manifest = Manifest.from_dict(data, strict=True)  # no key the schema (and so a reader) lacks
    assert to_json(manifest) == data
    assert manifest.pipeline.grid == Grid() and manifest.pipeline.tokenizers == Layout()


def test_one_list_of_graphs() -> None:
    from glm_image_onnx.export.package import GRAPHS
    from glm_image_onnx.quantize.package import ALL_GRAPHS

    assert list(GRAPHS) == list(GRAPH_CONFIGS) == list(ALL_GRAPHS)
    assert sorted(T2I_GRAPHS + I2I_GRAPHS) == sorted(GRAPH_CONFIGS)


def test_unknown_keys_are_an_error_only_when_strict(tiny_package: Path) -> None:
    data = json.loads((tiny_package / MANIFEST).read_text())
    data["pipeline"]["grid"]["tile_hint"] = 4
    assert Manifest.from_dict(data).pipeline.grid == Grid()  # a newer writer's addition is ignored
    with pytest.raises(ManifestError, match=r"^pipeline\.grid\.tile_hint: not in the manifest schema"):
        Manifest.from_dict(data, strict=True)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["pipeline"]["grid"].update(factor="32"),
     'pipeline.grid.factor: expected an integer, got a string "32"'),
    (lambda d: d["graphs"]["ar_planner"]["config"].pop("num_layers"), "graphs.ar_planner.config.num_layers: missing"),
    (lambda d: d["graphs"]["dit_decoder"]["inputs"][0].update(shape="batch"),
     "graphs.dit_decoder.inputs[0].shape: expected a list"),
    (lambda d: d["graphs"].update(upscaler=d["graphs"]["vae_decoder"]), "graphs.upscaler: not a graph"),
    (lambda d: d["pipeline"]["tokens"].update(vision_vocab_size=7),
     "graphs.ar_planner.config.vision_vocab_size: 136 differs from pipeline.tokens.vision_vocab_size (7)"),
    (lambda d: d["pipeline"]["grid"].update(factor=0), "pipeline.grid.factor: must be >= 1"),
    (lambda d: d["pipeline"].pop("vae"), "pipeline.vae: missing"),
])
def test_a_bad_field_is_named(tiny_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                              edit: Callable[[dict[str, Any]], None], message: str) -> None:
    package = edited_copy(tiny_package, tmp_path / "bad", edit)
    with pytest.raises(PackageError, match=re.escape(message)):
        Package.open(package, verify_files=False)
    assert main(["info", str(package)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_another_grid_drives_the_runtime_and_the_server(tiny_package: Path, tmp_path: Path) -> None:
    # 64-pixel target tokens, each covering 4x4 prior tokens (so the DiT still sees one prior per
    # latent patch: 64 / 4 = 16 = VAE 8 x patch 2), and previews of about 4x4 tokens.
    package = edited_copy(tiny_package, tmp_path / "grid64",
                          lambda d: d["pipeline"]["grid"].update(factor=64, preview_base=4, prior_upsample=4))
    pipe = GlmImageOnnxPipeline.from_package(package, verify_files=False)
    out = pipe("a red fox", height=128, width=192, num_inference_steps=1, seed=0)
    th, tw = 128 // 64, 192 // 64
    ph, pw = int(math.sqrt(th / tw) * 4), int(math.sqrt(tw / th) * 4)
    assert out.tokens.shape == (th * tw + ph * pw,)  # the preview grid first, then the target grid
    assert out.prior_token_ids.shape == (1, th * 4 * tw * 4)
    assert out.prior_token_ids[0, 0] == out.prior_token_ids[0, 3] == out.tokens[ph * pw]  # 4x4 blocks
    assert out.images[0].size == (192, 128)
    with pytest.raises(ValueError, match="height must be a positive multiple of 64, got 96"):
        pipe("a red fox", height=96, width=128)
    limits = glm.Limits().for_package(pipe.image_processor, pipe.grid)
    with pytest.raises(RequestError, match="width must be a positive multiple of 64, got 160"):
        glm.parse({"prompt": np.array([b"a fox"], object), "width": np.array([160], np.int32)}, {}, limits)
    assert glm.parse({"prompt": np.array([b"a fox"], object), "width": np.array([192], np.int32)}, {},
                     limits).width == 192


def test_the_manifests_special_tokens_lay_out_the_prompt(tiny_package: Path, tmp_path: Path) -> None:
    package = edited_copy(tiny_package, tmp_path / "swapped", lambda d: d["pipeline"]["tokens"].update(
        grid_bos_token="<eop>", grid_eos_token="<sop>"))
    ref = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False).ar_inputs("a fox", height=64, width=96)
    got = GlmImageOnnxPipeline.from_package(package, verify_files=False).ar_inputs("a fox", height=64, width=96)
    tokenizer = Tokenizer.from_file(str(package / Layout().ar))
    bos = Manifest.read(package).pipeline.tokens.bos_token
    # 64x96: a 2x3 target grid, then the 13x19 preview; the chat template's own "<sop>" stays
    layout = tokenizer.encode(f"<eop>2 3<sop><eop>13 19<sop>{bos}", add_special_tokens=False).ids
    usual = tokenizer.encode(f"<sop>2 3<eop><sop>13 19<eop>{bos}", add_special_tokens=False).ids
    ref_ids, got_ids = ref.input_ids[0].tolist(), got.input_ids[0].tolist()
    assert ref_ids[-len(usual):] == usual and got_ids[-len(layout):] == layout
    assert got_ids[:-len(layout)] == ref_ids[:-len(usual)]


def test_the_manifests_file_layout_places_the_tokenizers(tiny_package: Path, tmp_path: Path) -> None:
    def edit(d: dict[str, Any]) -> None:
        files = d["pipeline"]["tokenizers"]
        d["pipeline"]["tokenizers"] = {k: v.replace("processor/", "ar_tokenizer/") for k, v in files.items()}
        d["pipeline"]["tokenizers"]["glyph"] = "glyph_tokenizer"

    package = edited_copy(tiny_package, tmp_path / "moved", edit,
                          {"processor": "ar_tokenizer", "tokenizer": "glyph_tokenizer"})
    assert not (package / "processor").exists() and not (package / "tokenizer").exists()
    settings = dict(prompt='a sign that says "OPEN"', height=64, width=64, num_inference_steps=2, seed=3)
    got = GlmImageOnnxPipeline.from_package(package, verify_files="full")(**settings)
    ref = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False)(**settings)
    assert np.array_equal(got.tokens, ref.tokens)
    assert np.array_equal(np.asarray(got.images[0]), np.asarray(ref.images[0]))


def test_info_shows_the_package(tiny_package: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(tiny_package)]) == 0
    text = capsys.readouterr().out
    manifest = Manifest.read(tiny_package)
    for name, graph in manifest.graphs.items():
        assert f"  {name}: {graph.dtype}, {graph.bytes / 1e6:.1f} MB" in text
    assert "token grid 32 px" in text and f"target {manifest.target.name}" in text
    assert main(["info", str(tiny_package), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == to_json(manifest)
