"""Export-friendly torch wrappers for the DiT decoder, the VAE and the glyph encoder.

Every wrapper holds the loaded diffusers / transformers module itself (shared weights, no copies)
and only changes the forward pass where the original does not trace well or keeps Python state:

- The DiT's condition K/V cache (`GlmImageKVCache`, a Python object mutated during the call) becomes
  explicit tensors: the write pass returns them stacked per layer, the read pass takes them as inputs.
- `prior_embedding[prior_token_drop] *= 0.0` (in-place boolean indexing) becomes `masked_fill`.
- RoPE goes on the image part of Q/K by concatenation instead of in-place slice assignment.
- Attention takes an optional key-padding mask on the text tokens. Diffusers' own `attention_mask`
  cannot serve here: it hands SDPA a float 0/1 matrix, which SDPA *adds* to the scores, so padded
  tokens are not masked at all. Ours adds a large negative bias to padded text keys only, so image
  rows (and every unpadded row) see exactly the keys of the unpadded call.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Diffusers' `apply_rotary_emb(..., sequence_dim=1, use_real_unbind_dim=-2)` on [B, S, H, D]."""
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, (cos, sin), sequence_dim=1, use_real_unbind_dim=-2)


class _DitCore(nn.Module):
    """One GlmImageTransformer2DModel forward with explicit condition K/V instead of a cache object.

    `forward_core` mirrors `GlmImageTransformer2DModel.forward` + `GlmImageTransformerBlock.forward`
    + `GlmImageAttnProcessor.__call__` (diffusers 0.42), reusing every submodule of the model.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        self.patch_size = int(cfg.patch_size)
        self.num_heads = int(cfg.num_attention_heads)

    def forward_core(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        prior_token_id: torch.Tensor,
        prior_token_drop: torch.Tensor | None,
        timestep: torch.Tensor,
        target_size: torch.Tensor,
        crop_coords: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        condition_keys: torch.Tensor | None = None,
        condition_values: torch.Tensor | None = None,
        collect_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`encoder_hidden_states=None` means no text stream at all (the write pass: empty text).

        collect_kv: return the per-layer (K, V) of the [text; image] tokens after norm + RoPE,
        stacked to [num_layers, B, S, heads, head_dim], instead of the noise prediction.
        """
        m = self.transformer
        p = self.patch_size
        batch, _, height, width = hidden_states.shape

        cos, sin = m.rope(hidden_states)  # [N, head_dim] each
        x = m.image_projector(hidden_states)  # [B, N, inner]
        prior = m.prior_token_embedding(prior_token_id)
        if prior_token_drop is not None:
            # == `prior_embedding[prior_token_drop] *= 0.0`, without data-dependent indexing
            prior = prior.masked_fill(prior_token_drop.unsqueeze(-1), 0.0)
        x = x + m.prior_projector(prior)
        text = m.glyph_projector(encoder_hidden_states) if encoder_hidden_states is not None else None
        temb = m.time_condition_embed(timestep, target_size, crop_coords, x.dtype)

        bias = self._attention_bias(x, text, encoder_attention_mask, condition_keys)
        if condition_keys is not None:
            condition_keys, condition_values = self._expand_condition(condition_keys, condition_values, batch)

        keys, values = [], []
        n_layers = len(m.transformer_blocks)
        for i, block in enumerate(m.transformer_blocks):
            # AdaLN-zero modulation (GlmImageAdaLayerNormZero, with the text stream optional)
            (shift_msa, c_shift_msa, scale_msa, c_scale_msa, gate_msa, c_gate_msa,
             shift_mlp, c_shift_mlp, scale_mlp, c_scale_mlp, gate_mlp, c_gate_mlp) = \
                block.norm1.linear(temb).chunk(12, dim=1)
            nx = block.norm1.norm(x) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
            nt = None
            if text is not None:
                nt = block.norm1.norm_context(text) * (1 + c_scale_msa.unsqueeze(1)) + c_shift_msa.unsqueeze(1)

            ck = condition_keys[i] if condition_keys is not None else None
            cv = condition_values[i] if condition_values is not None else None
            attn_x, attn_t, k, v = self._attention(block.attn1, nx, nt, cos, sin, bias, ck, cv)
            if collect_kv:
                keys.append(k)
                values.append(v)
                if i == n_layers - 1:
                    break  # the rest of the last block feeds nothing the write pass returns

            x = x + attn_x * gate_msa.unsqueeze(1)
            nx = block.norm2(x) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
            x = x + block.ff(nx) * gate_mlp.unsqueeze(1)
            if text is not None:
                text = text + attn_t * c_gate_msa.unsqueeze(1)
                nt = block.norm2_context(text) * (1 + c_scale_mlp.unsqueeze(1)) + c_shift_mlp.unsqueeze(1)
                text = text + block.ff(nt) * c_gate_mlp.unsqueeze(1)

        if collect_kv:
            return torch.stack(keys), torch.stack(values)

        x = m.norm_out(x, temb)
        x = m.proj_out(x)
        # unpatchify: (B, hp, wp, C, p, p) -> (B, C, hp*p, wp*p)
        x = x.reshape(batch, height // p, width // p, -1, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)

    def _attention(self, attn: nn.Module, x: torch.Tensor, text: torch.Tensor | None,
                   cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None,
                   cond_k: torch.Tensor | None, cond_v: torch.Tensor | None):
        """GlmImageAttnProcessor: joint attention over [condition K/V;] [text; image]."""
        n_text = text.shape[1] if text is not None else 0
        h = torch.cat([text, x], dim=1) if text is not None else x
        q = attn.to_q(h).unflatten(2, (self.num_heads, -1))
        k = attn.to_k(h).unflatten(2, (self.num_heads, -1))
        v = attn.to_v(h).unflatten(2, (self.num_heads, -1))
        q = attn.norm_q(q)
        k = attn.norm_k(k)
        # RoPE on the image tokens only (text tokens carry no position)
        if text is not None:
            q = torch.cat([q[:, :n_text], _rope(q[:, n_text:], cos, sin)], dim=1)
            k = torch.cat([k[:, :n_text], _rope(k[:, n_text:], cos, sin)], dim=1)
        else:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        kv = (k, v)  # what GlmImageLayerKVCache.store keeps in "write" mode
        if cond_k is not None:
            # GlmImageLayerKVCache.get ("read"): condition tokens go in front of the keys
            k = torch.cat([cond_k, k], dim=1)
            v = torch.cat([cond_v, v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if text is None:
            return out, None, kv[0], kv[1]
        return out[:, n_text:], out[:, :n_text], kv[0], kv[1]

    @staticmethod
    def _attention_bias(x: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None,
                        condition_keys: torch.Tensor | None) -> torch.Tensor | None:
        """Additive [B, 1, 1, keys] bias: 0 for real keys, a large negative for padded text keys."""
        if text_mask is None or text is None:
            return None
        text_bias = (1.0 - text_mask.to(x.dtype)) * torch.finfo(x.dtype).min  # [B, T]
        parts = []
        if condition_keys is not None:
            parts.append(x.new_zeros(x.shape[0], condition_keys.shape[2]))
        parts += [text_bias, x.new_zeros(x.shape[0], x.shape[1])]
        return torch.cat(parts, dim=1)[:, None, None, :]

    @staticmethod
    def _expand_condition(keys: torch.Tensor, values: torch.Tensor, batch: int):
        """[L, Bc, ...] -> [L, B, ...] like GlmImageLayerKVCache.get: Bc == 1 is shared by all rows,
        Bc == B is per row, and B = k * Bc repeats each cached sample k times in a row.

        Written as a gather (row i takes cache row i * Bc // B) rather than `expand`, so that the
        exporter does not have to prove a relation between Bc and B.
        """
        rows = torch.arange(batch, device=keys.device) * keys.shape[1] // batch
        return keys.index_select(1, rows), values.index_select(1, rows)


class DitDecoder(_DitCore):
    """`dit_decoder`: one denoising step. One graph serves text-to-image and both i2i branches, so the
    DiT's weights are stored once for decoding:

    - condition K/V [L, 1 or B, cond_len, heads, head_dim] from `dit_condition_write` are prepended
      to every layer's keys/values (the i2i cond branch); cond_len = 0 means no condition images
      (text-to-image, and the i2i uncond branch), which equals diffusers' call without a cache.
    - `encoder_attention_mask` (int64 [B, T], 1 = real text token) lets rows with different glyph
      lengths share one batch; pass ones when the batch is not padded.
    """

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                prior_token_id: torch.Tensor, prior_token_drop: torch.Tensor, timestep: torch.Tensor,
                target_size: torch.Tensor, crop_coords: torch.Tensor, encoder_attention_mask: torch.Tensor,
                condition_keys: torch.Tensor, condition_values: torch.Tensor) -> torch.Tensor:
        return self.forward_core(hidden_states, encoder_hidden_states, prior_token_id, prior_token_drop,
                                 timestep, target_size, crop_coords, encoder_attention_mask,
                                 condition_keys, condition_values)


class DitConditionWrite(_DitCore):
    """`dit_condition_write`: the pipeline's "write" pass for one condition image.

    Fixed by the pipeline: empty text, timestep 0, crop (0, 0), no prior dropped. `hidden_states` is
    the *normalised* condition latent ((mode - mean) / std); `target_size` the condition image's
    (H, W) in pixels. Returns K, V [num_layers, 1, N, heads, head_dim].
    """

    def forward(self, hidden_states: torch.Tensor, prior_token_id: torch.Tensor,
                target_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = hidden_states.shape[0]
        timestep = hidden_states.new_zeros(batch)
        crop_coords = hidden_states.new_zeros(batch, 2)
        return self.forward_core(hidden_states, None, prior_token_id, None, timestep, target_size,
                                 crop_coords, collect_kv=True)


class VaeDecoder(nn.Module):
    """`vae_decoder`: de-normalised latents -> image in [-1, 1] (post_quant_conv + decoder)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """`vae_encoder`: image in [-1, 1] -> the latent distribution's mode (pipeline: sample_mode="argmax"),
    before the (x - mean) / std normalisation."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.mode()


class GlyphEncoder(nn.Module):
    """`glyph_encoder`: T5 encoder -> last_hidden_state (load it with attn_implementation="eager")."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
