"""`ar_planner`: GLM-Image's language model + lm_head with an explicit KV cache.

One graph serves prefill (past length 0) and decode. mRoPE positions are an input: the host
computes them (`glm_image_onnx.runtime.mrope`, a numpy mirror of `get_rope_index`), because the
original forward derives them with data-dependent Python that does not export.

Inputs
  input_ids                    int64   [batch, seq]
  position_ids                 int64   [3, batch, seq]     (t, h, w) mRoPE positions
  seqlens_k                    int32   [batch]             valid cache length after this call - 1, per row
  total_sequence_length        int32   []                  the longest row's valid cache length
  past_key_values.{i}.key      dtype   [batch, kv_heads, capacity, head_dim]   for i in 0..layers-1
  past_key_values.{i}.value    dtype   [batch, kv_heads, capacity, head_dim]
Outputs
  logits                       float32 [batch, seq, vision_vocab_size]   (ids = codebook indices)
  present.{i}.key / .value     dtype   [batch, kv_heads, capacity, head_dim]

`dtype` is the package's (float32 on cpu; bfloat16 or float16 on cuda, see export.precision).
The cache is a fixed-capacity buffer (capacity >= prompt + generated tokens) that each call
updates in place: attention is onnxruntime's `com.microsoft.GroupQueryAttention`, and a caller
that binds `present.*` to the same memory as `past_key_values.*` gets the new entries written
into it (no copy of the whole cache per token, which a Concat-based graph makes). Row b's `seq`
new tokens go to positions seqlens_k[b]+1-seq .. seqlens_k[b]; rows may have different lengths
(ragged decode; right-padded prompts, whose pad outputs are meaningless). onnxruntime accepts
seq > 1 after a non-empty past only at batch 1 (chunked prefill of one prompt). mRoPE is applied in the
graph before the op (its own rotary ignores position_ids in a first prompt): the graph computes one
cos/sin row per token from position_ids and rotates q and k with `com.microsoft.RotaryEmbedding`.

Static-shapes targets (CANN) get `StaticCacheDecoder` instead: basic ops only, and `cache_position`
int64 [batch, seq] (where each token is written) replaces seqlens_k and total_sequence_length. The
runtime pads the prompt to a bucket and allocates the cache at a capacity bucket, so every decode
step has the same input shapes (graph mode compiles once per shape set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from glm_image_onnx.manifest import KV_CAPACITY_BUCKETED, KV_CAPACITY_RULE, KV_LAYOUT, POSITION_IDS_LAYOUT
# (importing ar_wrappers also registers torch.ops.glm_image_onnx)
from glm_image_onnx.models.ar_wrappers import ArPlannerDecoder, StaticCacheDecoder
from glm_image_onnx.targets import TARGETS, Target
from glm_image_onnx.export.graph import GraphSpec

NAME = "ar_planner"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
# Export example sizes: every dynamic dim >= 2 so that torch.export does not specialise it.
_EXAMPLE = {"batch": 2, "seq": 3, "past": 4, "capacity": 9}


def _gqa_schema() -> Any:
    """The contrib op's schema, for the exporter's op builder (onnx knows only the standard
    domain). Only what this graph uses is declared; `export_onnx` registers it for the export
    alone, since onnxruntime's own tools later write attributes this sketch does not list."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param(n, "T") for n in ("query", "key", "value", "past_key", "past_value")]
        + [param("seqlens_k", "M"), param("total_sequence_length", "M")],
        outputs=[param(n, "T") for n in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")])


def _rotary_schema() -> Any:
    """onnxruntime's `com.microsoft.RotaryEmbedding`, as far as this graph uses it (see `_gqa_schema`)."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    return OpSchema(
        "RotaryEmbedding", "com.microsoft", 1,
        inputs=[param("input", "T"), param("position_ids", "M"), param("cos_cache", "T"), param("sin_cache", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute("interleaved", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("rotary_embedding_dim", OpSchema.AttrType.INT, "")])


def _rotary_onnx(x: Any, position_ids: Any, cos_cache: Any, sin_cache: Any, num_heads: int, rotary_dim: int) -> Any:
    import onnxscript

    msft = onnxscript.values.Opset("com.microsoft", 1)
    return msft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0, num_heads=num_heads,
                                rotary_embedding_dim=rotary_dim)


def _gqa_onnx(query: Any, key: Any, value: Any, past_key: Any, past_value: Any, seqlens_k: Any,
              total_sequence_length: Any, num_heads: int, kv_num_heads: int, scale: float) -> Any:
    import onnxscript

    msft = onnxscript.values.Opset("com.microsoft", 1)
    return msft.GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                    num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale)


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


def random_inputs(sizes: dict[str, Any], batch: int, seq: int, past: int | list[int], capacity: int,
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random but well-formed call: ids, ramp positions, per-row past lengths (`past` may differ
    per row) and a random cache of `capacity` positions (what lies past the valid length is junk
    the graph must not read)."""
    pasts = torch.tensor(past if isinstance(past, list) else [past] * batch)
    ramp = pasts[:, None] + torch.arange(seq)[None, :]
    # Distinct t/h/w axes so that every mRoPE section is exercised.
    offsets = torch.randint(0, 5, (3, batch, 1), generator=gen)
    lengths = pasts + seq
    inputs = {
        "input_ids": torch.randint(0, sizes["vocab_size"], (batch, seq), generator=gen),
        "position_ids": (ramp[None] + offsets).contiguous(),
        "seqlens_k": (lengths - 1).to(torch.int32),
        "total_sequence_length": lengths.max().to(torch.int32),
    }
    shape = (batch, sizes["num_kv_heads"], capacity, sizes["head_dim"])
    for name in _past_names(sizes["num_layers"]):
        inputs[name] = torch.randn(shape, generator=gen)
    return inputs


def static_inputs(sizes: dict[str, Any], batch: int, seq: int, past: int | list[int], capacity: int,
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    """`random_inputs` for `StaticCacheDecoder`: the write positions replace the two lengths."""
    inputs = random_inputs(sizes, batch, seq, past, capacity, gen)
    pasts = torch.tensor(past if isinstance(past, list) else [past] * batch)
    out = {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"],
           "cache_position": pasts[:, None] + torch.arange(seq)[None, :]}
    return out | {k: v for k, v in inputs.items() if k.startswith("past_key_values.")}


def graph_specs(model: Any, checkpoint_dir: Path, target: Target = TARGETS["cpu"]) -> list[GraphSpec]:
    if target.static_shapes:
        return _static_specs(model)
    sizes = text_sizes(model)
    module = ArPlannerDecoder(model).eval()
    n = sizes["num_layers"]

    ex = _EXAMPLE
    example = random_inputs(sizes, ex["batch"], ex["seq"], ex["past"], ex["capacity"],
                            torch.Generator().manual_seed(1234))
    dynamic_shapes = _dynamic_shapes(n, lambda batch, seq: {"seqlens_k": {0: batch}, "total_sequence_length": {}})

    def verify_inputs(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        # Shapes other than the export example: prefill (past 0), decode, chunked, ragged rows.
        return [
            random_inputs(sizes, 1, 7, 0, 7, gen),              # prefill, batch 1, exact capacity
            random_inputs(sizes, 2, 5, 0, 16, gen),             # prefill, batch 2, spare capacity
            random_inputs(sizes, 2, 1, [9, 4], 12, gen),        # decode step, rows of different length
            random_inputs(sizes, 1, 1, 1, 2, gen),              # first decode step after a 1-token prefill
            random_inputs(sizes, 1, 6, 11, 20, gen),            # chunked continuation (batch 1 only)
        ]

    return [_spec(
        sizes, module, example, dynamic_shapes, verify_inputs,
        ("GLM-Image AR planner: language model + lm_head (image vocabulary), fixed-capacity KV "
         "cache updated in place (GroupQueryAttention), mRoPE by RotaryEmbedding; one graph "
         "for prefill and decode. "
         "position_ids [3,B,S] are host-computed mRoPE positions (runtime/mrope.py mirrors "
         "get_rope_index)."),
        KV_CAPACITY_RULE, "in place: bind each present.* to its past_key_values.* buffer",
        custom_translation_table={torch.ops.glm_image_onnx.group_query_attention.default: _gqa_onnx,
                                  torch.ops.glm_image_onnx.rotary_embedding.default: _rotary_onnx},
        custom_schemas=[_gqa_schema(), _rotary_schema()],
    )]


def _static_specs(model: Any) -> list[GraphSpec]:
    """The AR planner for static-shapes targets (`StaticCacheDecoder`)."""
    sizes = text_sizes(model)
    module = StaticCacheDecoder(model).eval()
    n = sizes["num_layers"]
    ex = _EXAMPLE
    example = static_inputs(sizes, ex["batch"], ex["seq"], ex["past"], ex["capacity"],
                            torch.Generator().manual_seed(1234))
    dynamic_shapes = _dynamic_shapes(n, lambda batch, seq: {"cache_position": {0: batch, 1: seq}})

    def verify_inputs(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        # A padded prefill into a larger cache, decode steps of rows at different positions, a
        # continuation, and a prefill that exactly fills the cache.
        return [
            static_inputs(sizes, 1, 8, 0, 16, gen),
            static_inputs(sizes, 2, 1, [9, 4], 16, gen),
            static_inputs(sizes, 1, 1, 15, 16, gen),
            static_inputs(sizes, 1, 5, 3, 32, gen),
            static_inputs(sizes, 2, 6, 0, 6, gen),
        ]

    return [_spec(
        sizes, module, example, dynamic_shapes, verify_inputs,
        ("GLM-Image AR planner for static shapes, basic ops only: language model + lm_head, "
         "a fixed-capacity KV cache written at cache_position [B,S] (ScatterND) and read with "
         "a causal mask (key position <= the token's cache position). Pad prompts on the right "
         "to a bucket; keep one capacity for a whole generation."),
        KV_CAPACITY_BUCKETED, "ScatterND at cache_position: bind each present.* to its past_key_values.* buffer",
    )]


def _dynamic_shapes(num_layers: int, lengths: Any) -> dict[str, Any]:
    """torch.export dims of either AR graph; `lengths(batch, seq)` gives those of the inputs that say
    where the tokens go. Keys are forward()'s parameter names: the cache is the *past_key_values
    varargs (a tuple in input order), since "past_key_values.0.key" is no Python identifier."""
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=1 << 20)
    capacity = Dim("capacity", min=1, max=1 << 20)
    kv_shape = {0: batch, 2: capacity}
    return {"input_ids": {0: batch, 1: seq}, "position_ids": {1: batch, 2: seq}, **lengths(batch, seq),
            "past_key_values": tuple(kv_shape for _ in range(2 * num_layers))}


def _spec(sizes: dict[str, Any], module: Any, example: dict[str, torch.Tensor], dynamic_shapes: dict[str, Any],
          verify_inputs: Any, description: str, capacity: str, update: str, **extra: Any) -> GraphSpec:
    """Either AR graph's spec. Its config is what the runtime needs besides the inputs (the special
    tokens are the pipeline's: manifest.Tokens) and the cache contract it allocates by
    (export.one_graph sets the cache dtype of the target)."""
    n = sizes["num_layers"]
    config = {
        **sizes,
        "past_key_template": PAST_KEY,
        "past_value_template": PAST_VALUE,
        "present_key_template": PRESENT_KEY,
        "present_value_template": PRESENT_VALUE,
        "position_ids_layout": POSITION_IDS_LAYOUT,
        "kv_cache": {"dtype": "float32", "layout": KV_LAYOUT, "capacity": capacity, "update": update},
    }
    return GraphSpec(name=NAME, module=module, example_inputs=example, dynamic_shapes=dynamic_shapes,
                     output_names=["logits", *_present_names(n)], verify_inputs=verify_inputs,
                     description=description, config=config,
                     shared_buffers=dict(zip(_present_names(n), _past_names(n))), **extra)
