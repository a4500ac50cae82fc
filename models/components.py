"""Preset -> the real torch modules (random weights), one builder per component.

Torch, transformers and diffusers are imported inside the functions: `models` is part of the
export side, but importing `glm_image_onnx.models.presets` must stay cheap.
"""

from __future__ import annotations

from typing import Any

from glm_image_onnx.models.presets import Preset

# The AR vocabulary layout: [codebook | image start | image end | ... up to vision_vocab_size]
# then byte tokens and the special text tokens. `models.tokenizer` builds the matching tokenizer.


def ar_token_ids(preset: Preset) -> dict[str, int]:
    """Token ids fixed by the vocabulary layout (see models.tokenizer)."""
    from glm_image_onnx.models.tokenizer import vocabulary

    vocab = vocabulary(preset)
    return {
        "image_start_token_id": preset.ar.codebook_size,
        "image_end_token_id": preset.ar.codebook_size + 1,
        "image_token_id": vocab["<|image|>"],
        "pad_token_id": vocab["<|endoftext|>"],
        "vocab_size": len(vocab),
    }


def glm_image_config(preset: Preset) -> Any:
    from transformers import GlmImageConfig

    ar = preset.ar
    ids = ar_token_ids(preset)
    return GlmImageConfig(
        text_config={
            "vocab_size": ids["vocab_size"],
            "hidden_size": ar.hidden_size,
            "intermediate_size": ar.intermediate_size,
            "num_hidden_layers": ar.num_layers,
            "num_attention_heads": ar.num_heads,
            "num_key_value_heads": ar.num_kv_heads,
            "max_position_embeddings": ar.max_position_embeddings,
            "vision_vocab_size": ar.vision_vocab_size,
            "pad_token_id": ids["pad_token_id"],
            "eos_token_id": ids["image_end_token_id"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": list(ar.mrope_section),
                "partial_rotary_factor": ar.partial_rotary_factor,
            },
        },
        vision_config={
            "depth": ar.vision_depth,
            "hidden_size": ar.vision_hidden,
            "num_heads": ar.vision_heads,
            "intermediate_size": ar.vision_intermediate,
            "patch_size": ar.vision_patch,
            "image_size": 2048,
        },
        vq_config={
            "embed_dim": ar.vq_embed_dim,
            "num_embeddings": ar.codebook_size,
            "latent_channels": ar.vision_hidden,
        },
        image_token_id=ids["image_token_id"],
        image_start_token_id=ids["image_start_token_id"],
        image_end_token_id=ids["image_end_token_id"],
    )


def build_ar_planner(preset: Preset) -> Any:
    from transformers import GlmImageForConditionalGeneration

    import torch

    model = GlmImageForConditionalGeneration(glm_image_config(preset))
    # Random weights would sample end-of-image or non-codebook ids early, which diffusers' pipeline
    # (our reference) cannot handle. Zero those lm_head rows (logit 0) and sharpen the codebook
    # rows so that their top logits stand far above 0, as a trained planner's do.
    with torch.no_grad():
        head = model.lm_head.weight
        head[preset.ar.codebook_size:] = 0.0
        head[: preset.ar.codebook_size] *= 8.0
    # Generation defaults of the published checkpoint (sampled; greedy repeats itself).
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.9
    model.generation_config.top_p = 0.75
    model.generation_config.top_k = preset.ar.vision_vocab_size  # the whole image vocabulary
    model.generation_config.eos_token_id = preset.ar.codebook_size + 1
    model.generation_config.pad_token_id = ar_token_ids(preset)["pad_token_id"]
    return model.eval()


def build_glyph_encoder(preset: Preset) -> Any:
    from transformers import T5Config, T5EncoderModel

    g = preset.glyph
    config = T5Config(
        vocab_size=384,  # ByT5: 3 specials + 256 bytes + 125 extra ids
        d_model=g.d_model,
        d_kv=g.d_kv,
        d_ff=g.d_ff,
        num_layers=g.num_layers,
        num_heads=g.num_heads,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def build_dit_decoder(preset: Preset) -> Any:
    from diffusers import GlmImageTransformer2DModel

    d = preset.dit
    return GlmImageTransformer2DModel(
        patch_size=d.patch_size,
        in_channels=preset.vae.latent_channels,
        out_channels=preset.vae.latent_channels,
        num_layers=d.num_layers,
        attention_head_dim=d.head_dim,
        num_attention_heads=d.num_heads,
        text_embed_dim=preset.glyph.d_model,
        time_embed_dim=d.time_embed_dim,
        condition_dim=d.condition_dim,
        prior_vq_quantizer_codebook_size=preset.ar.codebook_size,
    ).eval()


def build_vae(preset: Preset, seed: int = 0) -> Any:
    import torch
    from diffusers import AutoencoderKL

    v = preset.vae
    n = len(v.block_out_channels)
    gen = torch.Generator().manual_seed(seed + 1)
    # Non-trivial latent statistics so that de-normalisation is exercised.
    mean = (torch.randn(v.latent_channels, generator=gen) * 0.1).tolist()
    std = (torch.rand(v.latent_channels, generator=gen) * 0.5 + 0.75).tolist()
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=tuple(v.block_out_channels),
        layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_num_groups,
        sample_size=v.sample_size,
        use_quant_conv=v.quant_convs,
        use_post_quant_conv=v.quant_convs,
        mid_block_add_attention=v.mid_attention,
        latents_mean=mean,
        latents_std=std,
    ).eval()
