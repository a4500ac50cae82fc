"""Slow and greedy HTTP clients (issue 30): headers and bodies have read deadlines, idle keep-alive
connections close, and the bodies all requests hold at once are bounded (429 past the budget)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
from _server_helpers import http, start_server

from glm_image_onnx.server.limits import ConnectionLimits

LIMITS = ConnectionLimits(header_timeout=0.5, body_timeout=0.5, keep_alive=0.5, max_body_memory=1 << 20)
INFER = "/v2/models/vae_decoder/infer"


@pytest.fixture(scope="module")
def server(tiny_package: Path) -> Iterator:
    srv = start_server(tiny_package, connection=LIMITS)
    yield srv
    srv.stop()


def _connect(server) -> socket.socket:
    host, port = server.http_url.rsplit("//", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> tuple[bytes, float]:
    """Everything until the server closes the connection, and how long that took."""
    t0, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - t0


def _alive(server) -> None:
    assert http("GET", server.http_url + "/v2/health/ready")[0] == 200


@pytest.mark.parametrize("sent", [b"", b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Le"],
                         ids=["nothing", "half-headers"])
def test_a_client_that_never_finishes_its_headers_is_cut_off(server, sent: bytes) -> None:
    with _connect(server) as sock:
        sock.sendall(sent)
        data, waited = _read_all(sock)
    assert data == b"" and waited < 5, (data, waited)
    _alive(server)


@pytest.mark.parametrize("head", [b"Content-Length: 1000\r\n\r\n" + b"{" * 10,
                                  b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n"],
                         ids=["half-body", "unterminated-chunked"])
def test_a_stalled_body_gets_408(server, head: bytes) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head)
        data, waited = _read_all(sock)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"--body-timeout" in data and waited < 5
    _alive(server)


def test_an_idle_keep_alive_connection_is_closed(server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        data, waited = _read_all(sock)
    assert data.startswith(b"HTTP/1.1 200") and waited < 5


def test_bodies_held_at_once_are_bounded(server) -> None:
    """A body still arriving holds its declared size; a second one past the budget is refused at
    once (429, before its body is read), and the budget is free again when the first ends."""
    size = 700 << 10
    with _connect(server) as slow:
        slow.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % size)
        front = server.server.http
        assert any(front.body_bytes >= size or time.sleep(0.01) for _ in range(1000)), "no reservation taken"
        with _connect(server) as second:  # refused from its headers: its body is never read
            second.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            data, _ = _read_all(second)
        assert data.startswith(b"HTTP/1.1 429") and b"--max-body-memory-mb" in data, data[:300]
        data, _ = _read_all(slow)  # the stalled one ends with 408
        assert data.startswith(b"HTTP/1.1 408")
    status, _, body = http("POST", server.http_url + INFER, b"{" + b" " * (size - 1), {"Content-Type": "application/json"})
    assert status == 400, body[:300]  # read in full now: the budget was given back


def test_requests_past_the_drain_timeout_are_answered_in_their_protocols_shape(tiny_package: Path) -> None:
    """Three generations parked mid-denoising when a 0.3 s drain runs out: the SSE stream ends with
    an `error` event, the plain request gets a JSON 503, the gRPC one UNAVAILABLE; each names the drain."""
    import json
    import threading
    import urllib.request

    import tritonclient.grpc as grpcclient
    from _server_helpers import PipelineSteps, glm_inputs
    from tritonclient.utils import InferenceServerException

    srv = start_server(tiny_package)
    answers: dict[str, str] = {}

    def stream() -> None:
        body = json.dumps({"prompt": "streamed", "size": "64x64", "stream": True, "steps": 50}).encode()
        request = urllib.request.Request(f"{srv.http_url}/v1/images/generations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answers["sse"] = response.read().decode()

    def plain() -> None:
        status, _, body = http("POST", f"{srv.http_url}/v1/images/generations", json.dumps(
            {"prompt": "plain", "size": "64x64", "steps": 50}).encode(), {"Content-Type": "application/json"},
            timeout=120)
        answers["http"] = f"{status} {body.decode()}"

    def grpc() -> None:
        with grpcclient.InferenceServerClient(srv.url) as client:
            try:
                client.infer("glm_image", glm_inputs(prompt="over grpc", height=64, width=64, steps=50), client_timeout=120)
                answers["grpc"] = "OK"
            except InferenceServerException as e:
                answers["grpc"] = f"{e.status()} {e.message()}"

    try:
        with PipelineSteps(srv, hold=lambda prompt, stage, done, total: stage == "denoise") as steps:
            threads = [threading.Thread(target=f) for f in (stream, plain, grpc)]
            for t in threads:
                t.start()
            assert srv.server.state.admission.wait_for_in_flight(3, 60) and steps.held.wait(60)
            srv.call(srv.server.shutdown(0.3))
            for t in threads:
                t.join(60)
            steps.release()
    finally:
        srv.stop()
    assert "event: error" in answers["sse"] and "drain timeout" in answers["sse"], answers["sse"][-400:]
    status, body = answers["http"].split(" ", 1)
    assert status == "503" and "drain timeout" in json.loads(body)["error"]["message"], body
    assert answers["grpc"].startswith("StatusCode.UNAVAILABLE") and "drain timeout" in answers["grpc"], answers["grpc"]
