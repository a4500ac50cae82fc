"""The largest inputs the pipeline sends each graph, for the largest request a server allows.

A component model served beside `glm_image` accepts at most these shapes: anything larger is work
the pipeline itself never asks for (a 256x256-latent VAE call allocates 16 GiB in the mid-block's
attention, a 7x7 DiT latent is not a whole number of patches). Every bound is derived from what the
package declares (its manifest, processor and tokenizer configs) and the pipeline's own settings
(VAE tiling, AR batching, shape buckets), by the same rules the pipeline follows when it builds the
feeds; tests/test_envelope.py runs the pipeline at the bounds and checks every feed against them.

The batch axis is left unbounded here: rows are bounded by the server's max batch size, and each
row costs the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glm_image_onnx.runtime.glyphs import GLYPH_MAX_LENGTH


@dataclass(frozen=True)
class RequestBounds:
    """The largest request a server takes (server.limits.Limits after `for_package`)."""

    max_side: int  # pixels
    max_pixels: int
    max_prompt_bytes: int
    max_images: int  # source images of one edit


@dataclass(frozen=True)
class InputBound:
    """Per axis: the largest size (None: not bounded here) and the size's required multiple."""

    shape: tuple[int | None, ...]
    multiple: tuple[int, ...] | None = None
    row_elements: int | None = None  # most elements per batch row (an area, where both sides can't be max)
    why: str = ""  # where the bound comes from, for the refusal

    def error(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why a tensor of `shape` is outside the bound, or None."""
        for axis, (size, most) in enumerate(zip(shape, self.shape)):
            if most is not None and size > most:
                return f"input '{name}': dimension {axis} is {size}, more than {most}, the largest {self.why}"
        for axis, (size, multiple) in enumerate(zip(shape, self.multiple or ())):
            if multiple > 1 and size % multiple:
                return f"input '{name}': dimension {axis} is {size}, not a multiple of {multiple}"
        rows = shape[0] if shape else 1
        if self.row_elements is not None and rows and _product(shape) // rows > self.row_elements:
            return (f"input '{name}': {_product(shape) // rows} elements per row, more than {self.row_elements}, "
                    f"the most {self.why}")
        return None


Envelope = dict[str, dict[str, InputBound]]  # graph -> input -> bound


def _product(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def envelope(pipe: Any, bounds: RequestBounds) -> Envelope:
    """Every graph's input bounds for requests within `bounds`, on this pipeline (its tiles,
    buckets and AR batching)."""
    found = {"vae_decoder": _vae(pipe, bounds), "dit_decoder": _dit(pipe, bounds),
             "glyph_encoder": _glyphs(pipe, bounds), "ar_planner": _ar(pipe, bounds)}
    if pipe.supports_image_to_image:
        found.update(_image_to_image(pipe, bounds))
    return found


def _size_note(bounds: RequestBounds) -> str:
    return f"the pipeline sends for this server's largest image ({bounds.max_side} px a side, {bounds.max_pixels} pixels)"


def _vae(pipe: Any, bounds: RequestBounds) -> dict[str, InputBound]:
    tiled = pipe.vae_tiling != "off"
    side = min(bounds.max_side, pipe.vae_tile_sample) if tiled else bounds.max_side
    latent = side // pipe.vae_scale
    why = f"{_size_note(bounds)}, in VAE tiles of {pipe.vae_tile_sample} px" if tiled else _size_note(bounds)
    return {"latents": InputBound((None, pipe.latent_channels, latent, latent), why=why)}


def _latent_tokens(pipe: Any, bounds: RequestBounds) -> tuple[int, int]:
    """(latent side, DiT tokens) of the largest image: tokens by area, the side by the longest side."""
    patch = pipe.vae_scale * pipe.patch_size
    return bounds.max_side // patch * pipe.patch_size, bounds.max_pixels // (patch * patch)


def _dit(pipe: Any, bounds: RequestBounds) -> dict[str, InputBound]:
    side, tokens = _latent_tokens(pipe, bounds)
    why = _size_note(bounds)
    # Glyph tokens: each quoted text gives its bytes, an eos and at most one pad, and takes two quote
    # bytes of the prompt, so the prompt's length bounds their total (padded to a bucket when static).
    text = _bucket(pipe, "dit_text", max(bounds.max_prompt_bytes, 2))
    cond = tokens * bounds.max_images if pipe.supports_image_to_image else 0
    d = pipe.dit
    kv = InputBound((d.num_layers, 1, cond, d.num_heads, d.head_dim), why=why)
    c, p = pipe.latent_channels, pipe.patch_size
    return {
        "hidden_states": InputBound((None, c, side, side), (1, 1, p, p), c * tokens * p * p, why),
        "encoder_hidden_states": InputBound((None, text, None), why=why),
        "encoder_attention_mask": InputBound((None, text), why=why),
        "prior_token_id": InputBound((None, tokens), why=why), "prior_token_drop": InputBound((None, tokens), why=why),
        "condition_keys": kv, "condition_values": kv,
    }


def _glyphs(pipe: Any, bounds: RequestBounds) -> dict[str, InputBound]:
    width = _bucket(pipe, "glyph", min(GLYPH_MAX_LENGTH + 1, max(bounds.max_prompt_bytes, 2)))
    bound = InputBound((None, width), why=f"the pipeline sends for a {bounds.max_prompt_bytes}-byte prompt")
    return {"input_ids": bound, "attention_mask": bound}


def _ar(pipe: Any, bounds: RequestBounds) -> dict[str, InputBound]:
    """The prompt (prefill) and cache lengths of the longest generation: the chat template at the
    largest size, with as many largest sources as allowed, plus one token per prompt byte at most."""
    side = bounds.max_side
    cases = [([], side)]
    if pipe.supports_image_to_image:
        cases.append(([pipe.image_processor.grid(side, side)] * bounds.max_images, side))
    prompt, total = 0, 0
    for grids, s in cases:
        built = pipe.prompts.build("", s, s, grids)
        length = built.input_ids.shape[1] + bounds.max_prompt_bytes
        prompt, total = max(prompt, length), max(total, length + built.max_new_tokens)
    capacity = _bucket(pipe, "capacity", max(total, pipe.buckets.prefill(prompt)[0]))
    prompt = pipe.buckets.prefill(prompt)[1]  # a static package's prefill: calls of a bucket each
    if pipe.ar_engine is not None:  # the batch engine grows its cache to powers of two
        capacity = max(capacity, 1 << (capacity - 1).bit_length())
    why = f"the pipeline sends for a {bounds.max_prompt_bytes}-byte prompt at {side} px a side"
    c = pipe.package.graphs["ar_planner"].config
    cache = InputBound((None, c.num_kv_heads, capacity, c.head_dim), why=why)
    found = {"input_ids": InputBound((None, prompt), why=why), "position_ids": InputBound((3, None, prompt), why=why)}
    found.update({t % i: cache for i in range(c.num_layers) for t in (c.past_key_template, c.past_value_template)})
    return found


def _image_to_image(pipe: Any, bounds: RequestBounds) -> Envelope:
    side, tokens = _latent_tokens(pipe, bounds)
    why = _size_note(bounds)
    proc = pipe.image_processor
    gh, gw = proc.grid(bounds.max_side, bounds.max_side)  # a source is bounded as an output is
    tiled = pipe.vae_tiling != "off"
    pixels = min(bounds.max_side, pipe.vae_tile_sample) if tiled else bounds.max_side
    c, p = pipe.latent_channels, pipe.patch_size
    return {
        "vision_tokenizer": {"pixel_values": InputBound((gh * gw, None), why=why)},
        "vae_encoder": {"sample": InputBound((None, 3, pixels, pixels), (1, 1, pipe.vae_scale, pipe.vae_scale), why=why)},
        "dit_condition_write": {
            "hidden_states": InputBound((1, c, side, side), (1, 1, p, p), c * tokens * p * p, why),
            "prior_token_id": InputBound((1, tokens), why=why),
        },
    }


def _bucket(pipe: Any, kind: str, length: int) -> int:
    """`length` padded to its bucket in a static-shapes package (at most the largest bucket)."""
    buckets = pipe.buckets
    if not buckets.static:
        return length
    return next((b for b in buckets.buckets[kind] if b >= length), buckets.buckets[kind][-1])
