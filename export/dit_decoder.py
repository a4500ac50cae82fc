"""GraphSpecs for the DiT decoder (`GlmImageTransformer2DModel`): dit_decoder (one step, reading
optional condition K/V) and dit_condition_write (the image-to-image write pass).

All sizes come from `model.config`. Latent height/width are exported as patch_size * Dim, so any
multiple of the patch size works, height and width independently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from glm_image_onnx.models.dit_wrappers import DitConditionWrite, DitDecoder
from glm_image_onnx.targets import TARGETS, Target
from glm_image_onnx.export.graph import GraphSpec

# Verify shapes: (batch, latent patches high, latent patches wide, text length). None of them is
# the export example's, and they cover batch 1 and 2, square and non-square, short and long text.
_VERIFY_SHAPES = [(1, 2, 2, 1), (2, 3, 5, 9), (1, 5, 3, 4), (2, 4, 4, 17)]


def _dit_config(model: Any) -> dict[str, Any]:
    c = model.config
    return {
        "num_layers": int(c.num_layers),
        "num_heads": int(c.num_attention_heads),
        "head_dim": int(c.attention_head_dim),
        "patch_size": int(c.patch_size),
        "in_channels": int(c.in_channels),
        "out_channels": int(c.out_channels),
        "text_embed_dim": int(c.text_embed_dim),
        "prior_codebook_size": int(c.prior_vq_quantizer_codebook_size),
    }


def _step_inputs(cfg: dict[str, Any], batch: int, hp: int, wp: int, text_len: int,
                 gen: torch.Generator | None = None, pad_rows: bool = False) -> dict[str, torch.Tensor]:
    """Random inputs of one denoising step; `pad_rows` pads the text of rows after the first."""
    p = cfg["patch_size"]
    h, w, n = hp * p, wp * p, hp * wp
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    if pad_rows:
        for b in range(1, batch):
            keep = int(torch.randint(1, text_len + 1, (1,), generator=gen))
            mask[b, keep:] = 0
    return {
        "hidden_states": torch.randn(batch, cfg["in_channels"], h, w, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_len, cfg["text_embed_dim"], generator=gen),
        "prior_token_id": torch.randint(0, cfg["prior_codebook_size"], (batch, n), generator=gen),
        "prior_token_drop": torch.rand(batch, n, generator=gen) < 0.5,
        "timestep": torch.rand(batch, generator=gen) * 999.0,
        "target_size": torch.tensor([[8.0 * h, 8.0 * w]] * batch),
        "crop_coords": torch.randint(0, 4, (batch, 2), generator=gen).float() * 8.0,
        "encoder_attention_mask": mask,
    }


def _condition(cfg: dict[str, Any], cond_batch: int, cond_len: int,
               gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    shape = (cfg["num_layers"], cond_batch, cond_len, cfg["num_heads"], cfg["head_dim"])
    return {"condition_keys": torch.randn(*shape, generator=gen),
            "condition_values": torch.randn(*shape, generator=gen)}


def _step_dynamic_shapes(p: int) -> dict[str, Any]:
    batch, text = Dim("batch"), Dim("text_len")
    hp, wp = Dim("latent_hp"), Dim("latent_wp")
    # N = hp * wp is not expressible as a Dim: let the exporter derive it.
    n = Dim.AUTO
    return {
        "hidden_states": {0: batch, 2: p * hp, 3: p * wp},
        "encoder_hidden_states": {0: batch, 1: text},
        "prior_token_id": {0: batch, 1: n},
        "prior_token_drop": {0: batch, 1: n},
        "timestep": {0: batch},
        "target_size": {0: batch},
        "crop_coords": {0: batch},
        "encoder_attention_mask": {0: batch, 1: text},
    }


def graph_specs(model: Any, checkpoint_dir: Path, target: Target = TARGETS["cpu"]) -> list[GraphSpec]:
    """Specs for the loaded GlmImageTransformer2DModel (fp32, eval)."""
    model = model.eval()
    cfg = _dit_config(model)
    p = cfg["patch_size"]
    # The write pass: batch 1 fixed (one condition image per call), like the pipeline.
    hpw, wpw = Dim("cond_hp"), Dim("cond_wp")
    write_example = {
        "hidden_states": torch.randn(1, cfg["in_channels"], 3 * p, 4 * p),
        "prior_token_id": torch.randint(0, cfg["prior_codebook_size"], (1, 12)),
        "target_size": torch.tensor([[8.0 * 3 * p, 8.0 * 4 * p]]),
    }

    def write_cases(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        cases = []
        for hp, wp in ((2, 2), (5, 3), (4, 6)):
            cases.append({
                "hidden_states": torch.randn(1, cfg["in_channels"], hp * p, wp * p, generator=gen),
                "prior_token_id": torch.randint(0, cfg["prior_codebook_size"], (1, hp * wp), generator=gen),
                "target_size": torch.tensor([[8.0 * hp * p, 8.0 * wp * p]]),
            })
        return cases

    write = GraphSpec(
        name="dit_condition_write",
        module=DitConditionWrite(model).eval(),
        example_inputs=write_example,
        dynamic_shapes={"hidden_states": {2: p * hpw, 3: p * wpw}, "prior_token_id": {1: Dim.AUTO},
                        "target_size": None},
        output_names=["condition_keys", "condition_values"],
        verify_inputs=write_cases,
        ort_fusions=True,
        description="i2i condition write pass (empty text, t=0, crop 0, no prior dropped) for one "
                    "normalised condition latent -> per-layer K/V of its image tokens. Several "
                    "condition images: concatenate the outputs along axis 2 (cond_len).",
        config={**cfg, "kv_layout": "[num_layers, batch, cond_len, num_heads, head_dim]",
                "concat_axis": 2},
    )

    # The decoder reads condition K/V: batch 1 (shared) or a divisor of the batch (repeated per row),
    # cond_len 0 without condition images. Example sizes are pairwise distinct and > 1 so that the
    # exporter neither merges nor specialises dynamic axes.
    cond_example = {**_step_inputs(cfg, batch=4, hp=3, wp=5, text_len=6, gen=torch.Generator().manual_seed(1)),
                    **_condition(cfg, cond_batch=2, cond_len=7, gen=torch.Generator().manual_seed(2))}
    cond_shapes = {**_step_dynamic_shapes(p),
                   "condition_keys": {1: Dim("cond_batch"), 2: Dim("cond_len")},
                   "condition_values": {1: Dim("cond_batch"), 2: Dim("cond_len")}}

    def decoder_cases(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        cases = []
        for (b, hp, wp, t), (cb, cl) in zip(_VERIFY_SHAPES, ((1, 0), (1, 15), (1, 0), (2, 16))):
            cases.append({**_step_inputs(cfg, b, hp, wp, t, gen, pad_rows=(b > 1)),
                          **_condition(cfg, cb, cl, gen)})
        return cases

    decoder = GraphSpec(
        name="dit_decoder",
        module=DitDecoder(model).eval(),
        example_inputs=cond_example,
        dynamic_shapes=cond_shapes,
        output_names=["noise_pred"],
        verify_inputs=decoder_cases,
        ort_fusions=True,
        flash_mask_input="encoder_attention_mask",
        description="One DiT denoising step: latent + glyph embeddings + prior ids -> noise prediction. "
                    "condition_keys/values from dit_condition_write are prepended to every layer's "
                    "keys/values (i2i cond branch); pass cond_len 0 without condition images. Their "
                    "batch is 1 (shared) or a divisor of the batch (row i reads cache row i*cb//batch). "
                    "encoder_attention_mask (1 = real token) masks padded text keys so that CFG rows "
                    "with different glyph lengths can share a batch.",
        config={**cfg, "has_encoder_attention_mask": True,
                "kv_layout": "[num_layers, cond_batch, cond_len, num_heads, head_dim]"},
    )
    return [decoder, write]
