"""The checkpoint's components: each one loaded in fp32 for export, and the GraphSpecs that the
export modules (EXPORT_MODULES) make of a loaded component for a target."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterator

from glm_image_onnx.export.options import EXPORT_MODULES, ExportUsageError
from glm_image_onnx.targets import get_target


def load_component(folder: str, path: Path) -> Any:
    """The checkpoint component in fp32, eval mode. A file that cannot be read (a truncated
    download, a foreign format) is the caller's to fix: an ExportUsageError naming the folder."""
    try:
        return _from_pretrained(folder, path)
    except KeyError:
        raise
    except Exception as e:  # from_pretrained raises OSError, ValueError, safetensors' own errors, ...
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ExportUsageError(f"cannot load {folder} from {path}: {type(e).__name__}: {first}") from None


def _from_pretrained(folder: str, path: Path) -> Any:
    import torch

    if folder == "vision_language_encoder":
        from transformers import GlmImageForConditionalGeneration as cls

        return cls.from_pretrained(path, dtype=torch.float32).eval()
    if folder == "text_encoder":
        from transformers import T5EncoderModel

        # sdpa fails at dynamo decomposition; eager exports cleanly.
        return T5EncoderModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    if folder == "transformer":
        from diffusers import GlmImageTransformer2DModel

        return GlmImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    if folder == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()
    raise KeyError(folder)


def graph_specs(folder: str, model: Any, root: Path, target: str) -> Iterator[Any]:
    """Every GraphSpec the export modules of one checkpoint component make from its model for `target`."""
    for module_name in EXPORT_MODULES[folder]:
        module = importlib.import_module(f"{__package__}.{module_name}")
        yield from module.graph_specs(model, root, get_target(target))
