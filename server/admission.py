"""Admission control and the worker pool: inference never runs on the gRPC event loop.

At most `max_concurrency` requests execute at once (worker threads) and at most `max_queue` more
wait; one more is refused with RESOURCE_EXHAUSTED. Dynamically batched component models execute on
their batcher's thread, but their requests count against the same limit. Draining refuses new
requests with UNAVAILABLE and lets the admitted ones finish.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from glm_image_onnx.server import errors
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.memory import MemoryBudget


class Admission:
    def __init__(self, max_concurrency: int = 1, max_queue: int = 64, on_change: Callable[[int], None] | None = None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="glm-image-worker")
        self._cond = threading.Condition()
        self._in_flight = 0
        self._admitted: set[RequestContext] = set()  # what `abandon` cancels
        self._draining = False
        self._on_change = on_change
        self.memory: MemoryBudget | None = None  # set once the models are loaded (server.memory)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._draining

    def admit(self, ctx: RequestContext, memory: int = 0) -> None:
        """Take a slot, and `memory` bytes of the memory budget (if any), for this request or refuse
        it; `release` gives them back."""
        with self._cond:
            if self._draining:
                raise errors.unavailable("the server is shutting down; send the request to another replica")
            limit = self.max_concurrency + self.max_queue
            if self._in_flight >= limit:
                raise errors.exhausted(
                    f"server busy: {self._in_flight} requests in flight (max-concurrency {self.max_concurrency} "
                    f"+ max-queue {self.max_queue}); retry later")
            if self.memory is not None:
                self.memory.reserve(memory)
                ctx.memory = memory
            self._in_flight += 1
            self._admitted.add(ctx)
            count = self._in_flight
            self._cond.notify_all()
        ctx.t_admitted = time.perf_counter()
        if self._on_change:
            self._on_change(count)

    def release(self, ctx: RequestContext) -> None:
        with self._cond:
            if self.memory is not None:
                self.memory.release(ctx.memory)
            self._in_flight -= 1
            self._admitted.discard(ctx)
            count = self._in_flight
            self._cond.notify_all()
        if self._on_change:
            self._on_change(count)

    def hold_until_done(self, future: Future, ctx: RequestContext) -> Future:
        """Release the request's slot when its work has really ended (not when the client left)."""
        future.add_done_callback(lambda _: self.release(ctx))
        return future

    def abandon(self, error: RequestError) -> int:
        """Cancel every admitted request with `error` (the drain timeout passed): each is answered
        at once in its protocol's shape, its work stops at its next step; returns how many."""
        with self._cond:
            admitted = list(self._admitted)
        for ctx in admitted:
            ctx.cancel(error)
        return len(admitted)

    def run(self, ctx: RequestContext, fn: Callable[[], Any], executor: ThreadPoolExecutor | None = None) -> Future:
        """Run `fn` on a worker once one is free (of `executor`, else the server's pool); a request
        cancelled while queued never starts."""

        def task() -> Any:
            ctx.t_started = time.perf_counter()
            try:
                ctx.check()
                return fn()
            finally:
                ctx.t_finished = time.perf_counter()

        return (executor or self.executor).submit(task)

    def drain(self) -> None:
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no request is in flight; False if the timeout passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout_s)

    def wait_for_in_flight(self, count: int, timeout_s: float | None = None) -> bool:
        """Wait until at least `count` requests are in flight (admitted); False if the timeout passed
        first. Tests and benchmarks wait on admission with it instead of sleeping."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight >= count, timeout_s)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
