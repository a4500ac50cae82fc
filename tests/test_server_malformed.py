"""Malformed input on every front end (issue 30): each is a 4xx naming the field, never a 500 with an
exception's name in it; a 500 is for our own bugs only and carries a request id, not the exception;
a client that leaves while sending is a 499 logged at INFO; a client's string cannot split a log line.

Over the real server on loopback, with the stock clients (the openai SDK, tritonclient) where they
can send the input, raw HTTP and a raw gRPC stub where they refuse to; after each test the server
still serves a good request."""

from __future__ import annotations

import json
import logging
import re
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from _server_helpers import http, start_small_server, tensor, tritonclient_grpc as grpcclient, until
from glm_image_onnx.server.dataplane import DataPlane
from glm_image_onnx.server.openai_protocol import ImagesRequest
from glm_image_onnx.server.openai_serving import ImagesServing
from glm_image_onnx.server.wire import MAX_JSON_DEPTH

openai = pytest.importorskip("openai", reason="needs the test extra (openai)")

GOOD = {"prompt": "a good request", "size": "64x64", "steps": 1}
INTERNALS = re.compile(r"Traceback|<class |\b[A-Z][A-Za-z]*(Error|Exception)\b")  # an exception's name
JSON = "application/json"
HUGE = "9" * 5000  # past Python's int max str digits (4300)


@pytest.fixture(scope="module")
def server(tiny_package: Path):
    srv = start_small_server(tiny_package)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="not-checked", max_retries=0)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(autouse=True)
def still_serving(server):
    """After each test: nothing left admitted, and a good request over HTTP and gRPC still works."""
    yield
    until(lambda: server.server.state.admission.in_flight == 0, what="every request to finish")
    status, _, answer = http("POST", server.http_url + "/v1/images/generations", json.dumps(GOOD).encode(),
                             {"Content-Type": JSON})
    assert status == 200 and json.loads(answer)["data"][0]["b64_json"], answer[:300]
    with grpcclient.InferenceServerClient(server.url) as c:
        inputs = [tensor("prompt", "fine"), tensor("height", 64), tensor("width", 64), tensor("steps", 1)]
        assert c.infer("glm_image", inputs).as_numpy("image_png") is not None


def refused(server, route: str, body: bytes, status: int, field: str | None, words: list[str],
            content_type: str = JSON) -> str:
    """POST `body`; assert the status, the field (OpenAI's `param`; KServe's message names it), the
    words of the message and no exception name anywhere in the answer. Returns the message."""
    code, _, answer = http("POST", server.http_url + route, body, {"Content-Type": content_type}, timeout=30)
    text = answer.decode()
    assert code == status, text[:500]
    assert not INTERNALS.search(text), text[:500]
    error = json.loads(text)["error"]
    message = error["message"] if route.startswith("/v1") else error
    if route.startswith("/v1"):
        assert error["param"] == field, error
    elif field is not None:
        assert field in message, message
    assert all(w in message for w in words), message
    return message


def grpc_refused(call: Any, code: grpc.StatusCode, words: list[str]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    details = info.value.details()
    assert info.value.code() == code, details
    assert not INTERNALS.search(details) and all(w in details for w in words), details
    return details


def form(parts: list[tuple[str, bytes, str | None]], boundary: str = "b0undary") -> bytes:
    """A multipart body: (name, value, filename or None for a text field) per part."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "\r\nContent-Type: image/png" if filename else ""
        out += f"--{boundary}\r\nContent-Disposition: {disposition}{kind}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = "multipart/form-data; boundary=b0undary"
IMAGE = ("image", b"not decoded: the fields are refused first", "s.png")


def kserve(inputs: list[dict], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


PROMPT = {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]}


# ------------------------------------------------------------------------ integers Python refuses
INTEGERS = [
    ("/v1/images/generations", b'{"prompt": "x", "n": ' + HUGE.encode() + b"}", JSON, "n", ["5000 digits"]),
    ("/v1/images/generations", json.dumps({"prompt": "x", "n": "\u00b2"}).encode(), JSON, "n", ["integer"]),
    ("/v1/images/edits", form([IMAGE, ("prompt", b"x", None), ("n", "\u00b2".encode(), None)]), MULTIPART, "n",
     ["integer"]),
    ("/v2/models/glm_image/infer", kserve([PROMPT], parameters={"steps": 0}).replace(b" 0}", HUGE.encode() + b"}"),
     JSON, "parameters.steps", ["5000 digits"]),
    ("/v2/models/glm_image/infer", kserve([{**PROMPT, "shape": [0]}]).replace(b"[0]", f"[{HUGE}]".encode()),
     JSON, "inputs[0].shape[0]", ["5000 digits"]),
    ("/v2/models/glm_image/infer", kserve([PROMPT], parameters={"steps": "\u00b2"}), JSON, "steps", ["number"]),
]


@pytest.mark.parametrize("route,body,content_type,field,words", INTEGERS, ids=[f"{i}-{c[3]}" for i, c in
                                                                               enumerate(INTEGERS)])
def test_integers_python_will_not_convert_are_400(server, route, body, content_type, field, words):
    refused(server, route, body, 400, field, words, content_type)


def test_integers_python_will_not_convert_over_grpc(stub):
    request = service_pb2.ModelInferRequest(model_name="glm_image")
    request.inputs.add(name="prompt", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    request.parameters["steps"].string_param = "\u00b2"
    grpc_refused(lambda: stub.ModelInfer(request, timeout=20), grpc.StatusCode.INVALID_ARGUMENT, ["steps"])


# ------------------------------------------------------------------------------ lone surrogates
SURROGATES = [
    ("/v1/images/generations", b'{"prompt": "a \\ud800 cat", "size": "64x64"}', JSON, "prompt", ["surrogate"]),
    ("/v2/models/glm_image/infer", kserve([{**PROMPT, "data": ["\ud800"]}]), JSON, "inputs[0].data[0]",
     ["surrogate"]),
    ("/v2/models/glm_image/infer", kserve([PROMPT], parameters={"prompt": "\udfff"}), JSON, "parameters.prompt",
     ["surrogate"]),
    # Starlette decodes a form's text in the charset the request names: unicode_escape makes "\ud800" text
    ("/v1/images/edits", form([IMAGE, ("prompt", b"a \\ud800 cat", None)]), MULTIPART + "; charset=unicode_escape",
     "prompt", ["surrogate", "form field"]),
]


@pytest.mark.parametrize("route,body,content_type,field,words", SURROGATES, ids=[c[3] for c in SURROGATES])
def test_a_lone_surrogate_is_400_naming_the_field(server, route, body, content_type, field, words):
    refused(server, route, body, 400, field, words, content_type)


def test_a_lone_surrogate_over_grpc_is_invalid_argument(server, stub):
    # protobuf will not serialise it: the message is patched, as a client in another language could send it
    request = service_pb2.ModelInferRequest(model_name="glm_image", id="QQQQ")
    request.inputs.add(name="prompt", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    request.parameters["prompt"].string_param = "QQQQ"
    raw = request.SerializeToString().replace(b"QQQQ", b"\xed\xa0\x80Q")  # "\ud800" in UTF-8 (surrogatepass)
    call = grpc.insecure_channel(server.url).unary_unary("/inference.GRPCInferenceService/ModelInfer")
    grpc_refused(lambda: call(raw, timeout=20), grpc.StatusCode.INVALID_ARGUMENT, ["ModelInfer request", "UTF-8"])
    as_bytes = service_pb2.ModelInferRequest(model_name="glm_image")
    as_bytes.inputs.add(name="prompt", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"\xed\xa0\x80")
    grpc_refused(lambda: stub.ModelInfer(as_bytes, timeout=20), grpc.StatusCode.INVALID_ARGUMENT, ["prompt", "UTF-8"])


def test_a_malformed_message_in_a_stream_is_answered_in_band(server):
    bad = service_pb2.ModelInferRequest(model_name="glm_image", id="QQQQ").SerializeToString()
    good = service_pb2.ModelInferRequest(model_name="glm_image", id="good")
    good.inputs.add(name="prompt", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ok")
    for key, value in (("height", 64), ("width", 64), ("steps", 1)):
        good.parameters[key].int64_param = value
    good.parameters["progress"].bool_param = False
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        answers = list(call(iter([bad.replace(b"QQQQ", b"\xed\xa0\x80Q"), good.SerializeToString()]), timeout=60))
    failed = [a.error_message for a in answers if a.error_message]
    assert len(failed) == 1 and "ModelStreamInfer request" in failed[0] and not INTERNALS.search(failed[0]), failed
    assert [len(a.infer_response.outputs) for a in answers if a.infer_response.id == "good"] == [3]


# ----------------------------------------------------------------------------------- JSON depth
@pytest.mark.parametrize("route", ["/v1/images/generations", "/v2/models/glm_image/infer", "/v2/repository/index"])
def test_json_nested_100000_deep_is_400_at_parse_time(server, route):
    body = b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    refused(server, route, body, 400, None, [f"more than {MAX_JSON_DEPTH} levels"])


def test_json_nested_as_deep_as_a_tensor_may_be_is_read(server):
    """16 dimensions of nested lists (the most a tensor has) are within the depth bound."""
    data: Any = ["x"]
    for _ in range(15):
        data = [data]
    body = kserve([{"name": "prompt", "datatype": "BYTES", "shape": [1] * 16, "data": data}])
    refused(server, "/v2/models/glm_image/infer", body, 400, "prompt", ["shape [1]"])  # read, then refused: rank


# ------------------------------------------------------------------------------ multipart limits
MULTIPART_CASES = [
    ("too many files", form([IMAGE] * 6 + [("prompt", b"x", None)]), MULTIPART, 400, "image", ["files"]),
    ("too many fields", form([IMAGE] + [(f"f{i}", b"x", None) for i in range(100)]), MULTIPART, 400, None,
     ["fields"]),
    ("an oversized text part", form([IMAGE, ("prompt", b"x" * (2 << 20), None)]), MULTIPART, 413, None,
     ["text field", "bytes"]),
    ("no boundary", form([IMAGE]), "multipart/form-data", 400, None, ["multipart", "boundary"]),
    ("another boundary", form([IMAGE], boundary="other"), MULTIPART, 400, None, ["multipart"]),
]


@pytest.mark.parametrize("case,body,content_type,status,field,words", MULTIPART_CASES,
                         ids=[c[0] for c in MULTIPART_CASES])
def test_multipart_limits_are_4xx_naming_the_limit(server, case, body, content_type, status, field, words):
    refused(server, "/v1/images/edits", body, status, field, words, content_type)


# -------------------------------------------------------------------------------- hostile shapes
@pytest.mark.parametrize("shape", [[0, 2 ** 62], [2 ** 62, 2 ** 62, 0], [-1, 4], [0, -5]])
def test_hostile_shapes_as_json_data_are_400(server, shape):
    body = kserve([{"name": "latents", "datatype": "FP32", "shape": shape, "data": []}])
    refused(server, "/v2/models/vae_decoder/infer", body, 400, "latents", ["shape"])


# ---------------------------------------------------------------------- n images, one refused
def test_n_images_when_one_is_refused_for_a_full_queue_is_429(server, client, monkeypatch):
    # one worker, no queue: image 0 takes the slot, image 1 is refused before image 0 can finish
    monkeypatch.setattr(server.server.state.admission, "max_queue", 0)
    with pytest.raises(openai.RateLimitError) as info:
        client.images.generate(prompt="two cats", size="64x64", n=2, extra_body={"steps": 2})
    assert info.value.body["code"] == "rate_limit_exceeded" and "busy" in info.value.body["message"]
    assert not INTERNALS.search(json.dumps(info.value.body)), info.value.body


def test_n_images_when_one_seed_overflows_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="two cats", size="64x64", n=2, extra_body={"seed": 2 ** 63 - 1, "steps": 1})
    assert info.value.body["param"] == "seed" and "2^63" in info.value.body["message"]


# ------------------------------------------------------------------------------- lenient values
@pytest.mark.parametrize("kwargs,param", [
    (dict(size="64x64\n"), "size"), (dict(size="\uff16\uff14x\uff16\uff14"), "size"),  # full-width digits
    (dict(size="64x64", extra_body={"temperature": 1e-300}), "temperature"),
    (dict(size="64x64", extra_body={"top_p": 1e-300}), "top_p"),
], ids=["newline", "full-width", "temperature", "top_p"])
def test_lenient_values_are_refused(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", **kwargs)
    assert info.value.body["param"] == param, info.value.body


def test_sampling_values_that_vanish_in_float32_are_refused_everywhere(server):
    with grpcclient.InferenceServerClient(server.url) as c, pytest.raises(InferenceServerException) as info:
        c.infer("glm_image", [tensor("prompt", "x"), tensor("temperature", 1e-300)])  # FP32: 0
    assert "temperature must be between" in info.value.message()
    refused(server, "/v2/models/glm_image/infer", kserve([PROMPT], parameters={"top_p": 1e-300}), 400, "top_p",
            ["between"])


# ------------------------------------------------------------------------------------ our bugs
def test_our_bugs_are_500_with_a_request_id_and_no_exception(server, stub, monkeypatch, caplog):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("secret-internal-state")

    monkeypatch.setattr(ImagesServing, "images", broken)  # past the core: the HTTP route's own catch-all
    monkeypatch.setattr(DataPlane, "model_metadata", broken)  # the gRPC service's catch-all
    with caplog.at_level(logging.INFO, logger="glm_image_onnx.server"):
        status, _, answer = http("POST", server.http_url + "/v1/images/generations", json.dumps(GOOD).encode(),
                                 {"Content-Type": JSON})
        details = grpc_refused(lambda: stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="glm_image")),
                               grpc.StatusCode.INTERNAL, ["request id"])
    message = json.loads(answer)["error"]["message"]
    assert status == 500 and "request id" in message and "secret" not in answer.decode(), answer
    assert not INTERNALS.search(answer.decode()) and "secret" not in details
    for said in (message, details):  # the log has the exception under the id the client was given
        request_id = said.rsplit(" ", 1)[-1]
        assert any(request_id in r.getMessage() and r.exc_info and "secret" in str(r.exc_info[1])
                   for r in caplog.records), said
    monkeypatch.undo()


def test_our_bug_in_a_stream_ends_it_with_an_error_event(server, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("secret-internal-state")

    monkeypatch.setattr(ImagesRequest, "encode", broken)  # after the generation, while streaming
    status, _, answer = http("POST", server.http_url + "/v1/images/generations",
                             json.dumps({**GOOD, "stream": True}).encode(), {"Content-Type": JSON})
    text = answer.decode()
    assert status == 200 and "event: error" in text and "request id" in text, text[-400:]
    assert "secret" not in text and not INTERNALS.search(text)
    monkeypatch.undo()


def test_top_k_beyond_int32_is_400(server):
    refused(server, "/v2/models/glm_image/infer", kserve([PROMPT], parameters={"top_k": 10 ** 20}), 400, "top_k",
            ["INT32"])


# --------------------------------------------------------------------------------------- logs
def test_a_client_that_leaves_while_sending_is_499_at_info(server, caplog):
    def count() -> float:
        return server.server.metrics.registry.get_sample_value(
            "glm_image_http_requests_total", {"route": "generations", "code": "499"}) or 0.0

    before, errors_before = count(), server.server.metrics.registry.get_sample_value(
        "glm_image_http_requests_total", {"route": "generations", "code": "500"})
    with caplog.at_level(logging.INFO, logger="glm_image_onnx.server"):
        with socket.create_connection(("127.0.0.1", server.server.http_port)) as s:
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b'Content-Length: 100000\r\n\r\n{"prompt": "half a bo')
        until(lambda: count() == before + 1, what="the disconnect to be counted")
    mine = [r for r in caplog.records if r.name == "glm_image_onnx.server"]
    assert any(r.levelno == logging.INFO and "status=499" in r.getMessage() and "disconnected" in r.getMessage()
               for r in mine), [r.getMessage() for r in mine]
    assert not [r for r in mine if r.levelno >= logging.WARNING], [r.getMessage() for r in mine]
    assert server.server.metrics.registry.get_sample_value(
        "glm_image_http_requests_total", {"route": "generations", "code": "500"}) == errors_before


def test_a_client_newline_cannot_split_a_log_line(server, caplog):
    forged = "x\ninfer model=glm_image id=forged status=OK"
    with caplog.at_level(logging.INFO, logger="glm_image_onnx.server"):
        with grpcclient.InferenceServerClient(server.url) as c, pytest.raises(InferenceServerException):
            c.infer("glm_image", [tensor("prompt", "x"), tensor("height", 33)], request_id=forged)
        refused(server, "/v2/models/glm_image/infer", kserve([PROMPT], id=forged, parameters={"height": 33}), 400,
                "height", ["32"])
        assert http("POST", server.http_url + "/v2/models/a%0Ab%20status=OK/infer", kserve([PROMPT]))[0] == 404
        assert http("GET", server.http_url + "/v1/models/a%0Ab")[0] == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "glm_image_onnx.server"]
    assert sum("'x\\ninfer model=glm_image id=forged status=OK'" in line for line in lines) == 2, lines
    assert any("model='a\\nb status=OK'" in line for line in lines), lines
    assert any("/v1/models/a\\nb" in line for line in lines), lines
    assert not [line for line in lines if "\n" in line or "\r" in line], lines
