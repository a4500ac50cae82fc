"""Write a randomly initialised GLM-Image checkpoint in the published diffusers folder layout."""

from __future__ import annotations

import json
from pathlib import Path

from glm_image_onnx.atomic import staged_folder
from glm_image_onnx.models.presets import Preset

COMPONENT_FOLDERS = ("vision_language_encoder", "text_encoder", "transformer", "vae",
                     "scheduler", "tokenizer", "processor")


def scheduler_config() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # GLM-Image's published scheduler: dynamic shift driven by mu (see calculate_shift).
    return dict(FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
        base_image_seq_len=256, time_shift_type="linear",
    ).config)


def write_checkpoint(preset: Preset, out: Path, seed: int = 0, dtype: str = "fp32") -> Path:
    """Build every component with `seed` and save it under `out` (written whole or not at all).
    `dtype` "bf16" / "fp16" saves the weights in that dtype (the published checkpoint is bf16)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from glm_image_onnx.models import components
    from glm_image_onnx.models.tokenizer import save_tokenizers

    out = Path(out)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty")
    with staged_folder(out) as tmp:
        # Each component gets its own derived seed so that changing one preset part leaves the
        # other components' weights as they were.
        builders = {
            "vision_language_encoder": components.build_ar_planner,
            "text_encoder": components.build_glyph_encoder,
            "transformer": components.build_dit_decoder,
            "vae": components.build_vae,
        }
        for i, (folder, build) in enumerate(builders.items()):
            torch.manual_seed(seed * 1000 + i)
            model = build(preset)
            if torch_dtype != torch.float32:
                model = model.to(torch_dtype)
            model.save_pretrained(tmp / folder)
            del model
        FlowMatchEulerDiscreteScheduler.from_config(scheduler_config()).save_pretrained(tmp / "scheduler")
        save_tokenizers(preset, tmp)
        (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
        (tmp / "glm_image_onnx_preset.json").write_text(
            json.dumps({"preset": preset.name, "seed": seed}, indent=2) + "\n")
    return out


def model_index() -> dict:
    import diffusers

    return {
        "_class_name": "GlmImagePipeline",
        "_diffusers_version": diffusers.__version__,
        "processor": ["transformers", "GlmImageProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "ByT5Tokenizer"],
        "transformer": ["diffusers", "GlmImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"],
    }
