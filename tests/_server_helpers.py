"""Helpers for the server tests: the real server on a free loopback port, tritonclient inputs."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="needs the serve extra (tritonclient[grpc])")

from glm_image_onnx.server.app import ServerConfig, ServerThread  # noqa: E402
from glm_image_onnx.server.limits import Limits  # noqa: E402

GLM_TYPES = {"prompt": "BYTES", "image": "BYTES", "height": "INT32", "width": "INT32", "steps": "INT32",
             "guidance": "FP32", "seed": "INT64", "temperature": "FP32", "top_p": "FP32", "top_k": "INT32"}
NUMPY = {"BYTES": object, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(package: Path, load: bool = True, **overrides: Any) -> ServerThread:
    """The server with both front ends: gRPC, and HTTP on another free port (`http_url`)."""
    settings: dict[str, Any] = dict(host="127.0.0.1", port=0, http_port=0, verify_files=False) | overrides
    return ServerThread(ServerConfig(package=package, **settings)).start(load=load)


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


__all__ = ["Limits", "ServeProcess", "ServerThread", "free_port", "glm_inputs", "http", "outputs", "start_server",
           "tensor", "tritonclient_grpc"]
