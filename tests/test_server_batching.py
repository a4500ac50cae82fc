"""glm_image with AR batching (the server's default), over gRPC with the stock tritonclient:
concurrent requests share AR decode steps, one is cancelled half-way, and the others get exactly
the tokens and images they get alone."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pytest

from _server_helpers import (PipelineSteps, finished, glm_inputs, outputs, requests_total, start_server, streamed,
                            tritonclient_grpc as grpcclient, until)
from glm_image_onnx.runtime import ArBatching

# Different seeds, sizes and sampling settings.
B = dict(prompt="a sign that says 'OPEN'", height=64, width=64, steps=2, seed=1, temperature=0.7, top_p=0.8)
C = dict(prompt="a red cat", height=96, width=64, steps=2, seed=2, temperature=1.2, top_k=7)
# Long enough in AR (about 1300 tokens) that B and C join it while it runs; cancelled half-way.
A = dict(prompt="a lighthouse", height=1024, width=1024, steps=1, seed=3)


@pytest.fixture(scope="module")
def server(tiny_package: Path):
    srv = start_server(tiny_package, components=False)
    yield srv
    srv.stop()


def _infer(url: str, fields: dict) -> tuple[np.ndarray, np.ndarray, int]:
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("glm_image", glm_inputs(**fields), outputs=outputs("tokens", "image"))
    rows = result.get_response().parameters["ar_batch_rows"].int64_param
    return result.as_numpy("tokens"), result.as_numpy("image"), rows


def test_concurrent_requests_share_ar_steps_and_keep_their_results(server) -> None:
    alone = {name: _infer(server.url, fields) for name, fields in (("B", B), ("C", C))}
    assert alone["B"][2] == alone["C"][2] == 1

    sent = streamed("ar")

    def half_way(prompt: str, stage: str, done: int, total: int) -> bool:
        """A's first AR token from half-way on whose progress the stream sends."""
        return prompt == A["prompt"] and done >= total // 2 and sent(prompt, stage, done, total)

    events: queue.Queue = queue.Queue()
    shared: dict[str, tuple] = {}
    engine = server.server.state.models["glm_image"].pipeline.ar_engine
    before, cancelled = finished(server), requests_total(server, "CANCELLED")
    # A's AR is parked (on the engine's thread) at its half-way token until the server has taken its
    # cancel, then let go: it must leave the batch at its next token.
    with PipelineSteps(server, hold=half_way) as steps, grpcclient.InferenceServerClient(server.url) as client:
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        client.async_stream_infer("glm_image", glm_inputs(**A), request_id="A", outputs=outputs("tokens"))
        first = True
        while True:
            result, error = events.get(timeout=120)
            assert error is None, error
            params = result.get_response().parameters
            done, total = params["progress_done"].int64_param, params["progress_total"].int64_param
            if first:  # A is decoding: B and C join its steps
                first = False
                threads = [threading.Thread(target=lambda n=n, f=f: shared.__setitem__(n, _infer(server.url, f)))
                           for n, f in (("B", B), ("C", C))]
                for t in threads:
                    t.start()
            if params["progress_stage"].string_param == "ar" and done >= total // 2:
                break
        assert steps.held_at == ("ar", done, total)
        client.stop_stream(cancel_requests=True)  # A leaves the batch half-way
        until(lambda: requests_total(server, "CANCELLED") == cancelled + 1, what="the server to take A's cancel")
        steps.release()
        for t in threads:
            t.join(timeout=120)
        assert server.server.state.admission.wait_idle(60)  # A's work really ended
    for name in ("B", "C"):
        tokens, image, rows = shared[name]
        np.testing.assert_array_equal(tokens, alone[name][0], err_msg=name)
        np.testing.assert_array_equal(image, alone[name][1], err_msg=name)
        assert rows >= 2, f"{name} decoded alone"
    a = steps.run(A["prompt"])
    assert a.stopped and a.last("ar") == done < total, f"A went on after its cancel to token {a.last('ar')}/{total}"
    assert a.last("denoise") == 0
    assert finished(server) == before + 2  # B and C; A never completed
    assert engine.active_rows == 0
    # the server goes on serving, and reports the batching
    assert _infer(server.url, B)[0].tolist() == alone["B"][0].tolist()
    metrics = server.server.metrics.text().decode()
    assert "glm_image_ar_step_rows_bucket" in metrics and "glm_image_ar_tokens_total" in metrics
    with grpcclient.InferenceServerClient(server.url) as client:
        params = client.get_model_config("glm_image").config.parameters
    assert params["ar_enabled"].string_value == "true" and params["ar_max_rows"].string_value == "16"


def test_batching_off_gives_the_same_results(server, tiny_package: Path) -> None:
    off = start_server(tiny_package, components=False, ar_batching=ArBatching(enabled=False))
    try:
        for fields in (B, C):
            a, b = _infer(server.url, fields), _infer(off.url, fields)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        with grpcclient.InferenceServerClient(off.url) as client:
            assert client.get_model_config("glm_image").config.parameters["ar_enabled"].string_value == "false"
    finally:
        off.stop()
