"""Export-friendly wrappers around `GlmImageForConditionalGeneration` (the AR planner).

Both wrappers hold the real submodules (no weight copies) and re-drive them without the parts of
the original forward that do not export:

- `ArPlannerDecoder`: language model + lm_head with the KV cache as plain tensors. The original
  forward computes mRoPE positions with data-dependent Python (`get_rope_index`) and keeps them in
  model state; here the host passes `position_ids` [3, B, S], so one graph serves prefill (past
  length 0) and decode.
- `VisionTokenizer`: vision encoder + VQ for ONE image per call. The original splits the packed
  patches with `lengths.tolist()` (a data-dependent split) and reshapes with Python ints from the
  grid; for one image attention is plain full attention and no Python ints are needed.

Attention is computed with the model's own `eager_attention_forward` (branch-free, so no shape
guards at export); the loaded model may use sdpa, which agrees to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _modeling() -> Any:
    from transformers.models.glm_image import modeling_glm_image

    return modeling_glm_image


class ArPlannerDecoder(nn.Module):
    """Language model + lm_head, explicit KV cache.

    forward(input_ids [B,S] int64, position_ids [3,B,S] int64, attention_mask [B,P+S] int64,
            past_0_key, past_0_value, past_1_key, ... [B, kv_heads, P, head_dim])
      -> (logits [B,S,vision_vocab], present_0_key, present_0_value, ... [B, kv_heads, P+S, head_dim])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.num_layers = len(self.language_model.layers)

    @staticmethod
    def additive_mask(attention_mask: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, P+S] keep-mask -> [B, 1, S, P+S] additive mask (causal and padding).

        Masked entries get finfo.min, not -inf: a fully masked row (a left-pad query) then softmaxes
        to a finite uniform row instead of NaN, and no NaN can enter the KV cache.
        """
        total = attention_mask.shape[1]
        device = attention_mask.device
        q_pos = torch.arange(seq, device=device) + (total - seq)  # absolute positions of the queries
        k_pos = torch.arange(total, device=device)
        causal = k_pos[None, :] <= q_pos[:, None]  # [S, P+S]
        allowed = causal[None, None, :, :] & (attention_mask[:, None, None, :] != 0)
        zero = torch.zeros((), dtype=dtype, device=device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        return torch.where(allowed, zero, neg)

    def _attention(self, attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Same steps as GlmImageTextAttention.forward, with the cache update as a concat.
        m = _modeling()
        input_shape = hidden.shape[:-1]
        hidden_shape = (*input_shape, -1, attn.head_dim)
        q = attn.q_proj(hidden).view(hidden_shape).transpose(1, 2)
        k = attn.k_proj(hidden).view(hidden_shape).transpose(1, 2)
        v = attn.v_proj(hidden).view(hidden_shape).transpose(1, 2)
        q, k = m.apply_rotary_pos_emb(q, k, cos, sin)
        k = torch.cat([past_key, k], dim=2)
        v = torch.cat([past_value, v], dim=2)
        out, _ = m.eager_attention_forward(attn, q, k, v, mask, scaling=attn.scaling, dropout=0.0)
        out = out.reshape(*input_shape, -1).contiguous()
        return attn.o_proj(out), k, v

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(past_key_values) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past tensors, got {len(past_key_values)}")
        lm = self.language_model
        hidden = lm.embed_tokens(input_ids)
        cos, sin = lm.rotary_emb(hidden, position_ids=position_ids)
        mask = self.additive_mask(attention_mask, input_ids.shape[1], hidden.dtype)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(lm.layers):
            # Same order as GlmImageTextDecoderLayer.forward (sandwich norms around attn and MLP).
            residual = hidden
            h = layer.input_layernorm(hidden)
            h, k, v = self._attention(layer.self_attn, h, cos, sin, mask,
                                      past_key_values[2 * i], past_key_values[2 * i + 1])
            h = layer.post_self_attn_layernorm(h)
            hidden = residual + h
            residual = hidden
            h = layer.post_attention_layernorm(hidden)
            h = layer.mlp(h)
            h = layer.post_mlp_layernorm(h)
            hidden = residual + h
            presents += [k, v]
        hidden = lm.norm(hidden)
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
