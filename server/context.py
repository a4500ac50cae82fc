"""Per-request state shared by the gRPC handler and the worker thread: cancellation, deadline, times.

The handler cancels the context when the client goes away; the worker checks it between AR tokens
and denoising steps (through the pipeline's progress callback) and before a queued request starts.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable

from glm_image_onnx.server import errors
from glm_image_onnx.server.errors import RequestError

_ids = itertools.count(1)


class RequestContext:
    def __init__(self, model: str, request_id: str = "", timeout_s: float | None = None, peer: str = "",
                 protocol: str = "grpc"):
        self.model = model
        self.protocol = protocol  # the front end: "grpc" or "http"
        self.request_id = request_id
        self.serial = next(_ids)
        self.peer = peer
        self.deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self.t_received = time.perf_counter()
        self.t_admitted = self.t_started = self.t_finished = None  # perf_counter stamps
        self.input_s = self.output_s = 0.0
        self.memory = 0  # bytes of the memory budget it holds (server.admission)
        self.wire_bytes = 0  # its message or body, held until it ends
        self.ar_rows: int | None = None  # glm_image: the most generations it shared an AR step with
        self._lock = threading.Lock()
        self._error: RequestError | None = None
        self._callbacks: list[Callable[[], None]] = []

    def set_timeout(self, timeout_s: float) -> None:
        """A deadline from the request itself (KServe's `timeout` parameter); the earlier one wins."""
        deadline = time.monotonic() + timeout_s
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)

    @property
    def label(self) -> str:
        return self.request_id or f"#{self.serial}"

    def cancel(self, error: RequestError | None = None) -> None:
        with self._lock:
            if self._error is not None:
                return
            self._error = error or errors.cancelled()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if self._error is None:
                self._callbacks.append(callback)
                return
        callback()

    @property
    def cancelled(self) -> bool:
        return self._error is not None

    def check(self) -> None:
        """Raise CANCELLED or DEADLINE_EXCEEDED if the work should stop now."""
        if self._error is not None:
            raise self._error
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel(errors.deadline())
            raise self._error  # type: ignore[misc]

    def queue_s(self) -> float:
        if self.t_admitted is None or self.t_started is None:
            return 0.0
        return max(0.0, self.t_started - self.t_admitted)

    def compute_s(self) -> float:
        if self.t_started is None or self.t_finished is None:
            return 0.0
        return max(0.0, self.t_finished - self.t_started)
