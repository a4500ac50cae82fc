"""Shared fixtures: tiny random checkpoints of the real classes, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from glm_image_onnx.models.checkpoint import write_checkpoint
    from glm_image_onnx.models.presets import TINY

    return write_checkpoint(TINY, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)
