"""The AR planner's decoding loop on onnxruntime: prefill once, then one token per call.

The hot path (one graph call per image token) allocates nothing and creates no Python objects
per token beyond the binding calls:
- The KV cache lives in two preallocated flat buffers per cache tensor ("ping-pong"): a call
  reads `past_key_values.*` from the prefix of one and writes `present.*` into the prefix of the
  other, then they swap. A prefix of a flat buffer is a contiguous [B, KV_heads, P, D] tensor, so
  both sides are bound by pointer (`bind_input` / `bind_output` with `buffer_ptr`); on a GPU the
  buffers are device OrtValues and the cache never leaves the device.
- `input_ids`, `position_ids`, `attention_mask` and `logits` are preallocated host buffers bound by
  pointer; a step only rewrites their contents.
- The graph still copies the whole cache once per token (its `present` is `Concat(past, new)`):
  avoiding that needs a graph whose cache is a fixed-capacity buffer updated in place (see
  benchmarks/README.md), which the exported graph does not have.

Logits are restricted to the codebook by the sampler, and exactly `num_tokens` image tokens are
produced (no early end-of-image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from .sampling import TokenSampler

Progress = Callable[[str, int, int], None]


@dataclass
class ArResult:
    tokens: np.ndarray  # [num_tokens] int64, codebook ids in generation order
    prefill_s: float
    decode_s: float
    per_token_s: list[float] = field(default_factory=list)


class ArPlanner:
    def __init__(self, session: ort.InferenceSession, config: dict[str, Any], device: str = "cpu",
                 device_id: int = 0):
        self.session = session
        self.num_layers = int(config["num_layers"])
        self.kv_heads = int(config["num_kv_heads"])
        self.head_dim = int(config["head_dim"])
        self.vocab = int(config["vision_vocab_size"])
        self.past_names = [t % i for i in range(self.num_layers)
                           for t in (config["past_key_template"], config["past_value_template"])]
        self.present_names = [t % i for i in range(self.num_layers)
                              for t in (config["present_key_template"], config["present_value_template"])]
        self.device, self.device_id = device, device_id

    def _cache_buffers(self, elements: int) -> list[ort.OrtValue]:
        """One flat float32 buffer per cache tensor, on the device that computes the graph."""
        return [ort.OrtValue.ortvalue_from_shape_and_type([elements], np.float32, self.device, self.device_id)
                for _ in self.past_names]

    def generate(self, input_ids: np.ndarray, prefill_positions: np.ndarray, decode_positions: np.ndarray,
                 num_tokens: int, sampler: TokenSampler, progress: Progress | None = None) -> ArResult:
        """input_ids [1, S]; prefill_positions [3, 1, S]; decode_positions [1, 3, L] (mrope.rope_index)."""
        batch, prompt_len = input_ids.shape
        total = prompt_len + num_tokens
        kv_row = batch * self.kv_heads * self.head_dim  # elements per cached position
        # Ping-pong cache: `cur` holds the past of the next call, `nxt` receives its present.
        cur, nxt = self._cache_buffers(kv_row * total), self._cache_buffers(kv_row * total)
        # All-ones mask, flat so that any prefix reshapes to a contiguous [batch, length] array.
        mask = np.ones(batch * total, dtype=np.int64)
        f32, i64 = np.float32, np.int64
        io = self.session.io_binding()

        # Raw pointers, read once: the per-token binding calls then create no Python objects.
        cur_ptrs, nxt_ptrs = [b.data_ptr() for b in cur], [b.data_ptr() for b in nxt]

        def bind_cache(past: int) -> None:
            shape_in = [batch, self.kv_heads, past, self.head_dim]
            shape_out = [batch, self.kv_heads, past + 1, self.head_dim]
            for name, ptr in zip(self.past_names, cur_ptrs):
                io.bind_input(name, self.device, self.device_id, f32, shape_in, ptr)
            for name, ptr in zip(self.present_names, nxt_ptrs):
                io.bind_output(name, self.device, self.device_id, f32, shape_out, ptr)

        t0 = time.perf_counter()
        ids = np.ascontiguousarray(input_ids, dtype=i64)
        positions = np.ascontiguousarray(prefill_positions, dtype=i64)
        prefill_logits = np.empty((batch, prompt_len, self.vocab), dtype=f32)
        io.bind_input("input_ids", "cpu", 0, i64, list(ids.shape), ids.ctypes.data)
        io.bind_input("position_ids", "cpu", 0, i64, list(positions.shape), positions.ctypes.data)
        io.bind_input("attention_mask", "cpu", 0, i64, [batch, prompt_len], mask.ctypes.data)
        # The prefill writes a present of prompt_len positions: bind it like a step from past 0
        # with `prompt_len` new positions.
        for name, ptr in zip(self.past_names, cur_ptrs):
            io.bind_input(name, self.device, self.device_id, f32, [batch, self.kv_heads, 0, self.head_dim], ptr)
        for name, ptr in zip(self.present_names, nxt_ptrs):
            io.bind_output(name, self.device, self.device_id, f32, [batch, self.kv_heads, prompt_len, self.head_dim],
                           ptr)
        io.bind_output("logits", "cpu", 0, f32, list(prefill_logits.shape), prefill_logits.ctypes.data)
        self.session.run_with_iobinding(io)
        cur_ptrs, nxt_ptrs = nxt_ptrs, cur_ptrs
        logits = prefill_logits[:, -1, :]
        prefill_s = time.perf_counter() - t0

        # Decode: every per-token input is a preallocated buffer bound once; only its contents and
        # the two growing shapes (mask, cache) change from step to step.
        token_buf = np.zeros((batch, 1), dtype=i64)
        pos_buf = np.zeros((3, batch, 1), dtype=i64)
        step_logits = np.empty((batch, 1, self.vocab), dtype=f32)
        positions_by_step = np.ascontiguousarray(decode_positions.transpose(2, 1, 0))  # [L, 3, B]
        io.bind_input("input_ids", "cpu", 0, i64, [batch, 1], token_buf.ctypes.data)
        io.bind_input("position_ids", "cpu", 0, i64, [3, batch, 1], pos_buf.ctypes.data)
        io.bind_output("logits", "cpu", 0, f32, [batch, 1, self.vocab], step_logits.ctypes.data)
        if num_tokens - 1 > positions_by_step.shape[0]:
            raise IndexError(f"{num_tokens} tokens need {num_tokens - 1} decode positions, "
                             f"{positions_by_step.shape[0]} were precomputed")

        tokens = np.empty((batch, num_tokens), dtype=i64)
        per_token: list[float] = []
        t_decode = time.perf_counter()
        for step in range(num_tokens):
            t1 = time.perf_counter()
            tokens[:, step] = sampler(logits)
            if progress is not None:
                progress("ar", step + 1, num_tokens)
            if step == num_tokens - 1:
                break  # the last token needs no forward pass
            past = prompt_len + step
            token_buf[:, 0] = tokens[:, step]
            pos_buf[:, :, 0] = positions_by_step[step]
            io.bind_input("attention_mask", "cpu", 0, i64, [batch, past + 1], mask.ctypes.data)
            bind_cache(past)
            self.session.run_with_iobinding(io)
            cur_ptrs, nxt_ptrs = nxt_ptrs, cur_ptrs
            logits = step_logits[:, -1, :]
            per_token.append(time.perf_counter() - t1)
        return ArResult(tokens=tokens[0] if batch == 1 else tokens, prefill_s=prefill_s,
                        decode_s=time.perf_counter() - t_decode, per_token_s=per_token)
