"""The protocol-free server core: both KServe front ends answer from it alike (metadata, config,
statistics, the repository index, errors, Triton's `timeout` parameter); one declared setting
reaches all three front ends; the OpenAI serving layer alone; an internal error is INTERNAL / 500."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from _server_helpers import glm_inputs, http, outputs, tritonclient_grpc as grpcclient
from glm_image_onnx.server import errors
from glm_image_onnx.server.glm_image_fields import FIELDS, SETTINGS
from glm_image_onnx.server.openai_protocol import EXTENSIONS, ImagesRequest
from glm_image_onnx.server.openai_serving import ImagesServing

openai = pytest.importorskip("openai", reason="needs the test extra (openai)")

SMALL = dict(height=64, width=64, steps=2)


@pytest.fixture(scope="module")
def grpc(server):
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def _get(server, route: str) -> tuple[int, dict]:
    status, _, body = http("GET", server.http_url + route)
    return status, json.loads(body) if body else {}


def _grpc_error(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


# ------------------------------------------------------------------------ the same answers
def test_grpc_and_http_describe_every_model_alike(server, grpc):
    grpc.infer("glm_image", glm_inputs(prompt="counted", seed=1, **SMALL), outputs=outputs("tokens"))
    for name in server.server.state.models:
        status, over_http = _get(server, f"/v2/models/{name}")
        assert status == 200
        assert json_format.ParseDict(over_http, service_pb2.ModelMetadataResponse()) == \
            grpc.get_model_metadata(name)
        status, over_http = _get(server, f"/v2/models/{name}/config")
        assert json_format.ParseDict(over_http, model_config_pb2.ModelConfig()) == grpc.get_model_config(name).config
        status, over_http = _get(server, f"/v2/models/{name}/stats")
        assert json_format.ParseDict(over_http, service_pb2.ModelStatisticsResponse()) == \
            grpc.get_inference_statistics(name)
    # every model's statistics (the glm_image request above counted), and the index
    status, over_http = _get(server, "/v2/models/stats")
    assert json_format.ParseDict(over_http, service_pb2.ModelStatisticsResponse()) == grpc.get_inference_statistics()
    glm = [s for s in over_http["model_stats"] if s["name"] == "glm_image"][0]
    assert glm["inference_stats"]["success"]["count"] >= 1 and "fail" in glm["inference_stats"]
    _, _, index = http("POST", server.http_url + "/v2/repository/index", b"{}")
    assert json_format.ParseDict({"models": json.loads(index)}, service_pb2.RepositoryIndexResponse()) == \
        grpc.get_model_repository_index()
    status, over_http = _get(server, "/v2")
    assert json_format.ParseDict(over_http, service_pb2.ServerMetadataResponse()) == grpc.get_server_metadata()


@pytest.mark.parametrize("route,call", [
    ("/v2/models/nope", lambda g: g.get_model_metadata("nope")),
    ("/v2/models/glm_image/versions/7/config", lambda g: g.get_model_config("glm_image", "7")),
    ("/v2/models/nope/stats", lambda g: g.get_inference_statistics("nope")),
])
def test_grpc_and_http_refuse_alike(server, grpc, route, call):
    status, body = _get(server, route)
    code, message = _grpc_error(lambda: call(grpc))
    assert (status, code) == (404, "StatusCode.NOT_FOUND") and body["error"] == message


def test_timeout_parameter_is_a_deadline_over_grpc_too(server, grpc):
    """tritonclient's `timeout` (microseconds) is the request parameter `timeout`, as over HTTP."""
    code, message = _grpc_error(lambda: grpc.infer("glm_image", glm_inputs(prompt="late", height=64, width=64,
                                                                           steps=50), timeout=1))
    assert code == "StatusCode.DEADLINE_EXCEEDED" and "deadline" in message
    code, message = _grpc_error(lambda: grpc.infer("glm_image", glm_inputs(prompt="late", **SMALL), timeout=-5))
    assert code == "StatusCode.INVALID_ARGUMENT" and "timeout" in message


# ---------------------------------------------------------------- one setting, every front end
def test_a_declared_setting_reaches_every_front_end(server, grpc):
    """`do_sample` is one entry of glm_image_fields.FIELDS; nothing else names it, yet gRPC tensors,
    KServe HTTP parameters, the OpenAI body and the client's flags all take it."""
    assert "do_sample" in SETTINGS and "do_sample" in EXTENSIONS and FIELDS["do_sample"].datatype == "BOOL"

    def tokens(**fields) -> np.ndarray:
        return grpc.infer("glm_image", glm_inputs(prompt="a greedy fox", **SMALL, **fields),
                          outputs=outputs("tokens")).as_numpy("tokens")

    greedy = tokens(seed=1, do_sample=False)
    assert np.array_equal(greedy, tokens(seed=2, do_sample=False))  # greedy: the seed no longer picks tokens
    assert not np.array_equal(tokens(seed=1), tokens(seed=2))  # sampled: it does
    body = json.dumps({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a greedy fox"]}],
                       "outputs": [{"name": "tokens"}],
                       "parameters": {**SMALL, "seed": 3, "do_sample": False}}).encode()
    status, _, answer = http("POST", server.http_url + "/v2/models/glm_image/infer", body)
    assert status == 200 and json.loads(answer)["outputs"][0]["data"] == greedy.tolist()

    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0)
    via_openai = client.images.generate(prompt="a greedy fox", size="64x64", response_format="b64_json",
                                        extra_body={"steps": 2, "seed": 4, "do_sample": False})
    image = grpc.infer("glm_image", glm_inputs(prompt="a greedy fox", seed=4, do_sample=False, **SMALL),
                       outputs=outputs("image_png")).as_numpy("image_png")[0]
    assert base64.b64decode(via_openai.data[0].b64_json) == image
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", size="64x64", extra_body={"do_sample": "sometimes"})
    assert info.value.body["param"] == "do_sample"


def test_client_flags_come_from_the_settings():
    from glm_image_onnx.cli import build_parser

    args = build_parser().parse_args(["client", "--prompt", "x", "--out", "o.png", "--no-do-sample", "--top-k", "3"])
    assert args.do_sample is False and args.top_k == 3 and all(hasattr(args, name) for name in SETTINGS)


# ---------------------------------------------------------------------------- OpenAI serving
def test_openai_serving_alone_parses_once_and_seeds_like_the_pipeline(server):
    from glm_image_onnx.runtime.sampling import image_seeds

    serving = ImagesServing(server.server.plane)
    ask = ImagesRequest({"prompt": "a cat", "n": 3, "size": "64x32", "seed": 5, "steps": 2}, edit=False)
    requests = serving.requests(ask, {})
    assert [r.seed for r in requests] == image_seeds(5, 3) == [5, 6, 7]
    assert {(r.prompt, r.height, r.width, r.steps) for r in requests} == {("a cat", 32, 64, 2)}
    drawn = serving.requests(ImagesRequest({"prompt": "a cat", "n": 2}, edit=False), {})
    assert drawn[1].seed == drawn[0].seed + 1
    with pytest.raises(errors.RequestError) as info:
        serving.requests(ImagesRequest({"prompt": "a cat", "n": 2, "seed": 2 ** 63 - 1}, edit=False), {})
    assert info.value.field == "seed"
    with pytest.raises(errors.RequestError) as info:
        serving.requests(ImagesRequest({"prompt": "a cat", "steps": 0}, edit=False), {})
    assert info.value.field == "steps" and "steps must be between 1 and" in info.value.message


# ------------------------------------------------------------------------------- our fault
def test_what_only_the_pipeline_could_refuse_is_checked_first(server, grpc):
    """A prompt carrying the image placeholder: the pipeline's prompt builder would raise ValueError,
    which is now INTERNAL (ours), so the request's own check must say INVALID_ARGUMENT first."""
    token = server.server.state.models["glm_image"].pipeline.prompts.image_token
    code, message = _grpc_error(lambda: grpc.infer("glm_image", glm_inputs(prompt=f"a {token} b", **SMALL)))
    assert code == "StatusCode.INVALID_ARGUMENT" and "reserved" in message and "prompt" in message



def test_an_internal_error_is_internal_not_the_clients_fault(server, grpc, monkeypatch, caplog):
    pipeline = server.server.state.models["glm_image"].pipeline

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")  # a numpy bug, say

    monkeypatch.setattr(pipeline, "generate_one", broken)
    with caplog.at_level(logging.INFO, logger="glm_image_onnx.server"):
        code, message = _grpc_error(lambda: grpc.infer("glm_image", glm_inputs(prompt="x", **SMALL),
                                                       request_id="bug-1"))
    # the client gets the request id, the log the exception: its class and message may hold internals
    assert code == "StatusCode.INTERNAL" and "bug-1" in message
    assert "broadcast" not in message and "ValueError" not in message
    assert any("bug-1" in r.getMessage() and "status=INTERNAL" in r.getMessage() for r in caplog.records)
    assert any("bug-1" in r.getMessage() and r.exc_info and "broadcast" in str(r.exc_info[1]) for r in caplog.records)
    body = json.dumps({"id": "bug-2", "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
                       "parameters": SMALL}).encode()
    status, _, answer = http("POST", server.http_url + "/v2/models/glm_image/infer", body)
    error = json.loads(answer)["error"]
    assert status == 500 and "bug-2" in error and "broadcast" not in error and "ValueError" not in error
    monkeypatch.undo()
    assert grpc.infer("glm_image", glm_inputs(prompt="fine again", **SMALL), outputs=outputs("tokens"))
