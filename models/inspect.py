"""Recognise and check a checkpoint folder from its JSON configs alone (no weights, no torch).

A bad path or a checkpoint of another architecture must fail with one clear line before any
model is loaded; a real GLM-Image folder is recognised as the `full` preset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm_image_onnx.errors import UsageError
from glm_image_onnx.models.presets import PRESETS

PIPELINE_CLASS = "GlmImagePipeline"
# folder -> class names accepted in its config (the published layout).
EXPECTED = {
    "vision_language_encoder": ("GlmImageForConditionalGeneration",),
    "text_encoder": ("T5EncoderModel",),
    "transformer": ("GlmImageTransformer2DModel",),
    "vae": ("AutoencoderKL",),
}


class CheckpointError(UsageError):
    """The folder is not a usable GLM-Image checkpoint; the message says why and where."""


@dataclass(frozen=True)
class CheckpointInfo:
    root: Path
    configs: dict[str, dict[str, Any]]  # folder -> its config.json
    preset: str | None  # the preset whose sizes it matches, if any

    @property
    def ar_text(self) -> dict[str, Any]:
        return self.configs["vision_language_encoder"]["text_config"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def inspect_checkpoint(root: Path | str) -> CheckpointInfo:
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist or is not a folder")
    if not (root / "model_index.json").exists():
        raise CheckpointError(f"{root} has no model_index.json: not a diffusers GLM-Image checkpoint folder")
    index = _read_json(root / "model_index.json")
    cls = index.get("_class_name")
    if cls != PIPELINE_CLASS:
        raise CheckpointError(f"{root / 'model_index.json'}: _class_name is {cls!r}, expected "
                              f"{PIPELINE_CLASS!r} (not a GLM-Image checkpoint)")
    configs: dict[str, dict[str, Any]] = {}
    for folder, classes in EXPECTED.items():
        cfg = _read_json(root / folder / "config.json")
        name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
        if name not in classes:
            raise CheckpointError(f"{root / folder / 'config.json'}: class {name!r}, expected "
                                  f"{' or '.join(classes)}")
        configs[folder] = cfg
    configs["scheduler"] = _read_json(root / "scheduler" / "scheduler_config.json")
    for folder in ("tokenizer", "processor"):
        if not (root / folder).is_dir():
            raise CheckpointError(f"{root / folder} is missing (tokenizer files are needed)")
    _check_consistency(configs)
    return CheckpointInfo(root=root, configs=configs, preset=_match_preset(configs))


def _check_consistency(c: dict[str, dict[str, Any]]) -> None:
    """Cross-component rules the pipeline relies on; errors name the field path."""
    ar, dit, vae, t5 = c["vision_language_encoder"], c["transformer"], c["vae"], c["text_encoder"]
    text = ar.get("text_config", {})
    heads, kv = text.get("num_attention_heads"), text.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise CheckpointError(f"vision_language_encoder.text_config.num_key_value_heads ({kv}) must "
                              f"divide num_attention_heads ({heads})")
    rules = [
        ("transformer.text_embed_dim", dit.get("text_embed_dim"), "text_encoder.d_model", t5.get("d_model")),
        ("transformer.in_channels", dit.get("in_channels"), "vae.latent_channels", vae.get("latent_channels")),
        ("transformer.prior_vq_quantizer_codebook_size", dit.get("prior_vq_quantizer_codebook_size"),
         "vision_language_encoder.vq_config.num_embeddings", ar.get("vq_config", {}).get("num_embeddings")),
    ]
    for a, va, b, vb in rules:
        if va is not None and vb is not None and va != vb:
            raise CheckpointError(f"{a} ({va}) must equal {b} ({vb})")
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1) * dit.get("patch_size", 2)
    if scale != 16:
        # AR tokens are on a H/32 grid, upsampled 2x to the DiT's H/16 token grid.
        raise CheckpointError(f"vae scale factor x transformer.patch_size is {scale}, GLM-Image needs 16")


def _match_preset(c: dict[str, dict[str, Any]]) -> str | None:
    text = c["vision_language_encoder"].get("text_config", {})
    dit = c["transformer"]
    for preset in PRESETS.values():
        if (text.get("hidden_size") == preset.ar.hidden_size
                and text.get("num_hidden_layers") == preset.ar.num_layers
                and text.get("num_attention_heads") == preset.ar.num_heads
                and dit.get("num_layers") == preset.dit.num_layers
                and dit.get("num_attention_heads") == preset.dit.num_heads
                and dit.get("attention_head_dim") == preset.dit.head_dim):
            return preset.name
    return None
