"""The AR planner's decoding loop on onnxruntime: prefill once, then one token per call.

The hot path (one graph call per image token) allocates nothing, copies no cache and creates no
Python objects per token beyond writing two small buffers:
- The KV cache is one preallocated buffer per cache tensor, [B, KV_heads, capacity, D] with
  capacity = prompt + generated tokens, bound once as both `past_key_values.*` and `present.*`:
  the graph's GroupQueryAttention writes each token's keys/values into it in place. On a GPU the
  buffers are device OrtValues and the cache never leaves the device.
- `input_ids`, `position_ids`, `seqlens_k`, `total_sequence_length` and `logits` are preallocated
  host buffers bound by pointer; a step only rewrites their contents, so every binding is made
  once for the prefill and once for the decode loop.

Logits are restricted to the codebook by the sampler, and exactly `num_tokens` image tokens are
produced (no early end-of-image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from glm_image_onnx.manifest import KV_CAPACITY_RULE, KV_LAYOUT
from .package import PackageError
from .sampling import TokenSampler

Progress = Callable[[str, int, int], None]


@dataclass
class ArResult:
    tokens: np.ndarray  # [num_tokens] int64, codebook ids in generation order
    prefill_s: float
    decode_s: float
    per_token_s: list[float] = field(default_factory=list)


# Cache element types: numpy's where numpy has one, else ONNX's TensorProto number (bfloat16 = 16),
# which OrtValue takes too. Nothing on the host ever reads a bfloat16 cache.
CACHE_ELEMENT_TYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16, "bfloat16": 16}


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
        self.cache_dtype = cache_contract(config)
        self.device, self.device_id = device, device_id

    def _cache_buffers(self, shape: list[int]) -> list[ort.OrtValue]:
        """One cache buffer per past/present pair, in the package's cache dtype, on the device
        that computes the graph."""
        element = CACHE_ELEMENT_TYPES[self.cache_dtype]
        return [ort.OrtValue.ortvalue_from_shape_and_type(shape, element, self.device, self.device_id)
                for _ in self.past_names]

    def generate(self, input_ids: np.ndarray, prefill_positions: np.ndarray, decode_positions: np.ndarray,
                 num_tokens: int, sampler: TokenSampler, progress: Progress | None = None) -> ArResult:
        """input_ids [1, S]; prefill_positions [3, 1, S]; decode_positions [1, 3, L] (mrope.rope_index)."""
        batch, prompt_len = input_ids.shape
        f32, i32, i64 = np.float32, np.int32, np.int64
        if num_tokens - 1 > decode_positions.shape[-1]:
            raise IndexError(f"{num_tokens} tokens need {num_tokens - 1} decode positions, "
                             f"{decode_positions.shape[-1]} were precomputed")
        shape = [batch, self.kv_heads, prompt_len + num_tokens, self.head_dim]  # KV_CAPACITY_RULE
        cache = self._cache_buffers(shape)  # held here: the binding keeps only their pointers
        io = self.session.io_binding()
        for past, present, buf in zip(self.past_names, self.present_names, cache):
            io.bind_ortvalue_input(past, buf)
            io.bind_ortvalue_output(present, buf)  # the same buffer: written in place
        seqlens = np.zeros(batch, dtype=i32)  # valid cache length after the call, minus 1
        total = np.zeros((), dtype=i32)
        io.bind_input("seqlens_k", "cpu", 0, i32, [batch], seqlens.ctypes.data)
        io.bind_input("total_sequence_length", "cpu", 0, i32, [], total.ctypes.data)

        t0 = time.perf_counter()
        ids = np.ascontiguousarray(input_ids, dtype=i64)
        positions = np.ascontiguousarray(prefill_positions, dtype=i64)
        prefill_logits = np.empty((batch, prompt_len, self.vocab), dtype=f32)
        seqlens[:], total[()] = prompt_len - 1, prompt_len
        io.bind_input("input_ids", "cpu", 0, i64, list(ids.shape), ids.ctypes.data)
        io.bind_input("position_ids", "cpu", 0, i64, list(positions.shape), positions.ctypes.data)
        io.bind_output("logits", "cpu", 0, f32, list(prefill_logits.shape), prefill_logits.ctypes.data)
        self.session.run_with_iobinding(io)
        logits = prefill_logits[:, -1, :]
        prefill_s = time.perf_counter() - t0

        # Decode: every per-token input is a preallocated buffer bound once; a step only rewrites
        # the token, its positions and the two lengths.
        token_buf = np.zeros((batch, 1), dtype=i64)
        pos_buf = np.zeros((3, batch, 1), dtype=i64)
        step_logits = np.empty((batch, 1, self.vocab), dtype=f32)
        positions_by_step = np.ascontiguousarray(decode_positions.transpose(2, 1, 0))  # [L, 3, B]
        io.bind_input("input_ids", "cpu", 0, i64, [batch, 1], token_buf.ctypes.data)
        io.bind_input("position_ids", "cpu", 0, i64, [3, batch, 1], pos_buf.ctypes.data)
        io.bind_output("logits", "cpu", 0, f32, [batch, 1, self.vocab], step_logits.ctypes.data)

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
            token_buf[:, 0] = tokens[:, step]
            pos_buf[:, :, 0] = positions_by_step[step]
            seqlens[:] = prompt_len + step  # this token's cache position
            total[()] = prompt_len + step + 1
            self.session.run_with_iobinding(io)
            logits = step_logits[:, -1, :]
            per_token.append(time.perf_counter() - t1)
        return ArResult(tokens=tokens[0] if batch == 1 else tokens, prefill_s=prefill_s,
                        decode_s=time.perf_counter() - t_decode, per_token_s=per_token)


def cache_contract(config: dict[str, Any]) -> str:
    """The cache dtype of an AR planner's manifest config, after checking the contract is one this
    runtime implements (layout, capacity rule, in-place update). Format-2 packages: float32."""
    kv = config.get("kv_cache")
    if not isinstance(kv, dict):  # format 2: the contract was prose, the cache float32
        return "float32"
    want = {"layout": KV_LAYOUT, "capacity": KV_CAPACITY_RULE}
    for key, value in want.items():
        if kv.get(key) != value:
            raise PackageError(f"ar_planner: kv_cache.{key} {kv.get(key)!r} is not supported by this runtime "
                               f"(it implements {value!r})")
    if kv.get("dtype") not in CACHE_ELEMENT_TYPES:
        raise PackageError(f"ar_planner: kv_cache.dtype {kv.get('dtype')!r} is not supported "
                           f"(supported: {', '.join(CACHE_ELEMENT_TYPES)})")
    return kv["dtype"]
