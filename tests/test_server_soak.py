"""Soak: a few hundred mixed requests from concurrent clients (component and pipeline requests, bad
ones, cancelled ones, ones whose deadline passes, streams) against the server in its own process.
Every good request is answered, and the server's RSS grows by a bounded amount. Bounded in count
and in time."""

from __future__ import annotations

import queue
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from _server_helpers import ServeProcess, glm_inputs, outputs, tensor, tritonclient_grpc as grpcclient
from tritonclient.utils import InferenceServerException

CLIENTS = 4
PER_CLIENT = 75  # 300 requests in all
WARMUP = 40
MAX_GROWTH_MB = 96
HUNG_S = 900  # a client still running after this is hung (each of its requests has a deadline)


def _rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


@pytest.fixture(scope="module")
def served(tiny_package: Path, tmp_path_factory):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's RSS")
    server = ServeProcess(tiny_package, "--no-verify", "--quiet", "--max-concurrency", "2", "--max-queue", "64",
                          "--threads", "1", log_path=tmp_path_factory.mktemp("soak") / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop(30) == 0, server.log


def _one(c, kind: str, rng: random.Random) -> str:
    """One request of the given kind; returns the outcome ('ok' or a status name)."""
    try:
        if kind == "vae":
            r = c.infer("vae_decoder", [tensor("latents", np.zeros((rng.randint(1, 3), 4, 8, 8), np.float32), "FP32")],
                        client_timeout=30)
            assert r.as_numpy("sample") is not None
        elif kind == "glyph":
            n = rng.randint(1, 12)
            c.infer("glyph_encoder", [tensor("input_ids", np.ones((1, n), np.int64), "INT64"),
                                      tensor("attention_mask", np.ones((1, n), np.int64), "INT64")], client_timeout=30)
        elif kind == "glm":
            r = c.infer("glm_image", glm_inputs(prompt=f"soak {rng.random()}", height=64, width=64, steps=1,
                                                seed=rng.randint(0, 99)), outputs=outputs("image_png"),
                        client_timeout=60)
            assert r.as_numpy("image_png")[0][:4] == b"\x89PNG"
        elif kind == "bad":
            c.infer("glm_image", glm_inputs(prompt="x", height=50), client_timeout=30)
        elif kind == "timeout":
            c.infer("glm_image", glm_inputs(prompt="slow", height=512, width=512, steps=100, seed=1),
                    client_timeout=0.2)
        elif kind == "cancel":
            done: queue.Queue = queue.Queue()
            call = c.async_infer("glm_image", glm_inputs(prompt="cancel me", height=512, width=512, steps=100, seed=1),
                                 callback=lambda result, error: done.put(error), client_timeout=30)
            time.sleep(rng.uniform(0.0, 0.1))
            call.cancel()
            error = done.get(timeout=30)
            return "cancelled" if error is not None else "ok"
        elif kind == "stream":
            answers: queue.Queue = queue.Queue()
            c.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=60)
            try:
                c.async_stream_infer("glm_image", glm_inputs(prompt="streamed", height=64, width=64, steps=2, seed=1),
                                     outputs=outputs("tokens"))
                while True:
                    result, error = answers.get(timeout=60)
                    assert error is None, error
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        break
            finally:
                c.stop_stream()
        return "ok"
    except InferenceServerException as e:
        return str(e.status()).replace("StatusCode.", "")


KINDS = ["vae"] * 8 + ["glyph"] * 4 + ["glm"] * 2 + ["bad"] * 3 + ["timeout", "cancel", "stream"]
GOOD = {"vae", "glyph", "glm", "stream"}


def test_soak_mixed_requests_bounded_memory(served):
    proc, url = served.proc, served.url
    outcomes: dict[str, dict[str, int]] = {}
    lock = threading.Lock()
    failures: list[str] = []
    start = time.monotonic()

    def warm() -> None:
        rng = random.Random(0)
        with grpcclient.InferenceServerClient(url) as c:
            for i in range(WARMUP):
                _one(c, KINDS[i % len(KINDS)], rng)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with grpcclient.InferenceServerClient(url) as c:
            for _ in range(PER_CLIENT):  # each request is bounded by its client_timeout
                kind = rng.choice(KINDS)
                try:
                    outcome = _one(c, kind, rng)
                except Exception as e:  # an assertion inside _one, or a queue timeout
                    outcome = f"error {type(e).__name__}: {e}"
                with lock:
                    outcomes.setdefault(kind, {})
                    outcomes[kind][outcome] = outcomes[kind].get(outcome, 0) + 1
                if kind in GOOD and outcome != "ok":
                    failures.append(f"{kind}: {outcome}")

    warm()
    rss_before = _rss_mb(proc.pid)
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HUNG_S)
    assert not any(t.is_alive() for t in threads), "a client hung"
    served.wait_in_flight(0, exactly=True)  # the cancelled and timed-out work has stopped too
    rss_after = _rss_mb(proc.pid)
    total = sum(sum(v.values()) for v in outcomes.values())
    print(f"\nsoak: {total} requests in {time.monotonic() - start:.1f}s from {CLIENTS} clients; "
          f"RSS {rss_before:.0f} -> {rss_after:.0f} MB; outcomes {outcomes}")
    assert not failures, failures[:5]
    assert total == CLIENTS * PER_CLIENT
    assert outcomes.get("bad", {}).keys() <= {"INVALID_ARGUMENT"}
    assert outcomes.get("timeout", {}).keys() <= {"DEADLINE_EXCEEDED"}
    assert rss_after - rss_before < MAX_GROWTH_MB, (rss_before, rss_after)
    assert proc.poll() is None
    with grpcclient.InferenceServerClient(url) as c:  # still serving afterwards
        r = c.infer("glm_image", glm_inputs(prompt="after", height=64, width=64, steps=1, seed=3),
                    outputs=outputs("image"), client_timeout=60)
        assert r.as_numpy("image").shape == (64, 64, 3)
