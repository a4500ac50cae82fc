"""Dynamic batching for component models whose every input and output has a leading batch axis.

Requests queue per model; one thread takes the oldest, adds every queued request with the same
non-batch shapes, dtypes and requested outputs (up to `max_batch_size` rows), waiting at most
`max_queue_delay_s` for more when the batch is not full, runs the graph once on the concatenation
and splits the outputs back. With a delay of 0 nothing waits: batches form from what queued while
the previous batch ran, so a lone request pays no latency.
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

from glm_image_onnx.server.context import RequestContext

log = logging.getLogger("glm_image_onnx.server")

RunBatch = Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


@dataclass
class _Pending:
    ctx: RequestContext
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    rows: int
    key: tuple
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    def __init__(self, name: str, run_batch: RunBatch, max_batch_size: int, max_queue_delay_s: float = 0.0,
                 on_execution: Callable[[int, float], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"{name}: max_batch_size must be >= 1, got {max_batch_size}")
        self.name = name
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)
        self.on_execution = on_execution
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, ctx: RequestContext, inputs: dict[str, np.ndarray], outputs: list[str]) -> Future:
        rows = int(next(iter(inputs.values())).shape[0])
        key = (tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(inputs.items())), tuple(outputs))
        item = _Pending(ctx, inputs, outputs, rows, key)
        with self._cond:
            if self._stopped:
                raise RuntimeError(f"{self.name}: batcher stopped")
            self._queue.append(item)
            self._cond.notify()
        return item.future

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------- worker
    def _take_compatible(self, batch: list[_Pending], rows: int) -> int:
        key = batch[0].key
        kept: deque[_Pending] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.key == key and rows + item.rows <= self.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        self._queue.extendleft(reversed(kept))
        return rows

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped and not self._queue:
                return None
            batch = [self._queue.popleft()]
            rows = self._take_compatible(batch, batch[0].rows)
            end = time.monotonic() + self.max_queue_delay_s
            while rows < self.max_batch_size and not self._stopped:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                rows = self._take_compatible(batch, rows)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = []
            for item in batch:
                if not item.future.set_running_or_notify_cancel():
                    continue  # the client left while it was queued
                try:
                    item.ctx.check()
                except Exception as e:  # cancelled or past its deadline: never starts
                    item.future.set_exception(e)
                    continue
                live.append(item)
            if live:
                self._execute(live)

    def _execute(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        for item in batch:
            item.ctx.t_started = start
        try:
            if len(batch) == 1:
                feeds = batch[0].inputs
            else:
                feeds = {n: np.concatenate([item.inputs[n] for item in batch], axis=0) for n in batch[0].inputs}
            outputs = self.run_batch(feeds, batch[0].outputs)
        except Exception as e:
            done = time.perf_counter()
            for item in batch:
                item.ctx.t_finished = done
                item.future.set_exception(e)
            return
        done = time.perf_counter()
        rows = sum(item.rows for item in batch)
        if self.on_execution:
            self.on_execution(rows, done - start)
        offset = 0
        for item in batch:
            item.ctx.t_finished = done
            part = {n: v[offset: offset + item.rows] for n, v in outputs.items()}
            offset += item.rows
            item.future.set_result(part)
