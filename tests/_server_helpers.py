"""Helpers for the server tests: the real server on a free loopback port, tritonclient inputs."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="needs the serve extra (tritonclient[grpc])")

from glm_image_onnx.server.app import ServerConfig, ServerThread  # noqa: E402
from glm_image_onnx.server.glm_image_fields import FIELDS  # noqa: E402
from glm_image_onnx.server.limits import Limits  # noqa: E402

GLM_TYPES = {name: f.datatype for name, f in FIELDS.items()}
NUMPY = {"BYTES": object, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(package: Path, load: bool = True, **overrides: Any) -> ServerThread:
    """The server with both front ends: gRPC, and HTTP on another free port (`http_url`)."""
    settings: dict[str, Any] = dict(host="127.0.0.1", port=0, http_port=0, verify_files=False) | overrides
    return ServerThread(ServerConfig(package=package, **settings)).start(load=load)


def start_small_server(package: Path) -> ServerThread:
    """The server with small bounds, for hostile-input tests: any request it accepts stays cheap on a
    shared CPU."""
    from glm_image_onnx.server.limits import ComponentLimits

    return start_server(package, limits=Limits(max_side=64, max_pixels=64 * 64, max_steps=2, max_image_bytes=1 << 20),
                        component_limits=ComponentLimits(max_tensor_elements=1 << 16, max_axis_size=64))


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         context: Any = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one plain HTTP request (urllib: no client library in between)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def tensor(name: str, value: Any, datatype: str | None = None) -> Any:
    datatype = datatype or GLM_TYPES[name]
    array = np.asarray(value if isinstance(value, (list, np.ndarray)) else [value], dtype=NUMPY.get(datatype))
    if datatype == "BYTES":
        array = np.array([v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)],
                         dtype=object).reshape(array.shape)
    t = tritonclient_grpc.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def glm_inputs(**fields: Any) -> list[Any]:
    return [tensor(name, value) for name, value in fields.items()]


def outputs(*names: str) -> list[Any]:
    return [tritonclient_grpc.InferRequestedOutput(n) for n in names]


def finished(srv: ServerThread, model: str = "glm_image") -> int:
    """Executions of `model` that ran to their end (its statistics' execution_count: a generation
    stopped by a cancel or a deadline never counts). Tests compare it before and after."""
    return srv.server.state.models[model].stats.execution_count


def failed(client: Any, model: str = "glm_image") -> int:
    """Failed requests to `model` in its statistics, read through a tritonclient gRPC client."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"].get("fail", {}).get("count", 0))


def requests_total(srv: ServerThread, status: str, model: str = "glm_image") -> float:
    """The server's glm_image_requests_total{model, status}, 0 before the label exists."""
    value = srv.server.metrics.registry.get_sample_value("glm_image_requests_total",
                                                         {"model": model, "status": status})
    return value or 0.0


def until(condition: Any, timeout_s: float = 60, what: str = "the condition") -> None:
    """Poll `condition()` (a read of what the server reports) until it holds; fail after `timeout_s`."""
    import time

    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.01)


def next_progress(answers: Any, stage: str, timeout_s: float = 60) -> Any:
    """Read a gRPC stream's (result, error) answers (a queue.Queue the stream callback fills) until a
    progress response of `stage` ("ar" or "denoise"); returns that response's parameters."""
    while True:
        result, error = answers.get(timeout=timeout_s)
        assert error is None, error
        params = result.get_response().parameters
        assert "progress_stage" in params, "the stream ended before its progress reached the stage"
        if params["progress_stage"].string_param == stage:
            return params


class Run:
    """One pipeline call of a generation, as the worker made it: the progress calls it got past."""

    def __init__(self, prompt: str):
        self.prompt = prompt
        self.passed: list[tuple[str, int, int]] = []  # (stage, done, total) the server's callback let through
        self.stopped = False  # the server's progress callback raised (a cancel or a deadline) and ended it

    def last(self, stage: str) -> int:
        """The last `stage` step ("ar": tokens, "denoise": steps) the generation went on from; 0 if none."""
        return max((done for s, done, _ in self.passed if s == stage), default=0)

    def total(self, stage: str) -> int:
        return max((total for s, _, total in self.passed if s == stage), default=0)


def streamed(stage: str, after: int = 1) -> Any:
    """A `PipelineSteps` hold: the first `stage` step from `after` on whose progress a stream sends
    (the server's own throttle of AR progress decides), so a client waiting for it does not wait on
    the parked worker."""
    from glm_image_onnx.server.inference import ar_throttled

    def hold(prompt: str, s: str, done: int, total: int) -> bool:
        sent: list[tuple] = []
        ar_throttled(lambda *a: sent.append(a))(s, done, total)
        return s == stage and done >= after and bool(sent)

    return hold


class PipelineSteps:
    """The glm_image pipeline of an in-process server, watched step by step for the duration of a
    `with`: the model's pipeline is wrapped so that every progress call a generation's worker makes
    (stage "ar" per token, "denoise" per step) is recorded in `runs`, counting as passed once the
    server's own callback (which raises when the request was cancelled or is past its deadline)
    returned. That is the worker's work itself, not what a client was sent or what a metric says.

    `hold(prompt, stage, done, total)`, if given, parks the worker right after the first step it
    matches (its progress already sent to the client) until `release()`: a test then cancels at a
    known step and lets the worker go on once the server has taken the cancel, with no race between
    the cancel and the work finishing on its own. A parked worker waits at most `hold_timeout_s`.
    With AR batching a generation's AR progress comes from the engine's thread: parked there, every
    generation's AR planning waits (the DiT and VAE of the others go on)."""

    def __init__(self, srv: ServerThread, hold: Any = None, hold_timeout_s: float = 120):
        import threading

        self.model = srv.server.state.models["glm_image"]
        self.runs: list[Run] = []
        self._hold = hold
        self._hold_timeout_s = hold_timeout_s
        self._lock = threading.Lock()
        self.held = threading.Event()  # set once a worker reached the hold step (then parks after its progress)
        self.held_at: tuple[str, int, int] | None = None  # (stage, done, total) where it parked
        self._released = threading.Event()
        self._original: Any = None

    def run(self, prompt: str) -> Run:
        """The one recorded generation of `prompt`."""
        with self._lock:
            found = [r for r in self.runs if r.prompt == prompt]
        assert len(found) == 1, f"{len(found)} generations of {prompt!r} recorded"
        return found[0]

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> "PipelineSteps":
        self._original = pipeline = self.model.pipeline
        steps = self

        class Watched:
            def __getattr__(self, name: str) -> Any:
                return getattr(pipeline, name)

            def __call__(self, prompt: Any, *args: Any, progress: Any = None, **kwargs: Any) -> Any:
                run = Run(prompt)
                with steps._lock:
                    steps.runs.append(run)

                def watched(stage: str, done: int, total: int) -> None:
                    park = False
                    if steps._hold is not None and not steps.held.is_set() and steps._hold(prompt, stage, done, total):
                        park = True
                        steps.held_at = (stage, done, total)
                        steps.held.set()  # before its progress goes out: whoever sees that progress sees this
                    try:
                        if progress is not None:
                            progress(stage, done, total)
                    except BaseException:
                        run.stopped = True
                        raise
                    run.passed.append((stage, done, total))
                    if park:
                        steps._released.wait(steps._hold_timeout_s)

                return pipeline(prompt, *args, progress=watched, **kwargs)

        self.model.pipeline = Watched()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._released.set()
        self.model.pipeline = self._original


class ServeProcess:
    """`glm-image-onnx serve PACKAGE ARGS` in its own process, the one way the tests start a server
    process: free loopback ports for gRPC, HTTP and metrics, the log in `log_path`. Waits are on
    what the server reports (its readiness, its log lines, its in-flight gauge), each bounded."""

    def __init__(self, package: Path, *args: str, log_path: Path, tls_ca: Path | None = None):
        import os
        import subprocess
        import sys

        self.port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = Path(log_path)
        self.tls_ca = tls_ca
        cmd = [sys.executable, "-m", "glm_image_onnx", "serve", str(package), "--port", str(self.port),
               "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port), *args]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def _until(self, condition: Any, what: str, timeout_s: float) -> None:
        import time

        end = time.monotonic() + timeout_s
        while not condition():
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}) before {what}:\n{self.log}"
            assert time.monotonic() < end, f"timed out after {timeout_s}s waiting for {what}:\n{self.log[-3000:]}"
            time.sleep(0.05)

    def wait_ready(self, timeout_s: float = 120) -> "ServeProcess":
        """Until /v2/health/ready answers 200 (the package is loaded)."""
        import ssl

        scheme, context = "http", None
        if self.tls_ca is not None:
            scheme, context = "https", ssl.create_default_context(cafile=str(self.tls_ca))

        def ready() -> bool:
            try:
                return http("GET", f"{scheme}://127.0.0.1:{self.http_port}/v2/health/ready", context=context,
                            timeout=5)[0] == 200
            except OSError:  # not listening yet
                return False

        self._until(ready, "the server to be ready", timeout_s)
        return self

    def wait_for_log(self, text: str, timeout_s: float = 60) -> None:
        self._until(lambda: text in self.log, f"the log line {text!r}", timeout_s)

    def in_flight(self) -> int:
        """The server's own gauge of admitted requests (glm_image_requests_in_flight)."""
        body = http("GET", f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)[2].decode()
        line = next(ln for ln in body.splitlines() if ln.startswith("glm_image_requests_in_flight "))
        return int(float(line.split()[1]))

    def wait_in_flight(self, count: int, timeout_s: float = 60, exactly: bool = False) -> None:
        """Until `count` or more (`exactly`: just `count`) requests are admitted and not yet done."""
        if exactly:
            self._until(lambda: self.in_flight() == count, f"{count} request(s) in flight", timeout_s)
        else:
            self._until(lambda: self.in_flight() >= count, f"at least {count} request(s) in flight", timeout_s)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM (a drain), then the exit code; killed if it does not exit in time."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise


__all__ = ["Limits", "PipelineSteps", "Run", "ServeProcess", "ServerThread", "finished", "free_port", "glm_inputs",
           "http", "next_progress", "outputs", "requests_total", "start_server", "streamed", "tensor",
           "tritonclient_grpc", "until"]
