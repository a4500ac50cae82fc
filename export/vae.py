"""GraphSpecs for the VAE (`AutoencoderKL`): vae_decoder and vae_encoder.

The host does the latent (de-)normalisation with `latents_mean` / `latents_std` from the config:
the decoder takes `latents * std + mean`, the encoder returns the mode before `(x - mean) / std`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from glm_image_onnx.models.dit_wrappers import VaeDecoder, VaeEncoder
from glm_image_onnx.targets import TARGETS, Target
from glm_image_onnx.export.graph import GraphSpec

# (batch, latent height, latent width): none is the export example's (2, 3, 5).
_VERIFY_SHAPES = [(1, 4, 4), (2, 2, 6), (1, 7, 3)]


def _vae_config(model: Any) -> dict[str, Any]:
    c = model.config
    n = int(c.latent_channels)
    return {
        "scale_factor": 2 ** (len(c.block_out_channels) - 1),
        "latent_channels": n,
        "in_channels": int(c.in_channels),
        "out_channels": int(c.out_channels),
        "latents_mean": list(c.latents_mean) if c.latents_mean is not None else [0.0] * n,
        "latents_std": list(c.latents_std) if c.latents_std is not None else [1.0] * n,
    }


def graph_specs(model: Any, checkpoint_dir: Path, target: Target = TARGETS["cpu"]) -> list[GraphSpec]:
    """Specs for the loaded AutoencoderKL (fp32, eval; tiling and slicing off)."""
    model = model.eval()
    if getattr(model, "use_tiling", False) or getattr(model, "use_slicing", False):
        raise ValueError("export the VAE with tiling and slicing disabled")
    cfg = _vae_config(model)
    f, c = cfg["scale_factor"], cfg["latent_channels"]
    batch, h, w = Dim("batch"), Dim("latent_h"), Dim("latent_w")

    def decoder_cases(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        return [{"latents": torch.randn(b, c, lh, lw, generator=gen)} for b, lh, lw in _VERIFY_SHAPES]

    def encoder_cases(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        return [{"sample": torch.rand(b, cfg["in_channels"], f * lh, f * lw, generator=gen) * 2 - 1}
                for b, lh, lw in _VERIFY_SHAPES]

    decoder = GraphSpec(
        name="vae_decoder",
        module=VaeDecoder(model).eval(),
        example_inputs={"latents": torch.randn(2, c, 3, 5)},
        dynamic_shapes={"latents": {0: batch, 2: h, 3: w}},
        output_names=["sample"],
        verify_inputs=decoder_cases,
        description="VAE decoder: de-normalised latents (latents * std + mean) -> image in [-1, 1].",
        config=cfg,
    )
    encoder = GraphSpec(
        name="vae_encoder",
        module=VaeEncoder(model).eval(),
        example_inputs={"sample": torch.rand(2, cfg["in_channels"], f * 3, f * 5) * 2 - 1},
        # Only multiples of the scale factor: the pipeline crops condition images to them.
        dynamic_shapes={"sample": {0: batch, 2: f * h, 3: f * w}},
        output_names=["latent"],
        verify_inputs=encoder_cases,
        description="VAE encoder: image in [-1, 1] (H, W multiples of scale_factor) -> latent "
                    "distribution mode, before (x - mean) / std.",
        config=cfg,
    )
    return [decoder, encoder]
