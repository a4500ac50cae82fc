"""Load behaviour: admission limits, cancellation and deadlines, dynamic batching, health,
reflection, metrics, and a SIGTERM drain of the real `glm-image-onnx serve` process."""

from __future__ import annotations

import queue
import signal
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from _server_helpers import (Limits, ServeProcess, glm_inputs, outputs, start_server, tensor,
                            tritonclient_grpc as grpcclient)
from tritonclient.utils import InferenceServerException

# 256x256 on the tiny preset takes ~10 ms per denoising step: LONG runs for a minute if not stopped.
LONG = dict(prompt="a long one", height=256, width=256, steps=5000, seed=1)
SMALL = dict(prompt="a short one", height=64, width=64, steps=2, seed=1)


@pytest.fixture(scope="module")
def busy_server(tiny_package: Path):
    """One worker, no queue: a second request while one runs is refused."""
    srv = start_server(tiny_package, max_concurrency=1, max_queue=0, limits=Limits(max_steps=100000),
                       metrics_port=0)
    yield srv
    srv.stop()


def _finished(srv) -> int:
    """glm_image generations that ran to their end (a cancelled one never counts)."""
    return srv.server.state.models["glm_image"].stats.execution_count


def test_over_the_limit_is_resource_exhausted_and_cancel_stops_the_work(busy_server):
    with grpcclient.InferenceServerClient(busy_server.url) as client:
        done: queue.Queue = queue.Queue()
        finished = _finished(busy_server)
        call = client.async_infer("glm_image", glm_inputs(**LONG), callback=lambda result, error: done.put(error))
        assert busy_server.server.state.admission.wait_for_in_flight(1, 60), "the long request was not admitted"
        with pytest.raises(InferenceServerException) as info:
            client.infer("glm_image", glm_inputs(**SMALL))
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "max-concurrency 1" in info.value.message()
        with pytest.raises(InferenceServerException) as info:  # component models share the limit
            client.infer("vae_decoder", [tensor("latents", np.zeros((1, 4, 8, 8), np.float32), "FP32")])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        call.cancel()
        error = done.get(timeout=60)
        assert "CANCELLED" in str(error.status())
        assert busy_server.server.state.admission.wait_idle(60), "the cancelled work did not stop"
        assert _finished(busy_server) == finished  # stopped between steps, not after its 5000
        assert client.infer("glm_image", glm_inputs(**SMALL), outputs=outputs("image")).as_numpy("image") is not None


def test_client_deadline_stops_the_work(busy_server):
    with grpcclient.InferenceServerClient(busy_server.url) as client:
        finished = _finished(busy_server)
        with pytest.raises(InferenceServerException) as info:
            client.infer("glm_image", glm_inputs(**LONG), client_timeout=0.5)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert busy_server.server.state.admission.wait_idle(60), "the expired work did not stop"
        assert _finished(busy_server) == finished  # stopped between steps, not after its 5000
        stats = client.get_inference_statistics("glm_image", as_json=True)["model_stats"][0]
        assert int(stats["inference_stats"]["fail"]["count"]) >= 1


def test_cancelled_stream_stops_the_work(busy_server):
    with grpcclient.InferenceServerClient(busy_server.url) as client:
        progress: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: progress.put((result, error)))
        client.async_stream_infer("glm_image", glm_inputs(**LONG), request_id="long")
        progress.get(timeout=20)  # the first progress response: the work is running
        client.stop_stream(cancel_requests=True)
        assert busy_server.server.state.admission.wait_idle(60), "the stream's work did not stop"


def test_metrics_endpoint(busy_server):
    with grpcclient.InferenceServerClient(busy_server.url) as client:
        client.infer("glm_image", glm_inputs(**SMALL))
    url = f"http://127.0.0.1:{busy_server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'glm_image_requests_total{model="glm_image",status="OK"}' in text
    assert 'glm_image_requests_total{model="glm_image",status="RESOURCE_EXHAUSTED"}' in text
    assert 'glm_image_compute_duration_seconds_count{model="glm_image",stage="dit"}' in text
    assert 'glm_image_queue_duration_seconds_count{model="glm_image"}' in text
    assert "glm_image_requests_in_flight 0.0" in text
    assert "glm_image_server_ready 1.0" in text


def test_dynamic_batching_merges_concurrent_requests(tiny_package: Path):
    srv = start_server(tiny_package, max_concurrency=2, max_batch_size=8, max_queue_delay_us=1_000_000)
    try:
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal((1 + i % 2, 4, 8, 8), dtype=np.float32) for i in range(4)]
        inputs.append(rng.standard_normal((1, 4, 16, 8), dtype=np.float32))  # another shape: its own batch
        results: dict[int, np.ndarray] = {}
        together = threading.Barrier(len(inputs))

        def call(i: int) -> None:
            with grpcclient.InferenceServerClient(srv.url) as c:
                c.is_server_ready()  # connected before the barrier
                together.wait()
                results[i] = c.infer("vae_decoder", [tensor("latents", inputs[i], "FP32")]).as_numpy("sample")

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        session = srv.server.state.models["vae_decoder"].session
        for i, x in enumerate(inputs):
            np.testing.assert_allclose(results[i], session.run(None, {"latents": x})[0], rtol=1e-5, atol=1e-5)
        with grpcclient.InferenceServerClient(srv.url) as c:
            stats = c.get_inference_statistics("vae_decoder", as_json=True)["model_stats"][0]
        sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
        assert int(stats["inference_count"]) == 7  # rows
        assert int(stats["execution_count"]) < 5 and max(sizes) > 2, sizes
    finally:
        srv.stop()


def test_health_while_loading_then_serving_and_reflection(tiny_package: Path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    srv = start_server(tiny_package, load=False)
    try:
        with grpc.insecure_channel(srv.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda service="": health.Check(health_pb2.HealthCheckRequest(service=service)).status  # noqa
            assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert check("inference.GRPCInferenceService") == health_pb2.HealthCheckResponse.NOT_SERVING
            with grpcclient.InferenceServerClient(srv.url) as client:
                assert client.is_server_live() and not client.is_server_ready()
                with pytest.raises(InferenceServerException) as info:
                    client.infer("glm_image", glm_inputs(**SMALL))
                assert info.value.status() == "StatusCode.UNAVAILABLE" and "loading" in info.value.message()
                srv.call(srv.server.load(), timeout_s=120)
                assert client.is_server_ready() and client.is_model_ready("glm_image")
            assert check() == health_pb2.HealthCheckResponse.SERVING
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    finally:
        srv.stop()


def test_sigterm_drains_in_flight_requests(tiny_package: Path, tmp_path: Path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = ServeProcess(tiny_package, "--no-verify", "--max-steps", "100000", "--drain-timeout", "60",
                          log_path=tmp_path / "serve.log")
    try:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            done: queue.Queue = queue.Queue()
            client.async_infer("glm_image", glm_inputs(**{**LONG, "steps": 120}), outputs=outputs("image"),
                               callback=lambda result, error: done.put((result, error)))
            server.wait_in_flight(1)  # admitted; it then runs ~2 s (AR plan + 120 steps)
            server.signal(signal.SIGTERM)
            server.wait_for_log("draining")
            with grpc.insecure_channel(server.url) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not client.is_server_ready()
            with pytest.raises(InferenceServerException) as info:
                client.infer("glm_image", glm_inputs(**SMALL))
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            result, error = done.get(timeout=60)
            assert error is None, error
            assert result.as_numpy("image").shape == (256, 256, 3)
    finally:
        code = server.stop(30)
    assert code == 0
    log = server.log
    assert "draining: 1 request(s) in flight" in log and "stopped" in log
    assert log.count("status=OK") == 1 and "status=UNAVAILABLE" in log
