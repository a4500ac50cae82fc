"""The command line: bad input gets one readable line and an exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm_image_onnx", *args], capture_output=True,
                          text=True, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and text in errors[0], proc.stderr


def test_export_missing_checkpoint(tmp_path: Path) -> None:
    proc = run_cli("export", str(tmp_path / "missing"), str(tmp_path / "pkg"))
    _assert_one_line_error(proc, 2, "does not exist")
    assert not (tmp_path / "pkg").exists()


def test_export_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    proc = run_cli("export", str(tmp_path), str(tmp_path / "pkg"))
    _assert_one_line_error(proc, 2, "not a GLM-Image checkpoint")


def test_export_unknown_component(tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc = run_cli("export", str(tiny_checkpoint), str(tmp_path / "pkg"), "--components", "unet")
    _assert_one_line_error(proc, 2, "unknown component 'unet'")
    assert not (tmp_path / "pkg").exists()


def test_export_refuses_to_overwrite(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("mine")
    proc = run_cli("export", str(tiny_checkpoint), str(tmp_path / "pkg"), "--components", "vae_decoder")
    _assert_one_line_error(proc, 2, "already exists")
    assert (tmp_path / "pkg" / "keep.txt").read_text() == "mine"


def test_export_truncated_weights_is_one_line_exit_2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ckpt)
    weights = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    proc = run_cli("export", str(ckpt), str(tmp_path / "pkg"), "--components", "vae_decoder")
    _assert_one_line_error(proc, 2, "cannot load vae from")
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("args, text", [
    (("--preset", "huge"), "unknown preset 'huge'"),
    (("--preset", "full"), "add --layers N"),
    (("--preset", "full", "--layers", "0"), "--layers must be >= 1"),
])
def test_init_checkpoint_bad_preset(tmp_path: Path, args: tuple[str, ...], text: str) -> None:
    proc = run_cli("init-checkpoint", *args, str(tmp_path / "ck"))
    _assert_one_line_error(proc, 2, text)
    assert not (tmp_path / "ck").exists()


def test_init_checkpoint_refuses_non_empty(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    proc = run_cli("init-checkpoint", str(tmp_path))
    _assert_one_line_error(proc, 2, "exists and is not empty")
