"""Faults: a bad package (manifest, checksums, truncated graph, missing tokenizer), a provider that
cannot start, a client that leaves mid-stream, shutdown with requests in flight. Each ends in a clear
one-line error or a clean drain; nothing hangs (every wait is bounded)."""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import manifest_of
from _server_helpers import (PipelineSteps, ServeProcess, failed, finished, free_port, glm_inputs, next_progress,
                            outputs, requests_total, start_server, streamed, tensor, until,
                            tritonclient_grpc as grpcclient)
from tritonclient.utils import InferenceServerException

CLI = [sys.executable, "-c", "import sys; from glm_image_onnx.cli import main; sys.exit(main())"]


@pytest.fixture
def package(tiny_package: Path, tmp_path: Path) -> Path:
    out = tmp_path / "pkg"
    shutil.copytree(tiny_package, out)
    return out


def _serve(package: Path, *extra: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """`serve` that is expected to fail at start-up (a SIGTERM stops it if it ever gets ready)."""
    cmd = CLI + ["serve", str(package), "--port", str(free_port()), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "glm-image-onnx serve: error:" in ln]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------- integrity
def test_missing_malformed_or_unknown_manifest_exit_2(package: Path):
    (package / "manifest.json").rename(package / "moved.json")
    proc = _serve(package)
    assert proc.returncode == 2 and "no manifest.json" in _error_line(proc)

    (package / "manifest.json").write_text('{"format": "glm-image-onnx", "graphs": {')
    proc = _serve(package)
    assert proc.returncode == 2 and "malformed" in _error_line(proc)

    manifest = json.loads((package / "moved.json").read_text())
    manifest["format_version"] = 999
    (package / "manifest.json").write_text(json.dumps(manifest))
    proc = _serve(package)
    assert proc.returncode == 2 and "format_version 999" in _error_line(proc)

    (package / "manifest.json").write_text("[1, 2]")
    proc = _serve(package)
    assert proc.returncode == 2 and "not a JSON object" in _error_line(proc)


def test_corrupt_graph_fails_its_checksum_exit_2(package: Path):
    graph = package / manifest_of(package)["graphs"]["vae_decoder"]["file"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    graph.write_bytes(bytes(data))
    proc = _serve(package)
    line = _error_line(proc)
    assert proc.returncode == 2 and graph.name in line and "sha256" in line
    assert "port" not in line and "not verified" not in proc.stderr


def test_truncated_graph_without_verify_is_a_clear_load_error(package: Path):
    graph = package / manifest_of(package)["graphs"]["dit_decoder"]["file"]
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    proc = _serve(package, "--no-verify")
    line = _error_line(proc)
    assert proc.returncode == 1 and graph.name in line and "cannot" in line
    assert "file checksums not verified (--no-verify)" in proc.stderr  # the opt-out is announced

    proc = _serve(package)  # verified: the checksum names the file first
    assert proc.returncode == 2 and graph.name in _error_line(proc) and "sha256" in _error_line(proc)


def test_missing_tokenizer_file(package: Path):
    files = manifest_of(package)["files"]
    tokenizer = next(rel for rel in files if rel.endswith("tokenizer.json"))
    (package / tokenizer).unlink()
    proc = _serve(package)
    line = _error_line(proc)
    assert proc.returncode == 2 and "tokenizer.json" in line and "missing" in line
    proc = _serve(package, "--no-verify")
    line = _error_line(proc)
    assert proc.returncode == 1 and "cannot load" in line


def test_strict_provider_that_cannot_start(package: Path):
    import onnxruntime as ort

    if "CANNExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CANN provider")
    proc = _serve(package, "--no-verify", "--provider", "cann", "--strict")
    line = _error_line(proc)
    assert proc.returncode == 1 and re.search(r"cann", line, re.I), line


# ------------------------------------------------------------------------- clients and shutdown
@pytest.fixture(scope="module")
def server(tiny_package: Path):
    srv = start_server(tiny_package, max_concurrency=1)
    yield srv
    srv.stop()


def test_client_that_disconnects_mid_stream(server):
    """The client goes away after a progress response, twice: each time the worker (parked right after
    that step until the server has taken the cancel) stops at its next step, the generation never
    completes, the worker is freed for the next request."""
    admission = server.server.state.admission
    before = finished(server)
    with grpcclient.InferenceServerClient(server.url) as c:
        failures = failed(c)
    for attempt, stage in enumerate(("ar", "denoise")):  # once while planning, once while denoising
        cancelled = requests_total(server, "CANCELLED")
        prompt = f"a long walk {attempt}"
        with PipelineSteps(server, hold=streamed(stage)) as steps:
            client = grpcclient.InferenceServerClient(server.url)
            answers: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            client.async_stream_infer("glm_image", glm_inputs(prompt=prompt, height=512, width=512, steps=100,
                                                              seed=1), outputs=outputs("image"))
            next_progress(answers, stage)
            assert steps.held.is_set()
            client.stop_stream(cancel_requests=True)
            client.close()
            until(lambda: requests_total(server, "CANCELLED") == cancelled + 1, what="the server to take the cancel")
            steps.release()
            assert admission.wait_idle(60), "the abandoned request did not stop"
        run, (_, held_at, total) = steps.run(prompt), steps.held_at
        assert run.stopped, "the generation ended without its cancel check stopping it"
        assert run.last(stage) == held_at < total, f"it went on after the cancel: {run.passed[-3:]}"
        if stage == "ar":
            assert run.last("denoise") == 0
    assert finished(server) == before  # neither abandoned generation ran to its end
    with grpcclient.InferenceServerClient(server.url) as c:
        result = c.infer("glm_image", glm_inputs(prompt="next", height=64, width=64, steps=1, seed=2),
                         outputs=outputs("image"), client_timeout=60)
        assert result.as_numpy("image").shape == (64, 64, 3)
        assert failed(c) == failures + 2
    assert finished(server) == before + 1


def test_shutdown_drains_requests_in_flight(tiny_package: Path, tmp_path: Path):
    """SIGTERM with requests running and queued: those admitted finish, new ones get UNAVAILABLE, exit 0."""
    server = ServeProcess(tiny_package, "--no-verify", "--drain-timeout", "60", log_path=tmp_path / "serve.log")
    try:
        server.wait_ready()
        results: dict[int, object] = {}

        def call(i: int) -> None:
            try:
                with grpcclient.InferenceServerClient(server.url) as c:
                    # 0.5 to 4 s each on the tiny package, their denoising one at a time: once all three are
                    # admitted, seconds of work are left against the milliseconds the signal takes
                    r = c.infer("glm_image", glm_inputs(prompt=f"p{i}", height=512, width=512, steps=100, seed=i),
                                outputs=outputs("image"), client_timeout=60)
                    results[i] = r.as_numpy("image").shape
            except InferenceServerException as e:
                results[i] = e.status()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        server.wait_in_flight(3)  # all three admitted (running, or waiting for the DiT), as the server reports
        server.signal(signal.SIGTERM)
        server.wait_for_log("draining")
        with grpcclient.InferenceServerClient(server.url) as c:
            try:
                c.infer("vae_decoder", [tensor("latents", np.zeros((1, 4, 8, 8), np.float32), "FP32")],
                        client_timeout=10)
                late = "OK"
            except InferenceServerException as e:
                late = f"{e.status()}: {e.message()}"
        assert server.in_flight() >= 1, "the requests were done before the drain was checked"
        for t in threads:
            t.join(timeout=60)
    finally:
        code = server.stop()
    assert code == 0
    assert all(v == (512, 512, 3) for v in results.values()) and len(results) == 3, results
    assert re.match(r"StatusCode.UNAVAILABLE: .*(draining|shutting down)", late), late  # refused by the drain
    # the drain found them in flight: all three, or two if the first had already finished its DiT
    assert re.search(r"draining: [23] request\(s\) in flight", server.log), server.log
    assert "stopped" in server.log and "Traceback" not in server.log


def test_serve_flag_errors_exit_2(package: Path, tmp_path: Path):
    for flags, words in ((["--max-steps", "0"], "--max-steps must be >= 1"),
                         (["--max-axis-size", "-1"], "--max-axis-size"),
                         (["--max-pixels", "10"], "--max-pixels"),
                         (["--tls-cert", str(tmp_path / "c.pem")], "go together"),
                         (["--token-file", str(tmp_path / "none")], "no such file"),
                         (["--http-port", "70000"], "--http-port must be a port number")):
        proc = _serve(package, *flags, timeout=30)
        assert proc.returncode == 2 and words in _error_line(proc), (flags, proc.stderr)


def test_http_port_in_use_is_one_line_exit_1(package: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = _serve(package, "--no-verify", "--http-port", str(port), timeout=60)
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port} for HTTP" in _error_line(proc), proc.stderr
