"""Host-side mRoPE positions for the AR planner (numpy only; no torch).

A line-by-line mirror of transformers' `GlmImageModel.get_rope_index` (GLM-Image), which the
exported `ar_planner` graph cannot compute itself:

- Prefill: text tokens take a ramp on all three axes (t, h, w). A source image in the prompt
  (image-to-image: the tokens between an `image_start` and an `image_end` token) takes 2D positions
  (t = base, h = base + row, w = base + col) and advances the ramp by max(grid_h, grid_w) only.
  Left-padding tokens (mask 0) get position 1, as in transformers.
- Decode: the grids still to be generated (all grids minus the complete source images) are laid
  out last-first: text-to-image grids are [target, preview], so the preview grid is generated
  first, then the target grid; image-to-image has just the target grid. Each grid takes 2D
  positions from a base that advances by max(h, w) per grid, followed by one end-marker position.
  Generated token k is fed with decode position k.

Shapes follow transformers: prefill positions [3, B, S]; decode positions [B, 3, L] (padded to the
longest sample by repeating its last column). The graph input is `position_ids` [3, B, S].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

def _slice_ramp(start: int, length: int, limit: int) -> np.ndarray:
    # `torch.arange(limit)[start:start + length]` with Python slice semantics (clipped, never negative).
    stop = min(start + length, limit)
    return np.arange(start, max(start, stop), dtype=np.int64)


def _vision_positions(start: int, grid_thw: Sequence[int]) -> np.ndarray:
    # GlmImageModel.get_vision_position_ids with merge sizes 1: [3, t*h*w].
    t, h, w = (int(x) for x in grid_thw)
    tt, hh, ww = np.meshgrid(np.arange(t, dtype=np.int64), np.arange(h, dtype=np.int64) + start,
                             np.arange(w, dtype=np.int64) + start, indexing="ij")
    return np.stack([tt.reshape(-1) + start, hh.reshape(-1), ww.reshape(-1)])


def _decode_grid_positions(base: int, h: int, w: int) -> np.ndarray:
    rows = np.repeat(np.arange(h, dtype=np.int64), w)
    cols = np.tile(np.arange(w, dtype=np.int64), h)
    return np.stack([np.full(h * w, base, dtype=np.int64), base + rows, base + cols])


def _grids_per_sample(image_grid_thw: np.ndarray | None, images_per_sample: np.ndarray | None,
                      batch: int) -> list[np.ndarray | None]:
    if image_grid_thw is None:
        return [None] * batch
    grids_all = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    if images_per_sample is None:
        return [grids_all] * batch
    bounds = np.cumsum(np.asarray(images_per_sample, dtype=np.int64))[:-1]
    return np.split(grids_all, bounds)


def _prefill_positions(ids: np.ndarray, grids: np.ndarray | None, image_start_token_id: int,
                       image_end_token_id: int, seq_len: int) -> tuple[np.ndarray, int, int]:
    """One sample's prefill positions [3, len(ids)], the next position, and its complete images."""
    ends = np.nonzero(ids == image_end_token_id)[0]
    starts = np.nonzero(ids == image_start_token_id)[0] + 1
    current, prev_end = 0, 0
    parts: list[np.ndarray] = []
    # Complete images in the prompt (image-to-image sources): text before it, then 2D positions.
    for img_idx, (start, end) in enumerate(zip(starts, ends)):
        if grids is None or img_idx >= len(grids):
            break
        text = _slice_ramp(current, int(start) - prev_end, seq_len)
        current += text.shape[0]
        vision = _vision_positions(current, grids[img_idx])
        current += int(max(grids[img_idx][1], grids[img_idx][2]))
        prev_end = int(end)
        parts.append(np.concatenate([np.broadcast_to(text, (3, text.shape[0])), vision], axis=1))
    # The rest is text, ending with the image-start token the generation continues from.
    text = _slice_ramp(current, len(ids) - prev_end, seq_len)
    current += text.shape[0]
    parts.append(np.broadcast_to(text, (3, text.shape[0])))
    return np.concatenate(parts, axis=1), current, len(ends)


def _decode_positions(base: int, grids: np.ndarray, num_complete: int) -> np.ndarray:
    """The grids still to generate (last grid first), then the end marker: [3, L]."""
    decode_parts = []
    for i in range(1, max(len(grids) - num_complete, 0) + 1):
        h, w = int(grids[-i][1]), int(grids[-i][2])
        decode_parts.append(_decode_grid_positions(base, h, w))
        base += max(h, w)
    decode_parts.append(np.full((3, 1), base, dtype=np.int64))
    return np.concatenate(decode_parts, axis=1)


def rope_index(input_ids: np.ndarray, *, image_start_token_id: int, image_end_token_id: int,
               image_grid_thw: np.ndarray | None = None, images_per_sample: np.ndarray | None = None,
               attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirror of `get_rope_index`: (prefill position_ids [3, B, S], decode positions [B, 3, L] or None).

    `image_grid_thw` [num_grids, 3] lists every sample's grids in processor order
    ([source grids..., target grid(s)] per sample); `images_per_sample` [B] splits it per sample
    (without it, every sample gets all grids, as transformers' batch-1 fallback does).
    """
    input_ids = np.asarray(input_ids)
    batch, seq_len = input_ids.shape
    position_ids = np.ones((3, batch, seq_len), dtype=np.int64)
    grids_per_sample = _grids_per_sample(image_grid_thw, images_per_sample, batch)
    all_decode: list[np.ndarray] = []
    for b in range(batch):
        ids, grids, valid = input_ids[b], grids_per_sample[b], None
        if attention_mask is not None and np.asarray(attention_mask).shape[1] == seq_len:
            valid = np.asarray(attention_mask)[b] == 1
            ids = ids[valid]
        sample, current, num_complete = _prefill_positions(ids, grids, image_start_token_id, image_end_token_id,
                                                           seq_len)
        expected = int(valid.sum()) if valid is not None else seq_len
        if sample.shape[1] != expected:
            raise ValueError(f"sample {b}: {sample.shape[1]} positions for {expected} tokens; the image "
                             f"placeholders do not match image_grid_thw")
        position_ids[:, b, valid if valid is not None else slice(None)] = sample
        if grids is not None and len(grids) > 0:
            all_decode.append(_decode_positions(current, grids, num_complete))
    if not all_decode:
        return position_ids, None
    longest = max(d.shape[1] for d in all_decode)
    decode = np.stack([np.pad(d, ((0, 0), (0, longest - d.shape[1])), mode="edge") for d in all_decode])
    return position_ids, decode


def decode_step_positions(decode_positions: np.ndarray, step: int, seq: int = 1) -> np.ndarray:
    """`position_ids` [3, B, seq] for the decode call whose first token is generated token `step`
    (step = past length - prefill length, as transformers computes it)."""
    if step < 0 or step + seq > decode_positions.shape[2]:
        raise IndexError(f"decode step {step}..{step + seq} outside the {decode_positions.shape[2]} "
                         f"precomputed positions")
    return np.ascontiguousarray(decode_positions[:, :, step:step + seq].transpose(1, 0, 2))


def text_to_image_positions(prompt_len: int, target_grid: tuple[int, int], preview_grid: tuple[int, int]
                            ) -> tuple[np.ndarray, np.ndarray]:
    """One unpadded text-to-image prompt: (prefill [3, prompt_len], decode [3, L]) with
    L = preview_h*preview_w + target_h*target_w + 1 (preview grid first, then target, then end)."""
    prefill = np.broadcast_to(np.arange(prompt_len, dtype=np.int64), (3, prompt_len)).copy()
    base = prompt_len
    parts = []
    for h, w in (preview_grid, target_grid):
        parts.append(_decode_grid_positions(base, h, w))
        base += max(h, w)
    parts.append(np.full((3, 1), base, dtype=np.int64))
    return prefill, np.concatenate(parts, axis=1)
