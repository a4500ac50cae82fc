"""Per-model statistics with true counts and durations, as Triton's ModelStatistics reports them."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from tritonclient.grpc import service_pb2


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

    def to_proto(self, name: str, version: str) -> service_pb2.ModelStatistics:
        with self._lock:
            out = service_pb2.ModelStatistics(name=name, version=version, last_inference=self.last_inference_ms,
                                              inference_count=self.inference_count,
                                              execution_count=self.execution_count)
            for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                count, ns = self._durations.get(field, (0, 0))
                getattr(out.inference_stats, field).count = count
                getattr(out.inference_stats, field).ns = ns
            for size in sorted(self._batches):
                b = out.batch_stats.add(batch_size=size)
                for field, (count, ns) in self._batches[size].items():
                    getattr(b, field).count = count
                    getattr(b, field).ns = ns
            return out
