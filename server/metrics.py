"""Prometheus metrics on their own registry, served over HTTP on --metrics-port.

Names start with `glm_image_`; the `model` label is the served model name, `stage` the pipeline
stage (`runtime.timings.STAGES`: `vision_tokenizer`, `ar_prefill`, `ar_decode`, `glyph`,
`condition`, `dit`, `vae`, `total`) or `infer` for a component graph. `glm_image_ar_*`: the AR planner's throughput (tokens per busy second) and, with
AR batching, how many generations share a decode call and how long they wait for a cache row.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("glm_image_requests", "Inference requests by final gRPC status",
                                ["model", "status"], registry=r)
        self.request_seconds = Histogram("glm_image_request_duration_seconds",
                                         "Request time from arrival to response", ["model"],
                                         buckets=_TIME_BUCKETS, registry=r)
        self.queue_seconds = Histogram("glm_image_queue_duration_seconds", "Time admitted requests waited for a worker",
                                       ["model"], buckets=_TIME_BUCKETS, registry=r)
        self.compute_seconds = Histogram("glm_image_compute_duration_seconds", "Compute time per stage",
                                         ["model", "stage"], buckets=_TIME_BUCKETS, registry=r)
        self.in_flight = Gauge("glm_image_requests_in_flight", "Admitted requests queued or running", registry=r)
        self.batch_size = Histogram("glm_image_batch_size", "Rows per execution of a dynamically batched model",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.ar_step_rows = Histogram("glm_image_ar_step_rows", "Generations sharing one AR planner decode call",
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.ar_tokens = Counter("glm_image_ar_tokens", "Image tokens the AR planner generated", registry=r)
        self.ar_busy_seconds = Counter("glm_image_ar_busy_seconds",
                                       "Time the AR planner spent in calls (prefill and decode)", registry=r)
        self.ar_queue_seconds = Histogram("glm_image_ar_queue_duration_seconds",
                                          "Time a generation waited for a free AR cache row", buckets=_TIME_BUCKETS,
                                          registry=r)
        self.ready = Gauge("glm_image_server_ready", "1 when the models are loaded and the server is not draining",
                           registry=r)
        self.http_requests = Counter("glm_image_http_requests", "HTTP requests by route and status code",
                                     ["route", "code"], registry=r)
        self._http = None

    def request_done(self, model: str, status: str, total_s: float, queue_s: float | None = None) -> None:
        self.requests.labels(model, status).inc()
        self.request_seconds.labels(model).observe(total_s)
        if queue_s is not None:
            self.queue_seconds.labels(model).observe(queue_s)

    def stages(self, model: str, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.compute_seconds.labels(model, stage).observe(seconds)

    def execution(self, model: str, rows: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(rows)
        self.compute_seconds.labels(model, "infer").observe(seconds)

    def ar_call(self, kind: str, rows: int, seconds: float) -> None:
        """AR planner work: one call of the batch engine (runtime.ar_batch's on_step, kind "prefill" or
        "decode"), or a whole generation decoded alone ("alone", rows = its tokens)."""
        if kind == "decode":
            self.ar_step_rows.observe(rows)
        self.ar_tokens.inc(rows)  # a prefill yields the first token
        self.ar_busy_seconds.inc(seconds)

    def http_request(self, route: str, code: int) -> None:
        self.http_requests.labels(route, str(code)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter; returns the bound port (port 0 picks a free one)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
