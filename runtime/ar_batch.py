"""Continuous batching of the AR planner: concurrent generations share its decode steps.

At batch 1 a decode step is bound by reading the weights, not by arithmetic, so rows are almost
free: on the bench preset (2-core CPU) one step costs 8.7 ms for 1 row and 22 ms for 16. The engine
keeps one cache of `max_rows` rows (slots) and a thread that loops:

1. joiners: each waiting generation (first come, first served) takes the lowest free slot and is
   prefilled into it alone (onnxruntime's GroupQueryAttention takes seq > 1 after a non-empty past
   only at batch 1), then samples its first token;
2. one decode call for every active row: the rows' tokens, positions and lengths side by side
   (`seqlens_k`, or `cache_position` in a static-shapes package), the cache bound as the run of
   slots 0 .. highest active (a free slot in between computes a throwaway token at position 0);
3. each row samples from its own logits with its own generator and settings (sampling.sample_rows)
   and reports progress; it leaves when its tokens are complete or its progress callback raises
   (cancellation, deadline), without disturbing the others.

Rows never mix: attention reads only the row's own cache, each row's logits are its own, and
sampling goes along one row at a time, so a generation's tokens are the ones it gets alone (tests).
A generation whose cache needs more positions than the cache has waits until the running rows have
left, then the cache is reallocated (to the next power of two, or the package's capacity bucket).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from glm_image_onnx.runtime.ar import ArPlanner, ArResult, KvCache, Progress, check_decode_positions
from glm_image_onnx.runtime.sampling import Sampler, sample_rows

log = logging.getLogger("glm_image_onnx.runtime")

@dataclass(frozen=True)
class ArBatching:
    """Whether and how concurrent generations share AR decode steps (`serve` flags, ModelConfig)."""

    enabled: bool = True
    max_rows: int = 16  # cache rows: generations decoding at once; more wait for a free row
    join_wait_ms: float = 0.0  # how long a step waits for joiners when rows are free (0: never)

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError(f"ar max_rows must be >= 1, got {self.max_rows}")
        if not self.join_wait_ms >= 0:
            raise ValueError(f"ar join_wait_ms must be >= 0, got {self.join_wait_ms}")


OnStep = Callable[[str, int, float], None]
"""on_step(kind, rows, seconds): after every AR planner call, kind "prefill" (1 row) or "decode"."""


@dataclass
class _Row:
    input_ids: np.ndarray
    prefill_positions: np.ndarray
    positions_by_step: np.ndarray  # [L, 3, 1]
    num_tokens: int
    sampler: Sampler
    progress: Progress | None
    capacity: int
    future: Future = field(default_factory=Future)
    t_submit: float = field(default_factory=time.perf_counter)
    slot: int = -1
    tokens: np.ndarray | None = None
    done: int = 0  # tokens sampled so far
    prefill_s: float = 0.0
    queue_s: float = 0.0
    t_decode: float = 0.0
    per_token: list[float] = field(default_factory=list)
    max_rows: int = 1  # the most rows of a decode step it shared


class _StepBuffers:
    """Host buffers and an IO binding for a decode call over slots 0 .. n - 1, bound once."""

    def __init__(self, planner: ArPlanner, cache: KvCache, n: int):
        self.token = np.zeros((n, 1), np.int64)
        self.positions = np.zeros((3, n, 1), np.int64)
        self.logits = np.empty((n, 1, planner.vocab), np.float32)
        self.lengths = planner.length_inputs(n, 1)
        self.starts = np.zeros(n, np.int64)
        self.binding = planner.bind(cache, 0, n, {"input_ids": self.token, "position_ids": self.positions,
                                                  **self.lengths}, self.logits)


class ArBatchEngine:
    """Shares the AR planner's decode steps between concurrent `generate` calls (thread-safe)."""

    def __init__(self, planner: ArPlanner, options: ArBatching = ArBatching(), on_step: OnStep | None = None):
        self.planner = planner
        self.max_rows, self.join_wait_s, self.on_step = options.max_rows, options.join_wait_ms / 1e3, on_step
        self._cond = threading.Condition()
        self._pending: deque[_Row] = deque()
        self._rows: dict[int, _Row] = {}  # slot -> row
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._cache: KvCache | None = None
        self._steps: dict[int, _StepBuffers] = {}

    # ----------------------------------------------------------------------------------- API
    def generate(self, input_ids: np.ndarray, prefill_positions: np.ndarray, decode_positions: np.ndarray,
                 num_tokens: int, sampler: Sampler, progress: Progress | None = None) -> ArResult:
        """ArPlanner.generate, decoded together with whatever else is running (blocks until done)."""
        return self.submit(input_ids, prefill_positions, decode_positions, num_tokens, sampler, progress).result()

    def submit(self, input_ids: np.ndarray, prefill_positions: np.ndarray, decode_positions: np.ndarray,
               num_tokens: int, sampler: Sampler, progress: Progress | None = None) -> Future:
        check_decode_positions(num_tokens, decode_positions)
        capacity = self.planner.capacity_for(input_ids.shape[1], num_tokens)
        if not self.planner.static:  # one allocation serves every smaller generation after it
            capacity = 1 << (capacity - 1).bit_length()
        row = _Row(input_ids, prefill_positions, np.ascontiguousarray(decode_positions.transpose(2, 1, 0)),
                   num_tokens, sampler, progress, capacity)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the AR batch engine is stopped")
            self._pending.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ar-batch", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return row.future

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Stop the thread; generations still running or waiting fail with RuntimeError."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -------------------------------------------------------------------------------- thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._rows and not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    break
                if self.join_wait_s > 0 and self._rows and len(self._rows) + len(self._pending) < self.max_rows:
                    self._cond.wait(self.join_wait_s)  # let joiners catch this step
                joiners = self._take_joiners()
            try:
                for row in joiners:
                    self._join(row)
                if self._rows:
                    self._step()
            except Exception as e:  # noqa: BLE001 - onnxruntime, a sampler, a bug: the rows fail, callers never hang
                log.exception("AR batch engine: a decode step failed; its %d generation(s) fail", len(self._rows))
                for row in list(self._rows.values()):
                    self._leave(row, e)
        error = RuntimeError("the AR batch engine stopped before this generation finished")
        for row in [*self._rows.values(), *self._pending]:
            if not row.future.done():
                row.future.set_exception(error)
        self._rows.clear()
        self._pending.clear()

    def _take_joiners(self) -> list[_Row]:
        """Waiting rows that fit now, in arrival order (a row that needs a larger cache blocks the
        queue until the running rows have left, so it is not overtaken forever)."""
        joiners: list[_Row] = []
        free = [s for s in range(self.max_rows) if s not in self._rows]
        while self._pending and free:
            row = self._pending[0]
            if self._cache is None or row.capacity > self._cache.capacity:
                if self._rows or joiners:
                    break
                capacity = max(row.capacity, self._cache.capacity if self._cache else 0)
                self._cache, self._steps = None, {}  # the old buffers go before the new ones come
                try:
                    self._cache = self.planner.new_cache(self.max_rows, capacity)
                except Exception as e:  # noqa: BLE001 - e.g. out of device memory: this generation fails
                    self._pending.popleft().future.set_exception(e)
                    continue
            self._pending.popleft()
            row.slot = free.pop(0)
            joiners.append(row)
            self._rows[row.slot] = row
        return joiners

    def _join(self, row: _Row) -> None:
        t0 = time.perf_counter()
        row.queue_s = t0 - row.t_submit
        try:
            logits = self.planner.prefill(self._cache, row.slot, row.input_ids, row.prefill_positions, release=False)
            row.prefill_s = time.perf_counter() - t0
            if self.on_step is not None:
                self.on_step("prefill", 1, row.prefill_s)
            row.tokens = np.empty(row.num_tokens, np.int64)
            row.t_decode = time.perf_counter()
            self._accept(row, row.sampler(logits)[0])
        except BaseException as e:  # noqa: BLE001 - the row's own failure (a raising progress, onnxruntime)
            self._leave(row, e)

    def _accept(self, row: _Row, token: int) -> None:
        """Record a sampled token; the row leaves when complete (or when its progress raises)."""
        row.tokens[row.done] = token
        row.done += 1
        if row.progress is not None:
            row.progress("ar", row.done, row.num_tokens)
        if row.done == row.num_tokens:
            self._leave(row)

    def _leave(self, row: _Row, error: BaseException | None = None) -> None:
        with self._cond:
            self._rows.pop(row.slot, None)
        if error is not None:
            row.future.set_exception(error)
        else:
            row.future.set_result(ArResult(tokens=row.tokens, prefill_s=row.prefill_s,
                                           decode_s=time.perf_counter() - row.t_decode,
                                           per_token_s=row.per_token, batch_rows=row.max_rows,
                                           queue_s=row.queue_s))

    def _step(self) -> None:
        rows = sorted(self._rows.values(), key=lambda r: r.slot)
        n = rows[-1].slot + 1
        if n not in self._steps:
            self._steps[n] = _StepBuffers(self.planner, self._cache, n)
        buf = self._steps[n]
        buf.token[:] = 0
        buf.positions[:] = 0
        buf.starts[:] = 0
        for row in rows:
            buf.token[row.slot, 0] = row.tokens[row.done - 1]
            buf.positions[:, row.slot, 0] = row.positions_by_step[row.done - 1, :, 0]
            buf.starts[row.slot] = row.input_ids.shape[1] + row.done - 1  # this token's cache position
        self.planner.set_lengths(buf.lengths, buf.starts, 1)
        last = not self._pending and all(r.done + 1 == r.num_tokens for r in rows)
        # A failing call or sampler fails every row of the call: _loop's handler.
        t0 = time.perf_counter()
        self.planner.run(buf.binding, self.planner.release if last else None)
        seconds = time.perf_counter() - t0
        tokens = sample_rows([r.sampler for r in rows], buf.logits[[r.slot for r in rows], -1, :])
        for row, token in zip(rows, tokens):
            row.max_rows = max(row.max_rows, len(rows))
            row.per_token.append(seconds)
            try:
                self._accept(row, int(token))
            except BaseException as e:  # noqa: BLE001 - this row leaves; the others go on
                self._leave(row, e)
        if self.on_step is not None:
            self.on_step("decode", len(rows), seconds)
