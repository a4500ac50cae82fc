"""The AR planner's decoding loop on onnxruntime: prefill once, then one token per call.

The KV cache never leaves onnxruntime: each call's `present.*` OrtValues are bound as the next
call's `past_key_values.*` through IO binding (on a GPU they stay on the device), and the small
per-token inputs come from preallocated host buffers. Logits are restricted to the codebook by
the sampler, and exactly `num_tokens` image tokens are produced (no early end-of-image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from .mrope import decode_step_positions
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
        self.past_names = [t % i for i in range(self.num_layers)
                           for t in (config["past_key_template"], config["past_value_template"])]
        self.present_names = [t % i for i in range(self.num_layers)
                              for t in (config["present_key_template"], config["present_value_template"])]
        self.device, self.device_id = device, device_id

    def _bind_outputs(self, io: ort.IOBinding) -> None:
        # logits come back to the host for sampling; the cache stays where the provider computes.
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, self.device, self.device_id)

    def generate(self, input_ids: np.ndarray, prefill_positions: np.ndarray, decode_positions: np.ndarray,
                 num_tokens: int, sampler: TokenSampler, progress: Progress | None = None) -> ArResult:
        """input_ids [1, S]; prefill_positions [3, 1, S]; decode_positions [1, 3, L] (mrope.rope_index)."""
        batch, prompt_len = input_ids.shape
        total = prompt_len + num_tokens
        mask = np.ones((batch, total), dtype=np.int64)
        token_buf = np.zeros((batch, 1), dtype=np.int64)
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)

        t0 = time.perf_counter()
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(prefill_positions, dtype=np.int64))
        io.bind_cpu_input("attention_mask", mask[:, :prompt_len])
        for name in self.past_names:
            io.bind_cpu_input(name, empty)
        self._bind_outputs(io)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        logits = outputs[0].numpy()[:, -1, :]
        cache = outputs[1:]
        prefill_s = time.perf_counter() - t0

        tokens = np.empty((batch, num_tokens), dtype=np.int64)
        per_token: list[float] = []
        t_decode = time.perf_counter()
        for step in range(num_tokens):
            t1 = time.perf_counter()
            tokens[:, step] = sampler(logits)
            if progress is not None:
                progress("ar", step + 1, num_tokens)
            if step == num_tokens - 1:
                break  # the last token needs no forward pass
            token_buf[:, 0] = tokens[:, step]
            io = self.session.io_binding()
            io.bind_cpu_input("input_ids", token_buf)
            io.bind_cpu_input("position_ids", decode_step_positions(decode_positions, step))
            io.bind_cpu_input("attention_mask", mask[:, : prompt_len + step + 1])
            for name, value in zip(self.past_names, cache):
                io.bind_ortvalue_input(name, value)
            self._bind_outputs(io)
            self.session.run_with_iobinding(io)
            outputs = io.get_outputs()
            logits = outputs[0].numpy()[:, -1, :]
            cache = outputs[1:]
            per_token.append(time.perf_counter() - t1)
        return ArResult(tokens=tokens[0] if batch == 1 else tokens, prefill_s=prefill_s,
                        decode_s=time.perf_counter() - t_decode, per_token_s=per_token)
