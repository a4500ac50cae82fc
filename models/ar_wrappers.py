"""Export-friendly wrappers around `GlmImageForConditionalGeneration` (the AR planner).

Both wrappers hold the real submodules (no weight copies) and re-drive them without the parts of
the original forward that do not export:

- `ArPlannerDecoder`: language model + lm_head with the KV cache as plain fixed-capacity tensors.
  The original forward computes mRoPE positions with data-dependent Python (`get_rope_index`) and
  keeps them in model state; here the host passes `position_ids` [3, B, S], so one graph serves
  prefill and decode. Attention + cache update is one custom op (`group_query_attention`) that the
  exporter maps to onnxruntime's GroupQueryAttention, which updates the cache in place; the mRoPE
  rotation of q and k is another (`rotary_embedding` -> onnxruntime's RotaryEmbedding).
- `VisionTokenizer`: vision encoder + VQ for ONE image per call. The original splits the packed
  patches with `lengths.tolist()` (a data-dependent split) and reshapes with Python ints from the
  grid; for one image attention is plain full attention and no Python ints are needed.

The vision tokenizer's attention is the model's own `eager_attention_forward` (branch-free, so no
shape guards at export); the loaded model may use sdpa, which agrees to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _modeling() -> Any:
    from transformers.models.glm_image import modeling_glm_image

    return modeling_glm_image


@torch.library.custom_op("glm_image_onnx::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
                          total_sequence_length: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of onnxruntime's `com.microsoft.GroupQueryAttention` as the AR graph uses
    it: a fixed-capacity cache updated in place (past and present are one buffer), causal.

    query [B, S, H*D], key/value [B, S, KVH*D] (rotary already applied), past_key/value
    [B, KVH, capacity, D], seqlens_k int32 [B] = valid length after this call - 1 per row,
    total_sequence_length int32 scalar = the longest row's valid length. Row b writes its S new
    keys/values at positions seqlens_k[b]+1-S .. seqlens_k[b] and attends causally to everything up
    to its own position. Returns (output [B, S, H*D], present_key, present_value): the cache with
    the new entries written, all other positions unchanged.

    Exported as the onnxruntime contrib op (`export.ar_planner`): onnxruntime then writes the new
    entries into the bound buffer instead of copying the whole cache per token.
    """
    batch, seq, _ = query.shape
    head_dim = past_key.shape[-1]
    q = query.view(batch, seq, num_heads, head_dim).transpose(1, 2)
    k = key.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
    v = value.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
    present_key, present_value = past_key.clone(), past_value.clone()
    out = torch.empty_like(q)
    group = num_heads // kv_num_heads
    for b in range(batch):  # eager only: the exporter sees the op, not this loop
        end = int(seqlens_k[b]) + 1
        start = end - seq
        present_key[b, :, start:end] = k[b]
        present_value[b, :, start:end] = v[b]
        keys = present_key[b, :, :end].repeat_interleave(group, dim=0)
        values = present_value[b, :, :end].repeat_interleave(group, dim=0)
        scores = q[b] @ keys.transpose(-1, -2) * scale  # [H, S, end]
        causal = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        out[b] = torch.softmax(scores, dim=-1) @ values
    return out.transpose(1, 2).reshape(batch, seq, -1), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_num_heads,
      scale):  # noqa: ANN001, ANN202 (shapes only, for torch.export)
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


@torch.library.custom_op("glm_image_onnx::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, num_heads: int, rotary_dim: int) -> torch.Tensor:
    """PyTorch reference of onnxruntime's `com.microsoft.RotaryEmbedding` as the AR graph uses it:
    half-rotation (`rotate_half`, not interleaved) of the first `rotary_dim` dims of every head.

    x [B, S, num_heads*D]; position_ids int64 [B, S] index rows of cos/sin_cache [P, rotary_dim/2].
    The graph passes one cache row per token (its mRoPE cos/sin) and position_ids = its row, so one
    op per tensor replaces the ~6 elementwise ops per tensor of `apply_rotary_pos_emb`.
    """
    batch, seq, _ = x.shape
    heads = x.view(batch, seq, num_heads, -1)
    cos = cos_cache[position_ids].unsqueeze(2)  # [B, S, 1, rotary_dim/2]
    sin = sin_cache[position_ids].unsqueeze(2)
    rot, rest = heads[..., :rotary_dim], heads[..., rotary_dim:]
    x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return rotated.reshape(batch, seq, -1)


@rotary_embedding.register_fake
def _(x, position_ids, cos_cache, sin_cache, num_heads, rotary_dim):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


class FusedLinear(nn.Module):
    """Several linears of one input as one: one MatMul in the graph instead of three (and in an int8
    graph one activation quantisation). The weights are concatenated once, here, as a copy: in
    forward() the exporter would leave a Concat of three weights for every session to fold at load."""

    def __init__(self, linears: tuple[nn.Linear, ...]) -> None:
        super().__init__()
        with torch.no_grad():
            weight = torch.cat([lin.weight for lin in linears])
            bias = None
            if any(lin.bias is not None for lin in linears):
                bias = torch.cat([lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias
                                  for lin in linears])
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.sizes = [lin.out_features for lin in linears]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def rms_norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`GlmImageRMSNorm` written as x / sqrt(mean(x^2) + eps) * w: the form onnxruntime fuses into
    one SimplifiedLayerNormalization (the model's x * rsqrt(...) stays five separate ops)."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return norm.weight * (hidden / torch.sqrt(variance + norm.variance_epsilon))


class ArPlannerDecoder(nn.Module):
    """Language model + lm_head, fixed-capacity KV cache.

    forward(input_ids [B,S] int64, position_ids [3,B,S] int64, seqlens_k [B] int32,
            total_sequence_length [] int32,
            past_0_key, past_0_value, past_1_key, ... [B, kv_heads, capacity, head_dim])
      -> (logits [B,S,vision_vocab], present_0_key, present_0_value, ... [B, kv_heads, capacity, head_dim])

    The S new tokens of row b sit at cache positions seqlens_k[b]+1-S .. seqlens_k[b] (see
    `group_query_attention`); a caller binds each present to the same buffer as its past.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.num_layers = len(self.language_model.layers)
        self.rotary_dim = int(self.language_model.rotary_emb.inv_freq.numel() * 2)
        attns = [layer.self_attn for layer in self.language_model.layers]
        self.qkv = nn.ModuleList(FusedLinear((a.q_proj, a.k_proj, a.v_proj)) for a in attns)

    def _attention(self, attn: nn.Module, qkv: FusedLinear, hidden: torch.Tensor, rope: tuple[torch.Tensor, ...],
                   seqlens_k: torch.Tensor, total: torch.Tensor, past_key: torch.Tensor,
                   past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Same steps as GlmImageTextAttention.forward (apply_rotary_pos_emb on q and k, then
        # attention); mRoPE is applied by its own op: GroupQueryAttention's rotary would take the
        # per-token tables too, but it ignores position_ids in a first prompt (onnxruntime 1.32), so
        # rows with their own mRoPE positions would be rotated wrong. Cache update + attention: one op.
        positions, cos, sin = rope
        cfg = attn.config
        q, k, v = qkv(hidden)
        q = rotary_embedding(q, positions, cos, sin, cfg.num_attention_heads, self.rotary_dim)
        k = rotary_embedding(k, positions, cos, sin, cfg.num_key_value_heads, self.rotary_dim)
        out, present_key, present_value = group_query_attention(
            q, k, v, past_key, past_value, seqlens_k, total, cfg.num_attention_heads,
            cfg.num_key_value_heads, float(attn.scaling))
        return attn.o_proj(out), present_key, present_value

    def _rope_tables(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One cos/sin row per token: the model's mRoPE tables (`rotary_emb` returns cat(f, f) of the
        section-recomposed angles f), flattened to [B*S, rotary_dim/2], and each token's row index."""
        batch, seq = hidden.shape[:2]
        cos, sin = self.language_model.rotary_emb(hidden, position_ids=position_ids)
        half = self.rotary_dim // 2
        rows = torch.arange(batch * seq, device=hidden.device).view(batch, seq)
        return rows, cos[..., :half].reshape(batch * seq, half), sin[..., :half].reshape(batch * seq, half)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, seqlens_k: torch.Tensor,
                total_sequence_length: torch.Tensor, *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(past_key_values) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past tensors, got {len(past_key_values)}")
        lm = self.language_model
        hidden = lm.embed_tokens(input_ids)
        rope = self._rope_tables(hidden, position_ids)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(lm.layers):
            # Same order as GlmImageTextDecoderLayer.forward (sandwich norms around attn and MLP).
            residual = hidden
            h = rms_norm(layer.input_layernorm, hidden)
            h, k, v = self._attention(layer.self_attn, self.qkv[i], h, rope, seqlens_k, total_sequence_length,
                                      past_key_values[2 * i], past_key_values[2 * i + 1])
            h = rms_norm(layer.post_self_attn_layernorm, h)
            hidden = residual + h
            residual = hidden
            h = rms_norm(layer.post_attention_layernorm, hidden)
            h = layer.mlp(h)
            h = rms_norm(layer.post_mlp_layernorm, h)
            hidden = residual + h
            presents += [k, v]
        hidden = rms_norm(lm.norm, hidden)
        return (self.lm_head(hidden), *presents)


class VisionTokenizer(nn.Module):
    """One source image -> VQ codebook ids (vision encoder + VQ quantizer).

    forward(pixel_values [N, C*p*p] float32, image_grid_thw [1, 3] int64) -> ids [N] int64

    `pixel_values` / `image_grid_thw` are exactly the image processor's output for one image
    (N = grid_h * grid_w patches in the processor's order). The ids come out in the same order as
    `get_image_tokens(get_image_features(...).pooler_output)` for that image.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.visual = model.model.visual
        self.vqmodel = model.model.vqmodel
        self.merge = int(self.visual.spatial_merge_size)

    def _patch_coords(self, n: int, grid_w: torch.Tensor, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        # get_vision_position_ids for t = 1: (h, w) of each patch, block-major over merge x merge
        # blocks. Computed from the grid tensor so that no Python int depends on the data.
        m = self.merge
        idx = torch.arange(n, device=device)
        if m == 1:
            return idx // grid_w, idx % grid_w
        in_w, in_h, block = idx % m, (idx // m) % m, idx // (m * m)
        blocks_w = grid_w // m
        return (block // blocks_w) * m + in_h, (block % blocks_w) * m + in_w

    @staticmethod
    def _attention(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # GlmImageVisionAttention.forward for a single image: one full (non-causal) attention.
        m = _modeling()
        n = hidden.shape[0]
        q, k, v = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out, _ = m.eager_attention_forward(attn, q, k, v, None, scaling=attn.scaling, dropout=0.0)
        return attn.proj(out.reshape(n, -1).contiguous())

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        n = pixel_values.shape[0]
        grid = image_grid_thw.reshape(1, 3)
        hidden = visual.patch_embed(pixel_values.to(visual.patch_embed.proj.weight.dtype))
        h_coords, w_coords = self._patch_coords(n, grid[0, 2], hidden.device)
        lengths = torch.ones(1, dtype=torch.long, device=hidden.device) * n  # one image: all patches
        hidden = visual.embeddings(hidden, lengths, grid, h_coords, w_coords)
        for blk in visual.blocks:
            hidden = hidden + self._attention(blk.attn, blk.norm1(hidden))
            hidden = hidden + blk.mlp(blk.norm2(hidden))
        # get_image_features reshapes to [C, h, w] and the quantizer flattens (h, w) back in the
        # same order; the 1x1 quant_conv is per position, so a [1, C, 1, N] layout gives the same
        # ids in the same order without needing h and w as Python ints.
        features = hidden.transpose(0, 1).reshape(1, -1, 1, n)
        _, _, ids = self.vqmodel.quantize(self.vqmodel.quant_conv(features))
        return ids
