"""Load behaviour: admission limits, cancellation and deadlines, dynamic batching, health,
reflection, metrics, and a SIGTERM drain of the real `glm-image-onnx serve` process."""

from __future__ import annotations

import queue
import re
import signal
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from _server_helpers import (Limits, PipelineSteps, ServeProcess, failed, finished, glm_inputs, next_progress,
                            outputs, requests_total, start_server, streamed, tensor, until,
                            tritonclient_grpc as grpcclient)
from tritonclient.utils import InferenceServerException

# 256x256 on the tiny preset takes ~10 ms per denoising step: LONG runs for a minute if not stopped.
LONG = dict(prompt="a long one", height=256, width=256, steps=5000, seed=1)
SMALL = dict(prompt="a short one", height=64, width=64, steps=2, seed=1)
# Parked at a known step until its cancel is taken (PipelineSteps): no race, so it need not be long.
WATCHED = dict(prompt="a watched one", height=256, width=256, steps=300, seed=1)


@pytest.fixture(scope="module")
def busy_server(tiny_package: Path):
    """One worker, no queue: a second request while one runs is refused."""
    srv = start_server(tiny_package, max_concurrency=1, max_queue=0, limits=Limits(max_steps=100000),
                       metrics_port=0)
    yield srv
    srv.stop()


def test_over_the_limit_is_resource_exhausted_and_cancel_stops_the_work(busy_server):
    with grpcclient.InferenceServerClient(busy_server.url) as client:
        done: queue.Queue = queue.Queue()
        before = finished(busy_server)
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
        assert finished(busy_server) == before  # stopped between steps, not after its 5000
        assert client.infer("glm_image", glm_inputs(**SMALL), outputs=outputs("image")).as_numpy("image") is not None


def test_client_deadline_stops_the_work(busy_server):
    with grpcclient.InferenceServerClient(busy_server.url) as client:
        before, failures = finished(busy_server), failed(client)
        with pytest.raises(InferenceServerException) as info:
            client.infer("glm_image", glm_inputs(**LONG), client_timeout=0.5)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert busy_server.server.state.admission.wait_idle(60), "the expired work did not stop"
        assert finished(busy_server) == before  # stopped between steps, not after its 5000
        assert failed(client) == failures + 1  # this request, counted once


def test_cancelled_stream_stops_the_work(busy_server):
    """The worker is parked after denoising step 1 (its progress sent) until the server has taken the
    client's cancel, then let go: it must stop at step 2's check, and the generation never completes."""
    before, cancelled = finished(busy_server), requests_total(busy_server, "CANCELLED")
    steps = PipelineSteps(busy_server, hold=streamed("denoise"))
    with steps, grpcclient.InferenceServerClient(busy_server.url) as client:
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("glm_image", glm_inputs(**WATCHED), request_id="long")
        assert next_progress(answers, "denoise")["progress_done"].int64_param == 1  # running, parked after step 1
        assert steps.held.is_set()
        client.stop_stream(cancel_requests=True)
        until(lambda: requests_total(busy_server, "CANCELLED") == cancelled + 1, what="the server to take the cancel")
        steps.release()
        assert busy_server.server.state.admission.wait_idle(60), "the stream's work did not stop"
    run = steps.run(WATCHED["prompt"])
    assert run.total("denoise") == WATCHED["steps"]
    assert run.stopped and run.last("denoise") == 1, f"{run.last('denoise')} steps run: the cancel was not seen"
    assert finished(busy_server) == before


def _scrape(srv) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The /metrics page of the exporter (--metrics-port), as text and as {(sample, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def test_metrics_endpoint(busy_server):
    """One refused, one cancelled and one served request, each counted once on the exporter's page."""
    _, before = _scrape(busy_server)
    with grpcclient.InferenceServerClient(busy_server.url) as client:
        done: queue.Queue = queue.Queue()
        call = client.async_infer("glm_image", glm_inputs(**LONG), callback=lambda result, error: done.put(error))
        assert busy_server.server.state.admission.wait_for_in_flight(1, 60), "the long request was not admitted"
        running, samples = _scrape(busy_server)
        assert samples[("glm_image_requests_in_flight", ())] == 1
        with pytest.raises(InferenceServerException) as info:
            client.infer("glm_image", glm_inputs(**SMALL))
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        call.cancel()
        assert "CANCELLED" in str(done.get(timeout=60).status())
        assert busy_server.server.state.admission.wait_idle(60), "the cancelled work did not stop"
        client.infer("glm_image", glm_inputs(**SMALL))
    text, after = _scrape(busy_server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    glm = dict(model="glm_image")
    assert 'glm_image_requests_total{model="glm_image",status="RESOURCE_EXHAUSTED"}' in text
    assert {status: delta("glm_image_requests_total", **glm, status=status)
            for status in ("OK", "RESOURCE_EXHAUSTED", "CANCELLED")} == {"OK": 1, "RESOURCE_EXHAUSTED": 1,
                                                                         "CANCELLED": 1}
    assert delta("glm_image_request_duration_seconds_count", **glm) == 3
    assert delta("glm_image_compute_duration_seconds_count", **glm, stage="dit") == 1  # the one that finished
    assert delta("glm_image_queue_duration_seconds_count", **glm) == 2  # the two that reached a worker
    assert after[("glm_image_requests_in_flight", ())] == 0
    assert after[("glm_image_server_ready", ())] == 1


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

    server = ServeProcess(tiny_package, "--no-verify", "--max-steps", "100000", "--drain-timeout", "120",
                          log_path=tmp_path / "serve.log")
    try:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            done: queue.Queue = queue.Queue()
            # 4000 denoising steps at 256x256: several seconds of work after it is admitted (1.5-5 ms a
            # step), against the few milliseconds the signal and the checks below take, and well over
            # the 2 s grace the gRPC server gives RPCs when it stops: a drain that did not wait for the
            # request would cut it off (1000 steps fitted in that grace on an idle machine)
            client.async_infer("glm_image", glm_inputs(**{**LONG, "steps": 4000}), outputs=outputs("image"),
                               callback=lambda result, error: done.put((result, error)))
            server.wait_in_flight(1)  # the server's own gauge: admitted
            server.signal(signal.SIGTERM)
            server.wait_for_log("draining")
            with grpc.insecure_channel(server.url) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not client.is_server_ready()
            with pytest.raises(InferenceServerException) as info:
                client.infer("glm_image", glm_inputs(**SMALL))
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert re.search("draining|shutting down", info.value.message()), info.value.message()
            assert server.in_flight() == 1, "the request was no longer in flight while the drain was checked"
            result, error = done.get(timeout=120)
            assert error is None, error
            assert result.as_numpy("image").shape == (256, 256, 3)
    finally:
        code = server.stop(30)
    assert code == 0
    log = server.log
    assert "draining: 1 request(s) in flight" in log and "stopped" in log
    assert log.count("status=OK") == 1 and "status=UNAVAILABLE" in log
