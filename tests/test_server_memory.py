"""The memory budget (server.memory): costs measured at load, estimates reserved at admission, a
request past the budget refused with RESOURCE_EXHAUSTED / 429 naming --max-memory, never run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _server_helpers import PipelineSteps, glm_inputs, http, start_server
from test_cli import _assert_one_line_error, run_cli

from glm_image_onnx.server.memory import MARGIN, Cost, MemoryBudget, parse_size


def test_cost_fit_goes_through_both_points_and_never_below_zero() -> None:
    cost = Cost.fit(100, 1000, 200, 3000)
    assert cost(100) == 1000 * MARGIN and cost(200) == 3000 * MARGIN
    assert cost(10) == 1000 * MARGIN  # below the probed sizes: no less than the smaller one measured
    shrinking = Cost.fit(100, 1000, 400, 2000)  # noise: less than linear
    assert shrinking.b == 0 and shrinking(400) >= 2000 and shrinking(100) >= 1000
    assert Cost.fit(64, 640, 64, 900)(64) == 900 * MARGIN  # one size twice: the larger


@pytest.mark.parametrize("text,value", [("4G", 4 << 30), ("512M", 512 << 20), ("1.5k", 1536), ("0", 0), ("2GiB", 2 << 30)])
def test_sizes_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.fixture(scope="module")
def server(tiny_package: Path):
    srv = start_server(tiny_package)
    yield srv
    srv.stop()


def _budget(server, capacity: int) -> MemoryBudget:
    """Replace the server's budget by one with `capacity` bytes for requests."""
    budget = MemoryBudget(capacity, 0)
    server.server.state.admission.memory = budget
    return budget


def test_the_budget_is_measured_at_load(server) -> None:
    models = server.server.state.models
    glm = models["glm_image"]
    assert glm.cost is not None and glm.cost(1024 * 1024) > glm.cost(64 * 64) > 0
    assert models["dit_decoder"].cost is not None and models["vae_decoder"].cost is not None
    budget = server.server.state.admission.memory
    assert budget is not None and 0 < budget.baseline < budget.total


def test_a_request_past_the_budget_is_refused_before_it_runs(server) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    before = server.server.state.admission.memory
    glm = server.server.state.models["glm_image"]
    try:
        budget = _budget(server, glm.cost(64 * 64) + (1 << 20))  # and room for the message
        assert glm.cost(1024 * 1024) > budget.capacity
        with grpcclient.InferenceServerClient(server.url) as client:
            with pytest.raises(InferenceServerException) as info:
                client.infer("glm_image", glm_inputs(prompt="too big", height=1024, width=1024, steps=1))
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "--max-memory" in info.value.message()
            client.infer("glm_image", glm_inputs(prompt="fits", height=64, width=64, steps=1))
        status, _, body = http("POST", server.http_url + "/v1/images/generations",
                               json.dumps({"prompt": "too big", "size": "1024x1024"}).encode(),
                               {"Content-Type": "application/json"})
        assert status == 429 and "--max-memory" in json.loads(body)["error"]["message"]
        assert budget.reserved == 0
    finally:
        server.server.state.admission.memory = before


def test_requests_in_flight_hold_their_estimate(server) -> None:
    """One generation parked mid-denoising holds its estimate; a second that would pass the budget
    is refused as busy; once the first ends, the budget is whole again."""
    import threading

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    before = server.server.state.admission.memory
    glm = server.server.state.models["glm_image"]
    one = glm.cost(64 * 64)
    try:
        budget = _budget(server, one + one // 2)  # the messages (a few hundred bytes) fit in the half
        with PipelineSteps(server, hold=lambda prompt, stage, done, total: stage == "denoise") as steps:
            first = threading.Thread(target=lambda: grpcclient.InferenceServerClient(server.url).infer(
                "glm_image", glm_inputs(prompt="first", height=64, width=64, steps=2)))
            first.start()
            assert steps.held.wait(60) and one <= budget.reserved < one + (1 << 20)
            with grpcclient.InferenceServerClient(server.url) as client:
                with pytest.raises(InferenceServerException) as info:
                    client.infer("glm_image", glm_inputs(prompt="second", height=64, width=64, steps=1))
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "server busy" in info.value.message()
            steps.release()
            first.join(60)
        assert server.server.state.admission.wait_idle(60) and budget.reserved == 0
    finally:
        server.server.state.admission.memory = before


def test_serve_refuses_a_budget_smaller_than_the_package(tiny_package: Path) -> None:
    proc = run_cli("serve", str(tiny_package), "--port", "0", "--no-verify", "--max-memory", "1M")
    _assert_one_line_error(proc, 1, "--max-memory 1 MiB is less than")


def test_serve_refuses_a_malformed_budget(tiny_package: Path) -> None:
    proc = run_cli("serve", str(tiny_package), "--port", "0", "--max-memory", "lots")
    _assert_one_line_error(proc, 2, "--max-memory must be a size")


def test_the_budget_admits_the_largest_images_the_package_allows(server) -> None:
    """What the pipeline is built to do (tiling, per-row guidance) is not refused: a 1024x1024
    generation runs under the default budget, and the largest allowed one fits it."""
    import tritonclient.grpc as grpcclient

    glm = server.server.state.models["glm_image"]
    budget = server.server.state.admission.memory
    side = glm.limits.max_side
    assert glm.cost(side * side) < budget.capacity, (glm.cost(side * side), budget.capacity)
    with grpcclient.InferenceServerClient(server.url) as client:
        result = client.infer("glm_image", glm_inputs(prompt="a large one", height=1024, width=1024, steps=1))
    assert result.as_numpy("image_png") is not None and budget.reserved == 0
