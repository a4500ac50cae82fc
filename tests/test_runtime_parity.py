"""The torch-free runtime against diffusers' GlmImagePipeline on the same tiny checkpoint.

Greedy AR and the same initial latents: the AR tokens must be identical and the image equal within
1e-3 (pixels in [0, 1]), for text-to-image at several sizes and for image-to-image.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import greedy_reference
from glm_image_onnx.runtime import GlmImageOnnxPipeline


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Any:
    pipe = greedy_reference(tiny_checkpoint)
    _patch_i2i_split(pipe)
    return pipe


def _patch_i2i_split(pipe: Any) -> None:
    """diffusers 0.42.1 + transformers 5.23: `torch.cat(pooler_output)` hands get_image_tokens one
    tensor that it iterates along dim 0; re-split it per image (the facts note's fix)."""
    model = pipe.vision_language_encoder
    original = model.get_image_tokens

    def get_image_tokens(hidden_states: torch.Tensor, image_grid_thw: torch.Tensor | None = None):
        if isinstance(hidden_states, torch.Tensor) and image_grid_thw is not None and hidden_states.dim() == 3:
            sizes = [int(h) for h in image_grid_thw[:, 1]]
            hidden_states = list(torch.split(hidden_states, sizes, dim=1))
        return original(hidden_states, image_grid_thw)

    model.get_image_tokens = get_image_tokens


@pytest.fixture(scope="module", params=["cpu", "cann-fp32"])
def runtime(request: pytest.FixtureRequest, tiny_package: Path) -> GlmImageOnnxPipeline:
    """Today's package, and the fp32 cann one (basic ops, padded shapes) run under the CPU EP: both
    must reproduce diffusers."""
    if request.param == "cpu":
        return GlmImageOnnxPipeline.from_package(tiny_package)
    return GlmImageOnnxPipeline.from_package(request.getfixturevalue("cann_packages")["fp32"])


def _latents(pipe: Any, height: int, width: int, seed: int) -> torch.Tensor:
    c = pipe.transformer.config.in_channels
    return torch.randn(1, c, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def _compare(reference: Any, runtime: GlmImageOnnxPipeline, prompt: str, height: int, width: int,
             steps: int = 3, guidance: float = 1.5, image: list[Image.Image] | None = None) -> None:
    latents = _latents(reference, height, width, seed=height + width)
    reference.generated.clear()
    with torch.no_grad():
        ref = reference(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                        guidance_scale=guidance, latents=latents.clone(), output_type="np",
                        image=image).images[0]
    ours = runtime(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   latents=latents.numpy(), do_sample=False, image=image)
    ref_tokens = reference.generated[0].numpy()
    # diffusers generates one more token (the end marker) than the grids need
    assert np.array_equal(ours.tokens, ref_tokens[: len(ours.tokens)])
    got = np.asarray(ours.images[0], dtype=np.float32) / 255.0
    ref_u8 = (ref * 255).round() / 255.0  # the same rounding as PIL conversion
    assert got.shape == ref.shape == (height, width, 3)
    assert np.abs(got - ref_u8).max() <= 1 / 255 + 1e-6  # at most one 8-bit level (rounding at .5)
    assert ours.images[0].size == (width, height)
    return ours


@pytest.mark.parametrize("height, width", [(64, 64), (64, 96), (96, 32)])
def test_text_to_image_matches_diffusers(reference: Any, runtime: GlmImageOnnxPipeline, height: int,
                                         width: int) -> None:
    _compare(reference, runtime, "a shop sign that says 'OPEN 24h' and “GLM”", height, width)


def test_float_image_matches_within_1e3(reference: Any, runtime: GlmImageOnnxPipeline) -> None:
    height, width = 64, 96
    latents = _latents(reference, height, width, seed=3)
    with torch.no_grad():
        ref = reference(prompt="a red cat", height=height, width=width, num_inference_steps=4,
                        latents=latents.clone(), output_type="np").images[0]
    ours = runtime("a red cat", height=height, width=width, num_inference_steps=4, latents=latents.numpy(),
                   do_sample=False)
    decoded = runtime.decode(_denoised(runtime, ours, latents.numpy(), "a red cat", height, width, 4))
    assert np.abs(decoded[0] - ref).max() < 1e-3


def _denoised(runtime: GlmImageOnnxPipeline, out: Any, latents: np.ndarray, prompt: str, h: int, w: int,
              steps: int) -> np.ndarray:
    cond, uncond = runtime.encode_glyphs(prompt)
    x, _ = runtime.denoise(latents, prompt_embeds=cond, negative_prompt_embeds=uncond,
                           prior_token_ids=out.prior_token_ids, height=h, width=w, num_inference_steps=steps,
                           guidance_scale=1.5)
    return x


def test_no_guidance_single_branch(reference: Any, runtime: GlmImageOnnxPipeline) -> None:
    _compare(reference, runtime, "plain text", 64, 64, guidance=1.0)


def test_image_to_image_matches_diffusers(reference: Any, runtime: GlmImageOnnxPipeline) -> None:
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    _compare(reference, runtime, "make it 'blue'", 64, 64, image=[source])


def test_sampled_runs_reproducible(runtime: GlmImageOnnxPipeline) -> None:
    a = runtime("a cat", height=64, width=64, num_inference_steps=2, seed=123)
    b = runtime("a cat", height=64, width=64, num_inference_steps=2, seed=123)
    c = runtime("a cat", height=64, width=64, num_inference_steps=2, seed=124)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.max() < runtime.codebook_size  # only codebook ids are ever drawn


def test_runtime_imports_no_torch(tiny_package: Path) -> None:
    code = ("import sys; from glm_image_onnx.runtime import GlmImageOnnxPipeline as P; "
            f"p = P.from_package({str(tiny_package)!r}); "
            "p('a', height=32, width=32, num_inference_steps=1, seed=0); "
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
