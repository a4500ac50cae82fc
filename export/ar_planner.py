"""`ar_planner`: GLM-Image's language model + lm_head with an explicit KV cache.

One graph serves prefill (past length 0) and decode. mRoPE positions are an input: the host
computes them (`glm_image_onnx.runtime.mrope`, a numpy mirror of `get_rope_index`), because the
original forward derives them with data-dependent Python that does not export.

Inputs
  input_ids                    int64   [batch, seq]
  position_ids                 int64   [3, batch, seq]     (t, h, w) mRoPE positions
  attention_mask               int64   [batch, past+seq]   1 = attend; left padding supported
  past_key_values.{i}.key      float32 [batch, kv_heads, past, head_dim]   for i in 0..layers-1
  past_key_values.{i}.value    float32 [batch, kv_heads, past, head_dim]
Outputs
  logits                       float32 [batch, seq, vision_vocab_size]   (ids = codebook indices)
  present.{i}.key / .value     float32 [batch, kv_heads, past+seq, head_dim]

Prefill: past tensors with past = 0. The export example uses past = 4 (a 0- or 1-sized example dim
is specialised unless its Dim explicitly allows it; torch 2.13 with Dim(min=0) also exports from
past = 0, but >= 2 is the safe choice). The graph has no guard on past; verification runs past = 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from ..models.ar_wrappers import ArPlannerDecoder
from .graph import GraphSpec

NAME = "ar_planner"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
# Export example sizes: every dynamic dim >= 2 so that torch.export does not specialise it.
_EXAMPLE = {"batch": 2, "seq": 3, "past": 4}


def text_sizes(model: Any) -> dict[str, Any]:
    """Everything size-like the graph depends on, read from the loaded model's config."""
    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope = dict(tc.rope_parameters or {})
    return {
        "num_layers": int(tc.num_hidden_layers),
        "num_heads": int(tc.num_attention_heads),
        "num_kv_heads": int(tc.num_key_value_heads),
        "head_dim": int(head_dim),
        "hidden_size": int(tc.hidden_size),
        "vocab_size": int(tc.vocab_size),
        "vision_vocab_size": int(tc.vision_vocab_size),
        "mrope_section": [int(x) for x in rope.get("mrope_section", [8, 12, 12])],
        "partial_rotary_factor": float(rope.get("partial_rotary_factor", 1.0)),
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
    }


def _past_names(num_layers: int) -> list[str]:
    names = []
    for i in range(num_layers):
        names += [PAST_KEY % i, PAST_VALUE % i]
    return names


def _present_names(num_layers: int) -> list[str]:
    names = []
    for i in range(num_layers):
        names += [PRESENT_KEY % i, PRESENT_VALUE % i]
    return names


def random_inputs(sizes: dict[str, Any], batch: int, seq: int, past: int, gen: torch.Generator,
                  left_pad: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A random but well-formed call: ids, ramp positions (pads at 1 like get_rope_index), a
    left-padded mask and a random cache."""
    total = past + seq
    left_pad = left_pad or [0] * batch
    mask = torch.ones(batch, total, dtype=torch.long)
    for b, n in enumerate(left_pad):
        mask[b, :n] = 0
    ramp = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, past:]
    # Distinct t/h/w axes so that every mRoPE section is exercised.
    offsets = torch.randint(0, 5, (3, batch, 1), generator=gen)
    inputs = {
        "input_ids": torch.randint(0, sizes["vocab_size"], (batch, seq), generator=gen),
        "position_ids": (ramp[None] + offsets).contiguous(),
        "attention_mask": mask,
    }
    shape = (batch, sizes["num_kv_heads"], past, sizes["head_dim"])
    for name in _past_names(sizes["num_layers"]):
        inputs[name] = torch.randn(shape, generator=gen)
    return inputs


def graph_specs(model: Any, checkpoint_dir: Path) -> list[GraphSpec]:
    sizes = text_sizes(model)
    cfg = model.config
    module = ArPlannerDecoder(model).eval()
    n = sizes["num_layers"]

    example = random_inputs(sizes, _EXAMPLE["batch"], _EXAMPLE["seq"], _EXAMPLE["past"],
                            torch.Generator().manual_seed(1234))
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=1 << 20)
    past = Dim("past", min=0, max=1 << 20)
    kv_shape = {0: batch, 2: past}
    # Keys are forward()'s parameter names: the cache is the *past_key_values varargs (a tuple in
    # input order), since "past_key_values.0.key" is no Python identifier. The mask's length is
    # past + seq, which a Dim cannot express for an input: a string (the ONNX exporter turns it into
    # Dim.DYNAMIC and names the axis after it) lets export infer the relation.
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {1: batch, 2: seq},
        "attention_mask": {0: batch, 1: "past_plus_seq"},
        "past_key_values": tuple(kv_shape for _ in range(2 * n)),
    }

    def verify_inputs(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        # Shapes other than the export example: prefill (past 0), decode, chunked, left padding.
        return [
            random_inputs(sizes, 1, 7, 0, gen),                       # prefill, batch 1
            random_inputs(sizes, 2, 5, 0, gen, left_pad=[0, 2]),      # padded prefill, batch 2
            random_inputs(sizes, 2, 1, 9, gen, left_pad=[3, 0]),      # decode step
            random_inputs(sizes, 1, 1, 1, gen),                       # first decode step after a 1-token prefill
            random_inputs(sizes, 2, 6, 11, gen, left_pad=[0, 4]),     # chunked continuation
        ]

    config = {
        **sizes,
        "input_names": ["input_ids", "position_ids", "attention_mask"],
        "past_key_template": PAST_KEY,
        "past_value_template": PAST_VALUE,
        "present_key_template": PRESENT_KEY,
        "present_value_template": PRESENT_VALUE,
        "kv_dtype": "float32",
        "position_ids_layout": "[3, batch, seq] = (temporal, height, width)",
        "image_start_token_id": int(cfg.image_start_token_id),
        "image_end_token_id": int(cfg.image_end_token_id),
        "image_token_id": int(cfg.image_token_id),
        "pad_token_id": cfg.text_config.pad_token_id,
        "eos_token_id": cfg.text_config.eos_token_id,
        "codebook_size": int(cfg.vq_config.num_embeddings),
    }
    return [GraphSpec(
        name=NAME,
        module=module,
        example_inputs=example,
        dynamic_shapes=dynamic_shapes,
        output_names=["logits", *_present_names(n)],
        verify_inputs=verify_inputs,
        description=("GLM-Image AR planner: language model + lm_head (image vocabulary), explicit KV cache; "
                     "one graph for prefill (past=0) and decode. position_ids [3,B,S] are host-computed "
                     "mRoPE positions (runtime/mrope.py mirrors get_rope_index)."),
        config=config,
    )]
