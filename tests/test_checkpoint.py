"""Random checkpoints: the published layout, loadable by diffusers, recognised and checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from glm_image_onnx.models.checkpoint import COMPONENT_FOLDERS
from glm_image_onnx.models.inspect import CheckpointError, inspect_checkpoint


def test_layout_and_recognised_preset(tiny_checkpoint: Path) -> None:
    for folder in COMPONENT_FOLDERS:
        assert (tiny_checkpoint / folder).is_dir(), folder
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "GlmImagePipeline"
    info = inspect_checkpoint(tiny_checkpoint)
    assert info.preset == "tiny"


def test_diffusers_pipeline_loads_and_runs(tiny_checkpoint: Path) -> None:
    import numpy as np
    import torch
    from diffusers import GlmImagePipeline

    pipe = GlmImagePipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a sign that says 'OPEN'", height=64, width=96, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np")
    image = out.images[0]
    assert image.shape == (64, 96, 3)
    assert np.isfinite(image).all() and image.std() > 0


def test_same_seed_same_weights(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from glm_image_onnx.models.checkpoint import write_checkpoint
    from glm_image_onnx.models.presets import TINY

    again = write_checkpoint(TINY, tmp_path / "again", seed=0)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes()


def _copy_configs(src: Path, dst: Path) -> Path:
    """A checkpoint copy without weights: inspection reads configs only."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


@pytest.mark.parametrize(
    "folder, key, value, message",
    [
        (".", "_class_name", "StableDiffusionPipeline", "not a GLM-Image checkpoint"),
        ("transformer", "_class_name", "FluxTransformer2DModel", "expected GlmImageTransformer2DModel"),
        ("transformer", "text_embed_dim", 999, "transformer.text_embed_dim (999) must equal text_encoder.d_model"),
        ("transformer", "in_channels", 7, "transformer.in_channels (7) must equal vae.latent_channels"),
    ],
)
def test_inspect_rejects_other_architectures(tmp_path: Path, tiny_checkpoint: Path, folder: str,
                                             key: str, value: object, message: str) -> None:
    ckpt = _copy_configs(tiny_checkpoint, tmp_path / "ck")
    path = ckpt / ("model_index.json" if folder == "." else f"{folder}/config.json")
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inspect_checkpoint(ckpt)


def test_inspect_names_missing_pieces(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nowhere")
    ckpt = _copy_configs(tiny_checkpoint, tmp_path / "ck")
    shutil.rmtree(ckpt / "processor")
    with pytest.raises(CheckpointError, match="processor is missing"):
        inspect_checkpoint(ckpt)
    (ckpt / "vae" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="vae/config.json is not valid JSON"):
        inspect_checkpoint(ckpt)


def test_full_preset_matches_published_sizes() -> None:
    from glm_image_onnx.models.presets import FULL

    # The facts note's public sizes: AR 4096 x 40 layers, 32/2 heads, 168064 vocab; DiT 30 x 32 x 128.
    assert (FULL.ar.hidden_size, FULL.ar.num_layers, FULL.ar.num_heads, FULL.ar.num_kv_heads) == (4096, 40, 32, 2)
    assert FULL.ar.vision_vocab_size + FULL.ar.text_vocab_extra == 168064
    assert (FULL.dit.num_layers, FULL.dit.num_heads, FULL.dit.head_dim) == (30, 32, 128)
    assert FULL.glyph.d_model == 1472
