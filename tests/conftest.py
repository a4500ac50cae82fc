"""Shared fixtures: tiny random checkpoints of the real classes, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from glm_image_onnx.models.checkpoint import write_checkpoint
    from glm_image_onnx.models.presets import TINY

    return write_checkpoint(TINY, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with --verify (every graph)."""
    from glm_image_onnx.export.package import ExportOptions, export_package

    out = tmp_path_factory.mktemp("pkg") / "tiny-onnx"
    export_package(tiny_checkpoint, out, ExportOptions(verify=True), log=lambda _: None)
    return out
