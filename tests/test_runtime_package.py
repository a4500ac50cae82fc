"""Opening a package: the manifest's format and every file's sha256 are checked, errors name the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from glm_image_onnx.runtime import GlmImageOnnxPipeline, Package, PackageError


@pytest.fixture()
def package_copy(tiny_package: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_package, tmp_path / "pkg"))


def test_opens_and_lists_graphs(tiny_package: Path) -> None:
    pkg = Package.open(tiny_package)
    assert pkg.has("ar_planner") and pkg.graph_path("dit_decoder").is_file()
    with pytest.raises(PackageError, match="no 'unet' graph"):
        pkg.graph_path("unet")


def test_corrupt_graph_is_named(package_copy: Path) -> None:
    path = package_copy / "vae_decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"vae_decoder\.onnx does not match its sha256"):
        Package.open(package_copy)
    Package.open(package_copy, verify_files=False)  # the opt-out for huge packages


def test_missing_tokenizer_file_is_named(package_copy: Path) -> None:
    (package_copy / "processor" / "tokenizer.json").unlink()
    with pytest.raises(PackageError, match=r"processor/tokenizer\.json is missing"):
        Package.open(package_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    (lambda m: m.update(format_version=1), "format_version 1 .* re-export the checkpoint"),
    (lambda m: m.update(format="something-else"), "not a glm-image-onnx manifest"),
    (lambda m: m.pop("graphs"), "manifest.json: graphs: missing"),
])
def test_bad_manifest(package_copy: Path, edit, message: str) -> None:
    path = package_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=message):
        Package.open(package_copy)


def test_malformed_or_missing_manifest(package_copy: Path, tmp_path: Path) -> None:
    (package_copy / "manifest.json").write_text("{ not json")
    with pytest.raises(PackageError, match="manifest.json is malformed"):
        Package.open(package_copy)
    (package_copy / "manifest.json").unlink()
    with pytest.raises(PackageError, match="manifest.json is missing"):
        GlmImageOnnxPipeline.from_package(package_copy)
    with pytest.raises(PackageError, match="does not exist"):
        Package.open(tmp_path / "nowhere")


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 48}, "height must be a positive multiple of 32"),
    ({"width": 0}, "width must be a positive multiple of 32"),
    ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"latents": __import__("numpy").zeros((1, 4, 3, 3), "float32")}, "latents must have shape"),
    ({"image": ["not an image"]}, r"image\[0\]: expected a PIL image"),
])
def test_bad_call_arguments(tiny_package: Path, kwargs: dict, message: str) -> None:
    pipe = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False)
    args = {"height": 64, "width": 64, "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **args)
