"""Model-family presets: one frozen description of every component's sizes.

`tiny` is for tests (runs end to end in about a second), `bench` is weight-dominated for
benchmarks, `full` is the published GLM-Image configuration (`../shared/notes/real-configs.md`):
a real checkpoint folder is recognised by it, and `full.with_layers(n)` builds checkpoints of every
published width with few layers. `tiny-published` has tiny widths but the published structure
(token-id layout, vocabulary, VAE flags, processor limits). A preset is plain data;
`models.checkpoint` turns it into torch modules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# The AR vocabulary starts with the image codebook ("<|dit_token_N|>"), followed by the image
# start/end tokens; the lm_head covers only this image vocabulary (`vision_vocab_size`).


@dataclass(frozen=True)
class ArPlannerSizes:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    codebook_size: int  # VQ codebook entries; image start/end ids follow it
    vision_vocab_size: int  # lm_head rows (>= codebook_size + 2)
    text_vocab_extra: int  # text tokens after the image vocabulary (tokenizer builds them)
    mrope_section: tuple[int, int, int]
    partial_rotary_factor: float
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    vision_patch: int
    vq_embed_dim: int
    max_position_embeddings: int = 131072


@dataclass(frozen=True)
class DitSizes:
    num_layers: int
    num_heads: int
    head_dim: int
    time_embed_dim: int
    condition_dim: int
    patch_size: int = 2


@dataclass(frozen=True)
class GlyphEncoderSizes:
    d_model: int
    num_layers: int
    num_heads: int
    d_kv: int
    d_ff: int


@dataclass(frozen=True)
class VaeSizes:
    block_out_channels: tuple[int, ...]
    latent_channels: int
    norm_num_groups: int
    layers_per_block: int = 1
    quant_convs: bool = True  # use_quant_conv / use_post_quant_conv (the published VAE has neither)
    mid_attention: bool = True  # mid_block_add_attention
    sample_size: int = 1024  # the tile size of diffusers' tiled decode


@dataclass(frozen=True)
class Preset:
    name: str
    ar: ArPlannerSizes
    dit: DitSizes
    glyph: GlyphEncoderSizes
    vae: VaeSizes
    # The published tokenizer/processor layout: a 168064-token vocabulary with the GLM-4 specials
    # at their published ids (`<|image|>` 167855), no role tokens in the chat template, 512..2048 px.
    published_layout: bool = False

    def with_changes(self, **parts: Any) -> "Preset":
        """A copy with whole parts replaced, e.g. `ar=replace(p.ar, num_heads=8)`."""
        return replace(self, **parts)

    def with_layers(self, n: int) -> "Preset":
        """Every width kept, `n` layers in each stack (AR planner, vision encoder, glyph encoder, DiT)."""
        if n < 1:
            raise ValueError(f"--layers must be >= 1, got {n}")
        return replace(self, name=f"{self.name}-{n}l",
                       ar=replace(self.ar, num_layers=n, vision_depth=n),
                       glyph=replace(self.glyph, num_layers=n), dit=replace(self.dit, num_layers=n))


TINY = Preset(
    name="tiny",
    ar=ArPlannerSizes(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        codebook_size=128, vision_vocab_size=136, text_vocab_extra=0,
        mrope_section=(2, 1, 1), partial_rotary_factor=0.5,
        vision_hidden=32, vision_depth=2, vision_heads=2, vision_intermediate=64, vision_patch=16,
        vq_embed_dim=32, max_position_embeddings=4096,
    ),
    dit=DitSizes(num_layers=2, num_heads=2, head_dim=16, time_embed_dim=32, condition_dim=16),
    glyph=GlyphEncoderSizes(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64),
    vae=VaeSizes(block_out_channels=(8, 16, 16, 16), latent_channels=4, norm_num_groups=4),
)

# Tens of millions of parameters per stage: weights, not Python, dominate every stage.
BENCH = Preset(
    name="bench",
    ar=ArPlannerSizes(
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1536,
        codebook_size=1024, vision_vocab_size=1152, text_vocab_extra=0,
        mrope_section=(8, 12, 12), partial_rotary_factor=1.0,
        vision_hidden=256, vision_depth=4, vision_heads=4, vision_intermediate=1024, vision_patch=16,
        vq_embed_dim=256, max_position_embeddings=8192,
    ),
    dit=DitSizes(num_layers=6, num_heads=8, head_dim=64, time_embed_dim=256, condition_dim=128),
    glyph=GlyphEncoderSizes(d_model=256, num_layers=4, num_heads=4, d_kv=64, d_ff=1024),
    vae=VaeSizes(block_out_channels=(32, 64, 128, 128), latent_channels=16, norm_num_groups=32),
)

# The published GLM-Image configuration. Built here only with few layers (`with_layers`).
FULL = Preset(
    name="full",
    ar=ArPlannerSizes(
        hidden_size=4096, num_layers=40, num_heads=32, num_kv_heads=2, intermediate_size=13696,
        codebook_size=16384, vision_vocab_size=16512, text_vocab_extra=168064 - 16512,
        mrope_section=(8, 12, 12), partial_rotary_factor=0.5,
        vision_hidden=1536, vision_depth=40, vision_heads=16, vision_intermediate=6144, vision_patch=16,
        vq_embed_dim=2048,
    ),
    dit=DitSizes(num_layers=30, num_heads=32, head_dim=128, time_embed_dim=512, condition_dim=256),
    glyph=GlyphEncoderSizes(d_model=1472, num_layers=12, num_heads=6, d_kv=64, d_ff=3584),
    vae=VaeSizes(block_out_channels=(128, 512, 1024, 1024), latent_channels=16, norm_num_groups=32,
                 layers_per_block=3, quant_convs=False, mid_attention=False),
    published_layout=True,
)

# Tiny widths, published structure: what the suite compares with diffusers at 512x512.
TINY_PUBLISHED = Preset(
    name="tiny-published",
    ar=replace(TINY.ar, codebook_size=FULL.ar.codebook_size, vision_vocab_size=FULL.ar.vision_vocab_size,
               text_vocab_extra=FULL.ar.text_vocab_extra, max_position_embeddings=8192),
    dit=TINY.dit,
    glyph=TINY.glyph,
    vae=replace(FULL.vae, block_out_channels=(8, 16, 16, 16), norm_num_groups=4),
    published_layout=True,
)

# The demo model's sizes (`models/demo_train.py` trains it, `models/demo/` ships it): small enough to
# train on a 2-core CPU, large enough to draw a legible word. The codebook's first 92 entries are
# the demo scene's tokens (`models/demo_scene.py`); the vision tokenizer is not trained.
DEMO = Preset(
    name="demo",
    ar=ArPlannerSizes(
        hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=384,
        codebook_size=96, vision_vocab_size=104, text_vocab_extra=0,
        mrope_section=(4, 6, 6), partial_rotary_factor=1.0,
        vision_hidden=32, vision_depth=1, vision_heads=2, vision_intermediate=64, vision_patch=16,
        vq_embed_dim=32, max_position_embeddings=4096,
    ),
    dit=DitSizes(num_layers=4, num_heads=4, head_dim=32, time_embed_dim=64, condition_dim=32),
    glyph=GlyphEncoderSizes(d_model=64, num_layers=2, num_heads=2, d_kv=32, d_ff=128),
    vae=VaeSizes(block_out_channels=(16, 32, 64, 64), latent_channels=16, norm_num_groups=8,
                 quant_convs=False, mid_attention=False, sample_size=256),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, BENCH, FULL, TINY_PUBLISHED, DEMO)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
