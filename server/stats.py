"""Per-model statistics with true counts and durations, as Triton's ModelStatistics reports them
(plain data: `dataplane` says why)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

INFERENCE_FIELDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


class ModelStats:
    """Counts: a request is one inference of `batch` rows; an execution is one graph/pipeline run
    (a dynamic batch of several requests is one execution)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inference_count = 0  # rows inferred successfully
        self.execution_count = 0
        self.last_inference_ms = 0
        self._durations: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # name -> [count, ns]
        self._batches: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))

    def _add(self, name: str, seconds: float) -> None:
        d = self._durations[name]
        d[0] += 1
        d[1] += _ns(seconds)

    def request_done(self, ok: bool, total_s: float, queue_s: float = 0.0, input_s: float = 0.0,
                     infer_s: float = 0.0, output_s: float = 0.0, rows: int = 1) -> None:
        with self._lock:
            self.last_inference_ms = int(time.time() * 1000)
            if not ok:
                self._add("fail", total_s)
                return
            self.inference_count += rows
            self._add("success", total_s)
            self._add("queue", queue_s)
            self._add("compute_input", input_s)
            self._add("compute_infer", infer_s)
            self._add("compute_output", output_s)

    def execution_done(self, batch_size: int, infer_s: float, input_s: float = 0.0, output_s: float = 0.0) -> None:
        with self._lock:
            self.execution_count += 1
            b = self._batches[batch_size]
            for name, seconds in (("compute_input", input_s), ("compute_infer", infer_s),
                                  ("compute_output", output_s)):
                b[name][0] += 1
                b[name][1] += _ns(seconds)

    def snapshot(self, name: str, version: str) -> dict[str, Any]:
        """Triton's `ModelStatistics`, as plain data (every duration, zeros included, as Triton writes it)."""
        def duration(count_ns: list[int] | tuple[int, int]) -> dict[str, int]:
            return {"count": count_ns[0], "ns": count_ns[1]}

        with self._lock:
            return {
                "name": name, "version": version, "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {field: duration(self._durations.get(field, (0, 0))) for field in INFERENCE_FIELDS},
                "batch_stats": [{"batch_size": size, **{field: duration(d) for field, d in self._batches[size].items()}}
                                for size in sorted(self._batches)],
            }
