"""Export-friendly wrappers around `GlmImageForConditionalGeneration` (the AR planner).

Both wrappers hold the real submodules (no weight copies) and re-drive them without the parts of
the original forward that do not export:

- `ArPlannerDecoder`: language model + lm_head with the KV cache as plain fixed-capacity tensors.
  The original forward computes mRoPE positions with data-dependent Python (`get_rope_index`) and
  keeps them in model state; here the host passes `position_ids` [3, B, S], so one graph serves
  prefill and decode. Attention + cache update is one custom op (`group_query_attention`) that the
  exporter maps to onnxruntime's GroupQueryAttention, which updates the cache in place; the mRoPE
  rotation of q and k is another (`rotary_embedding` -> onnxruntime's RotaryEmbedding).
- `StaticCacheDecoder`: the same model for targets that compile per input shape (CANN): basic ops
  only (attention as MatMul/Softmax with a causal mask built from the write positions, rotary as
  Slice/Mul/Concat) and a fixed-capacity cache written with ScatterND at `cache_position`, so a
  decode step's shapes never change and a padded prefill writes nothing a later step reads.
- `VisionTokenizer`: vision encoder + VQ for ONE image per call. The original splits the packed
  patches with `lengths.tolist()` (a data-dependent split) and reshapes with Python ints from the
  grid; for one image attention is plain full attention and no Python ints are needed.

The vision tokenizer's attention is the model's own `eager_attention_forward` (branch-free, so no
shape guards at export); the loaded model may use sdpa, which agrees to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable

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
        hidden = self.language_model.embed_tokens(input_ids)
        rope = self._rope_tables(hidden, position_ids)
        return self._layers(hidden, lambda i, attn, h, past_key, past_value: self._attention(
            attn, self.qkv[i], h, rope, seqlens_k, total_sequence_length, past_key, past_value), past_key_values)

    def _layers(self, hidden: torch.Tensor, attend: Callable[..., tuple[torch.Tensor, ...]],
                past_key_values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The decoder layers + final norm + lm_head; attend(i, self_attn, h, past_key, past_value)
        -> (h, present_key, present_value) is the attention of layer i."""
        lm = self.language_model
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(lm.layers):
            # Same order as GlmImageTextDecoderLayer.forward (sandwich norms around attn and MLP).
            residual = hidden
            h = rms_norm(layer.input_layernorm, hidden)
            h, k, v = attend(i, layer.self_attn, h, past_key_values[2 * i], past_key_values[2 * i + 1])
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


# Additive mask of a key a query must not see: the most negative float16, so the same graph holds it
# in fp16 (exp underflows to exactly 0 in either dtype; -inf would turn a fully masked row into NaN).
MASKED = -65504.0


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, rotary_dim: int) -> torch.Tensor:
    """`rotary_embedding` in basic ops: x [B, S, heads*D], cos/sin [B, S, rotary_dim/2]."""
    batch, seq, _ = x.shape
    heads = x.view(batch, seq, num_heads, -1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2, rest = heads[..., : rotary_dim // 2], heads[..., rotary_dim // 2: rotary_dim], heads[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1).reshape(batch, seq, -1)


def scatter_positions(cache: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """The cache [B, KVH, C, D] with new [B, KVH, S, D] written at positions cache_position [B, S]
    (ScatterND: one index triple (b, h, c) per written row)."""
    batch, kv_heads, seq, _ = new.shape
    b = torch.arange(batch, device=new.device).view(batch, 1, 1).expand(batch, kv_heads, seq)
    h = torch.arange(kv_heads, device=new.device).view(1, kv_heads, 1).expand(batch, kv_heads, seq)
    c = cache_position.view(batch, 1, seq).expand(batch, kv_heads, seq)
    return cache.index_put((b, h, c), new)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                      num_heads: int, scale: float) -> torch.Tensor:
    """Grouped-query attention in MatMul/Softmax: q [B, S, H*D]; keys/values [B, KVH, C, D]; bias
    [B, 1, 1, S, C] additive. Query head h reads key head h // (H / KVH), as GroupQueryAttention."""
    batch, seq, _ = q.shape
    kv_heads, head_dim = keys.shape[1], keys.shape[-1]
    group = num_heads // kv_heads
    # [B, S, KVH, G, D] -> [B, KVH, G, S, D]; scaled before the product, which keeps fp16 in range.
    q = (q * scale).view(batch, seq, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    scores = q.reshape(batch, kv_heads, group * seq, head_dim) @ keys.transpose(-1, -2)
    scores = scores.view(batch, kv_heads, group, seq, -1) + bias
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * seq, -1)
    out = (probs @ values).view(batch, kv_heads, group, seq, head_dim)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, seq, num_heads * head_dim)


class StaticCacheDecoder(ArPlannerDecoder):
    """`ArPlannerDecoder` with shapes that stay put, from basic ops only (see the module docstring).

    forward(input_ids [B,S] int64, position_ids [3,B,S] int64, cache_position [B,S] int64,
            past_0_key, past_0_value, ... [B, kv_heads, capacity, head_dim])
      -> (logits [B,S,vision_vocab], present_0_key, present_0_value, ...)

    Token s of row b is written at cache position cache_position[b, s] and attends to every cache
    position <= its own. Padding a prompt on the right is harmless: its pad tokens write positions
    past the prompt, which each later token overwrites before it can read them.
    """

    def _attention(self, attn: nn.Module, qkv: FusedLinear, hidden: torch.Tensor, rope: tuple[torch.Tensor, ...],
                   cache_position: torch.Tensor, bias: torch.Tensor, past_key: torch.Tensor,
                   past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cos, sin = rope
        cfg = attn.config
        batch, seq, _ = hidden.shape
        q, k, v = qkv(hidden)
        q = rotate(q, cos, sin, cfg.num_attention_heads, self.rotary_dim)
        k = rotate(k, cos, sin, cfg.num_key_value_heads, self.rotary_dim)
        k = k.view(batch, seq, cfg.num_key_value_heads, -1).transpose(1, 2)
        v = v.view(batch, seq, cfg.num_key_value_heads, -1).transpose(1, 2)
        present_key = scatter_positions(past_key, k, cache_position)
        present_value = scatter_positions(past_value, v, cache_position)
        out = grouped_attention(q, present_key, present_value, bias, cfg.num_attention_heads, float(attn.scaling))
        return attn.o_proj(out), present_key, present_value

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(past_key_values) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past tensors, got {len(past_key_values)}")
        hidden = self.language_model.embed_tokens(input_ids)
        cos, sin = self.language_model.rotary_emb(hidden, position_ids=position_ids)
        half = self.rotary_dim // 2
        rope = (cos[..., :half], sin[..., :half])
        capacity = past_key_values[0].shape[2]
        visible = torch.arange(capacity, device=hidden.device).view(1, 1, capacity) <= cache_position.unsqueeze(-1)
        bias = torch.where(visible, 0.0, MASKED).to(hidden.dtype)[:, None, None]  # [B, 1, 1, S, C]
        return self._layers(hidden, lambda i, attn, h, past_key, past_value: self._attention(
            attn, self.qkv[i], h, rope, cache_position, bias, past_key, past_value), past_key_values)


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
        hidden = self._add_positions(hidden, grid, h_coords, w_coords)
        for blk in visual.blocks:
            hidden = hidden + self._attention(blk.attn, blk.norm1(hidden))
            hidden = hidden + blk.mlp(blk.norm2(hidden))
        # get_image_features reshapes to [C, h, w] and the quantizer flattens (h, w) back in the
        # same order; the 1x1 quant_conv is per position, so a [1, C, 1, N] layout gives the same
        # ids in the same order without needing h and w as Python ints.
        features = hidden.transpose(0, 1).reshape(1, -1, 1, n)
        return self._codebook_ids(self.vqmodel.quant_conv(features))

    def _add_positions(self, hidden: torch.Tensor, grid: torch.Tensor, h_coords: torch.Tensor,
                       w_coords: torch.Tensor) -> torch.Tensor:
        lengths = torch.ones(1, dtype=torch.long, device=hidden.device) * hidden.shape[0]  # one image
        return self.visual.embeddings(hidden, lengths, grid, h_coords, w_coords)

    def _codebook_ids(self, features: torch.Tensor) -> torch.Tensor:
        return self.vqmodel.quantize(features)[2]


class BasicVisionTokenizer(VisionTokenizer):
    """`VisionTokenizer` from basic ops only, for targets without GridSample or Einsum kernels (CANN):
    the position table's bilinear resampling as four Gathers and a blend, the VQ distances as a MatMul."""

    def _add_positions(self, hidden: torch.Tensor, grid: torch.Tensor, h_coords: torch.Tensor,
                       w_coords: torch.Tensor) -> torch.Tensor:
        # GlmImageVisionEmbeddings: grid_sample(bilinear, align_corners=False, padding_mode="border")
        # of the side x side table at each patch centre ((c + 0.5) / grid * 2 - 1 in [-1, 1]).
        table = self.visual.embeddings.position_embedding.weight
        side = int(round(table.shape[0] ** 0.5))

        def source(coords: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # grid_sample's unnormalisation, clipped to the border; the two neighbours and the weight.
            x = ((coords.float() + 0.5) / size.float() * side - 0.5).clamp(0, side - 1)
            lo = torch.floor(x)
            return lo.long(), torch.clamp(lo + 1, max=side - 1).long(), (x - lo).unsqueeze(-1)

        y0, y1, wy = source(h_coords, grid[0, 1])
        x0, x1, wx = source(w_coords, grid[0, 2])
        top = table[y0 * side + x0] * (1 - wx) + table[y0 * side + x1] * wx
        bottom = table[y1 * side + x0] * (1 - wx) + table[y1 * side + x1] * wx
        return hidden + (top * (1 - wy) + bottom * wy).to(hidden.dtype)

    def _codebook_ids(self, features: torch.Tensor) -> torch.Tensor:
        # GlmImageVectorQuantizer.forward up to its argmin, with the einsum as a MatMul.
        quantizer = self.vqmodel.quantize
        z = nn.functional.normalize(features.permute(0, 2, 3, 1).reshape(-1, quantizer.embedding_dim), p=2, dim=-1)
        codes = nn.functional.normalize(quantizer.embedding.weight, p=2, dim=-1)
        distances = torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(codes ** 2, dim=1) - 2 * (z @ codes.T)
        return torch.argmin(distances, dim=1)
