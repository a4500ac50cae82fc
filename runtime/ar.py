"""The AR planner's decoding loop on onnxruntime: prefill once, then one token per call.

The hot path (one graph call per image token) allocates nothing, copies no cache and creates no
Python objects per token beyond writing two small buffers:
- The KV cache (`KvCache`) is one preallocated buffer per cache tensor, [rows, KV_heads,
  capacity, D] with capacity = prompt + generated tokens, bound once as both `past_key_values.*`
  and `present.*`: the graph's GroupQueryAttention writes each token's keys/values into it in
  place. One row here; `runtime.ar_batch` binds runs of rows of one cache for generations that
  share decode steps. On a GPU the buffers are device memory and the cache never leaves the device.
- `input_ids`, `position_ids`, `seqlens_k`, `total_sequence_length` and `logits` are preallocated
  host buffers bound by pointer; a step only rewrites their contents, so every binding is made
  once for the prefill and once for the decode loop.

A static-shapes package (cann) writes by `cache_position` instead of the two lengths: its prompt is
padded to a bucket and its cache has a bucketed capacity, so the prefill has one of a few shapes and
every decode step the same one.

Logits are restricted to the codebook by the sampler, and exactly `num_tokens` image tokens are
produced (no early end-of-image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from glm_image_onnx.manifest import (KV_CAPACITY_BUCKETED, KV_CAPACITY_RULE, KV_LAYOUT, POSITION_IDS_LAYOUT,
                                     ArPlannerConfig)
from glm_image_onnx.runtime.package import PackageError
from glm_image_onnx.runtime.providers import release_arena
from glm_image_onnx.runtime.sampling import TokenSampler
from glm_image_onnx.runtime.shapes import ShapeBuckets

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "ar" (tokens) or "denoise" (steps). Raising from it
stops the generation (the server uses this for cancellations and deadlines)."""
Feeds = dict[str, np.ndarray]
FeedObserver = Callable[[str, Callable[[], "Feeds | None"]], None]
"""observer(graph, feeds): told of each call of a graph's session just before it runs (install it
with GlmImageOnnxPipeline.observe_feeds). `feeds()` gives the call's inputs as host arrays, views
that the call may overwrite (copy what you keep), or None when some of them live in device memory;
an observer that skips a call never pays for it. The quantiser records calibration data with it."""


@dataclass
class ArResult:
    tokens: np.ndarray  # [num_tokens] int64, codebook ids in generation order
    prefill_s: float
    decode_s: float
    per_token_s: list[float] = field(default_factory=list)
    batch_rows: int = 1  # the most rows a decode step of this generation had (runtime.ar_batch)
    queue_s: float = 0.0  # waiting for a free cache row (runtime.ar_batch)


# Cache element types: numpy's where numpy has one, else ONNX's TensorProto number (bfloat16 = 16),
# which OrtValue takes too. Nothing on the host ever reads a bfloat16 cache.
CACHE_ELEMENT_TYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16, "bfloat16": 16}


class ArPlanner:
    """Drives an AR planner graph; `buckets` pads a static-shapes package's calls (runtime.shapes)."""

    def __init__(self, session: ort.InferenceSession, config: ArPlannerConfig, device: str = "cpu",
                 device_id: int = 0, buckets: ShapeBuckets | None = None):
        self.session = session
        self.num_layers = config.num_layers
        self.kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.vocab = config.vision_vocab_size
        self.past_names = [t % i for i in range(self.num_layers)
                           for t in (config.past_key_template, config.past_value_template)]
        self.present_names = [t % i for i in range(self.num_layers)
                              for t in (config.present_key_template, config.present_value_template)]
        if config.position_ids_layout != POSITION_IDS_LAYOUT:
            raise PackageError(f"ar_planner: position_ids_layout {config.position_ids_layout!r} is not supported "
                               f"by this runtime (it computes {POSITION_IDS_LAYOUT!r}: runtime.mrope)")
        self.cache_dtype, self.static = cache_contract(config)
        self.buckets = buckets or ShapeBuckets()
        self.release = release_arena(session, device, device_id)
        if self.static and not self.buckets.static:
            raise PackageError("ar_planner: a bucketed kv_cache needs target.shape_buckets in the manifest")
        self.device, self.device_id = device, device_id
        self.observer: FeedObserver | None = None

    def new_cache(self, rows: int, capacity: int) -> "KvCache":
        return KvCache(self, rows, capacity)

    def capacity_for(self, prompt_len: int, num_tokens: int) -> int:
        """Cache positions a generation needs: a static-shapes package's bucket (KV_CAPACITY_*)."""
        padded, _ = self.buckets.prefill(prompt_len)
        return self.buckets.pad("capacity", max(padded, prompt_len + num_tokens))

    def length_inputs(self, batch: int, seq: int) -> dict[str, np.ndarray]:
        """The inputs saying where a call's `seq` tokens go, as buffers bound once per phase."""
        if self.static:
            return {"cache_position": np.zeros((batch, seq), np.int64)}
        return {"seqlens_k": np.zeros(batch, np.int32), "total_sequence_length": np.zeros((), np.int32)}

    def set_lengths(self, buffers: dict[str, np.ndarray], starts: np.ndarray | int, seq: int) -> None:
        """Row b's call writes its `seq` tokens at cache positions starts[b] .. starts[b] + seq - 1."""
        starts = np.asarray(starts, np.int64).reshape(-1, 1)
        if self.static:
            buffers["cache_position"][:] = starts + np.arange(seq)
            return
        buffers["seqlens_k"][:] = starts[:, 0] + seq - 1  # the valid length after the call, minus 1
        buffers["total_sequence_length"][()] = starts.max() + seq

    def bind(self, cache: "KvCache", first_row: int, rows: int, host: Feeds, logits: np.ndarray) -> "Binding":
        """An IO binding of cache rows first_row .. first_row + rows - 1 and of host buffers by
        pointer (a call only rewrites their contents), logits included."""
        io = self.session.io_binding()
        cache.bind(io, first_row, rows)
        for name, arr in host.items():
            io.bind_input(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        return Binding(io, host, logits, cache, first_row, rows)

    def run(self, binding: "Binding", run_options: ort.RunOptions | None = None) -> None:
        if self.observer is not None:
            self.observer("ar_planner", binding.feeds)
        self.session.run_with_iobinding(binding.io, run_options)

    def prefill(self, cache: "KvCache", row: int, input_ids: np.ndarray, positions: np.ndarray,
                release: bool = True) -> np.ndarray:
        """Run the prompt input_ids [1, S] (positions [3, 1, S]) into cache row `row`; the logits
        [1, vocab] of its last position. Static shapes: the prompt padded on the right to its bucket,
        or prefilled in chunks past the largest one (the pads write cache slots that decoding
        overwrites before reading them)."""
        prompt_len = input_ids.shape[1]
        padded, chunk = self.buckets.prefill(prompt_len)
        i64 = np.int64
        # The pads repeat the last token and position: any valid id and position would do (never read).
        ids = np.empty((1, padded), i64)
        ids[:, :prompt_len], ids[:, prompt_len:] = input_ids, input_ids[:, -1:]
        pos = np.empty((3, 1, padded), i64)
        pos[:, :, :prompt_len], pos[:, :, prompt_len:] = positions, positions[:, :, -1:]
        chunk_ids, chunk_pos = np.empty((1, chunk), i64), np.empty((3, 1, chunk), i64)
        chunk_logits = np.empty((1, chunk, self.vocab), dtype=np.float32)
        lengths = self.length_inputs(1, chunk)
        binding = self.bind(cache, row, 1, {"input_ids": chunk_ids, "position_ids": chunk_pos, **lengths},
                            chunk_logits)
        for start in range(0, padded, chunk):
            chunk_ids[:], chunk_pos[:] = ids[:, start:start + chunk], pos[:, :, start:start + chunk]
            self.set_lengths(lengths, start, chunk)
            # The prefill's [prompt x capacity] temporaries are not needed by the decode steps.
            last = start + chunk >= padded
            self.run(binding, self.release if last and release else None)
            if start <= prompt_len - 1 < start + chunk:
                logits = chunk_logits[:, prompt_len - 1 - start, :].copy()
        return logits

    def generate(self, input_ids: np.ndarray, prefill_positions: np.ndarray, decode_positions: np.ndarray,
                 num_tokens: int, sampler: TokenSampler, progress: Progress | None = None) -> ArResult:
        """input_ids [1, S]; prefill_positions [3, 1, S]; decode_positions [1, 3, L] (mrope.rope_index)."""
        prompt_len = input_ids.shape[1]
        i64 = np.int64
        check_decode_positions(num_tokens, decode_positions)
        cache = self.new_cache(1, self.capacity_for(prompt_len, num_tokens))
        t0 = time.perf_counter()
        logits = self.prefill(cache, 0, input_ids, prefill_positions)
        prefill_s = time.perf_counter() - t0

        # Decode: every per-token input is a preallocated buffer bound once; a step only rewrites
        # the token, its positions and where it goes.
        token_buf = np.zeros((1, 1), dtype=i64)
        pos_buf = np.zeros((3, 1, 1), dtype=i64)
        step_logits = np.empty((1, 1, self.vocab), dtype=np.float32)
        positions_by_step = np.ascontiguousarray(decode_positions.transpose(2, 1, 0))  # [L, 3, 1]
        lengths = self.length_inputs(1, 1)
        binding = self.bind(cache, 0, 1, {"input_ids": token_buf, "position_ids": pos_buf, **lengths}, step_logits)

        tokens = np.empty(num_tokens, dtype=i64)
        per_token: list[float] = []
        t_decode = time.perf_counter()
        for step in range(num_tokens):
            t1 = time.perf_counter()
            tokens[step] = sampler(logits)[0]
            if progress is not None:
                progress("ar", step + 1, num_tokens)
            if step == num_tokens - 1:
                break  # the last token needs no forward pass
            token_buf[0, 0] = tokens[step]
            pos_buf[:, :, 0] = positions_by_step[step]
            self.set_lengths(lengths, prompt_len + step, 1)  # this token's cache position
            self.run(binding, self.release if step == num_tokens - 2 else None)
            logits = step_logits[:, -1, :]
            per_token.append(time.perf_counter() - t1)
        return ArResult(tokens=tokens, prefill_s=prefill_s,
                        decode_s=time.perf_counter() - t_decode, per_token_s=per_token)


class KvCache:
    """The AR planner's cache as `rows` rows of [kv_heads, capacity, head_dim] per past/present
    pair, in the package's cache dtype, on the device that computes the graph. A call binds a run
    of consecutive rows (one row for a prefill, the active rows for a batched decode step) as both
    `past_key_values.*` and `present.*`: the graph writes each token's keys/values in place."""

    def __init__(self, planner: ArPlanner, rows: int, capacity: int):
        self.capacity = capacity
        self.names = list(zip(planner.past_names, planner.present_names))
        self.device, self.device_id = planner.device, planner.device_id
        shape = [rows, planner.kv_heads, capacity, planner.head_dim]
        self.element = CACHE_ELEMENT_TYPES[planner.cache_dtype]
        self.row_shape = shape[1:]
        if self.device == "cpu" and not isinstance(self.element, int):
            # Zeros (calloc: pages are touched only when a row is written): the static graph's
            # MatMul reads every slot (masked after the product), and uninitialised memory may hold
            # NaN, which no mask removes.
            self.buffers = [np.zeros(shape, self.element) for _ in self.names]
            self._ptrs = [a.ctypes.data for a in self.buffers]
            self.row_bytes = self.buffers[0].strides[0] if self.buffers else 0
        else:
            if planner.static:
                values = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.element), self.device,
                                                           self.device_id) for _ in self.names]
            else:
                values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.element, self.device, self.device_id)
                          for _ in self.names]
            self.buffers = values  # held: a binding keeps only pointers
            self._ptrs = [v.data_ptr() for v in values]
            itemsize = 2 if isinstance(self.element, int) else np.dtype(self.element).itemsize
            self.row_bytes = int(np.prod(self.row_shape)) * itemsize

    def bind(self, io: ort.IOBinding, first_row: int, n: int) -> None:
        shape = [n, *self.row_shape]
        for (past, present), ptr in zip(self.names, self._ptrs):
            address = ptr + first_row * self.row_bytes
            io.bind_input(past, self.device, self.device_id, self.element, shape, address)
            io.bind_output(present, self.device, self.device_id, self.element, shape, address)

    def host_rows(self, first_row: int, n: int) -> Feeds | None:
        """The past_key_values.* inputs of a call over these rows, as views of the host cache
        (None when the cache lives in device memory)."""
        if not self.buffers or not isinstance(self.buffers[0], np.ndarray):
            return None
        return {past: buf[first_row:first_row + n] for (past, _), buf in zip(self.names, self.buffers)}


@dataclass
class Binding:
    """An AR planner IO binding and the host arrays behind it (held here: the binding keeps only
    their pointers); `feeds` is what an observer sees."""

    io: ort.IOBinding
    host: Feeds
    logits: np.ndarray
    cache: KvCache
    first_row: int
    rows: int

    def feeds(self) -> Feeds | None:
        past = self.cache.host_rows(self.first_row, self.rows)
        return None if past is None else {**self.host, **past}


def check_decode_positions(num_tokens: int, decode_positions: np.ndarray) -> None:
    if num_tokens - 1 > decode_positions.shape[-1]:
        raise IndexError(f"{num_tokens} tokens need {num_tokens - 1} decode positions, "
                         f"{decode_positions.shape[-1]} were precomputed")


def cache_contract(config: ArPlannerConfig) -> tuple[str, bool]:
    """(cache dtype, bucketed?) of an AR planner's manifest config, after checking the contract is one
    this runtime implements (layout, capacity rule, in-place update). Format-2 packages: float32."""
    kv = config.kv_cache
    if kv.layout != KV_LAYOUT:
        raise PackageError(f"ar_planner: kv_cache.layout {kv.layout!r} is not supported by this runtime "
                           f"(it implements {KV_LAYOUT!r})")
    if kv.capacity not in (KV_CAPACITY_RULE, KV_CAPACITY_BUCKETED):
        raise PackageError(f"ar_planner: kv_cache.capacity {kv.capacity!r} is not supported by this runtime "
                           f"(it implements {KV_CAPACITY_RULE!r} and {KV_CAPACITY_BUCKETED!r})")
    if kv.dtype not in CACHE_ELEMENT_TYPES:
        raise PackageError(f"ar_planner: kv_cache.dtype {kv.dtype!r} is not supported "
                           f"(supported: {', '.join(CACHE_ELEMENT_TYPES)})")
    return kv.dtype, kv.capacity == KV_CAPACITY_BUCKETED
