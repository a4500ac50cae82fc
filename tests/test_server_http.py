"""HTTP beside gRPC on the real server: the OpenAI Images API through the `openai` SDK, KServe v2
REST through `tritonclient.http` and curl, each result equal to the gRPC one for the same request,
and the refusals (status, message naming the field) after which the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _server_helpers import (Limits, PipelineSteps, finished, glm_inputs, http, outputs, requests_total, start_server,
                            tritonclient_grpc as grpcclient, until)

openai = pytest.importorskip("openai", reason="needs the test extra (openai)")
httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (test extra)")

SIZE = dict(height=64, width=64)
MAX_BODY = 8 << 20


@pytest.fixture(scope="module")
def server(tiny_package: Path):
    srv = start_server(tiny_package, max_message_bytes=MAX_BODY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="not-checked", max_retries=0)


def _grpc(server, **fields) -> dict[str, np.ndarray]:
    with grpcclient.InferenceServerClient(server.url) as c:
        result = c.infer("glm_image", glm_inputs(**fields), outputs=outputs("image", "tokens"))
        return {"image": result.as_numpy("image"), "tokens": result.as_numpy("tokens")}


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_generate_equals_grpc(server, client):
    response = client.images.generate(model="glm_image", prompt="a red bicycle", size="64x64", n=2,
                                      extra_body={"seed": 11, "steps": 2})
    assert len(response.data) == 2 and response.size == "64x64" and response.output_format == "png"
    for i, image in enumerate(response.data):  # image i takes seed + i, as the pipeline's batch call does
        assert np.array_equal(_pixels(image.b64_json), _grpc(server, prompt="a red bicycle", seed=11 + i,
                                                             steps=2, **SIZE)["image"])
    assert [m.id for m in client.models.list().data] == ["glm_image"]
    jpeg = client.images.generate(prompt="a red bicycle", size="64x64", output_format="jpeg",
                                  extra_body={"seed": 11, "steps": 2})
    assert base64.b64decode(jpeg.data[0].b64_json)[:2] == b"\xff\xd8"


def test_openai_edit_equals_grpc(server, client):
    sources = [_png(1), _png(2)]
    one = client.images.edit(image=("source.png", sources[0], "image/png"), prompt="make it blue",
                             size="64x64", extra_body={"seed": 5, "steps": 2})
    expected = _grpc(server, prompt="make it blue", image=sources[0], seed=5, steps=2, **SIZE)["image"]
    assert np.array_equal(_pixels(one.data[0].b64_json), expected)
    two = client.images.edit(image=[("a.png", sources[0], "image/png"), ("b.png", sources[1], "image/png")],
                             prompt="combine them", size="64x64", extra_body={"seed": 5, "steps": 2})
    with grpcclient.InferenceServerClient(server.url) as c:
        images = np.empty(2, dtype=object)
        images[:] = sources
        t = grpcclient.InferInput("image", [2], "BYTES")
        t.set_data_from_numpy(images)
        result = c.infer("glm_image", [t, *glm_inputs(prompt="combine them", seed=5, steps=2, **SIZE)],
                         outputs=outputs("image"))
    assert np.array_equal(_pixels(two.data[0].b64_json), result.as_numpy("image"))
    assert not np.array_equal(_pixels(two.data[0].b64_json), expected)


def test_openai_stream_sends_previews_with_progress(server, client):
    stream = client.images.generate(prompt="a lighthouse", size="64x64", stream=True, partial_images=2,
                                    extra_body={"seed": 21, "steps": 6})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partial = [e.model_dump() for e in events[:2]]
    assert [p["partial_image_index"] for p in partial] == [0, 1]
    assert [(p["progress_stage"], p["progress_done"], p["progress_total"]) for p in partial] == \
        [("denoise", 2, 6), ("denoise", 4, 6)]
    final = _pixels(events[-1].b64_json)
    assert np.array_equal(final, _grpc(server, prompt="a lighthouse", seed=21, steps=6, **SIZE)["image"])
    for p in partial:  # a preview is the step's estimate of the image: same size, not yet the image
        preview = _pixels(p["b64_json"])
        assert preview.shape == final.shape and not np.array_equal(preview, final)
    edit = list(client.images.edit(image=("s.png", _png(3), "image/png"), prompt="x", size="64x64", stream=True,
                                   extra_body={"seed": 1, "steps": 2}))
    assert [e.type for e in edit] == ["image_edit.completed"]


BAD = [  # (request, status, param, words in the message)
    (dict(prompt="a cat", size="100x64"), 400, "size", ["width", "multiple of 32"]),
    (dict(prompt="a cat", size="4096x4096"), 400, "size", ["4096", "limit"]),
    (dict(prompt="a cat", size="big"), 400, "size", ["WIDTHxHEIGHT"]),
    (dict(prompt="   ", size="64x64"), 400, "prompt", ["prompt is empty"]),
    (dict(prompt="a cat", size="64x64", n=0), 400, "n", ["n must be"]),
    (dict(prompt="a cat", size="64x64", response_format="url"), 400, "response_format", ["b64_json"]),
    (dict(prompt="a cat", size="64x64", extra_body={"steps": "many"}), 400, "steps", ["steps", "number"]),
    (dict(prompt="a cat", size="64x64", extra_body={"colour": "red"}), 400, "colour", ["unknown parameter"]),
    (dict(prompt="a cat", size="64x64", model="dall-e-3"), 404, "model", ["dall-e-3", "glm_image"]),
    (dict(prompt="a cat", size="64x64", extra_body={"output_format": ["png"]}), 400, "output_format", ["one of"]),
    (dict(prompt=["a", "cat"], size="64x64"), 400, "prompt", ["string"]),
    (dict(prompt="a cat", size="64x64", extra_body={"seed": {"x": 1}}), 400, "seed", ["number"]),
    (dict(prompt="x" * (20 << 20), size="64x64"), 413, None, ["limit", "--max-message-mb"]),
]


@pytest.mark.parametrize("kwargs,status,param,words", BAD, ids=[f"{b[1]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_openai_errors_name_the_field(server, client, kwargs, status, param, words):
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(**kwargs)
    error = info.value.body
    assert info.value.status_code == status, error
    assert error["param"] == param and all(w in error["message"] for w in words), error
    assert client.images.generate(prompt="still serving", size="64x64", extra_body={"steps": 1}).data


def test_openai_edit_errors(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("s.png", b"not an image", "image/png"), prompt="x", size="64x64")
    assert info.value.body["param"] == "image" and "readable" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("s.png", _png(1), "image/png"), mask=("m.png", _png(2), "image/png"), prompt="x")
    assert info.value.body["param"] == "mask"
    status, _, body = http("POST", f"{server.http_url}/v1/images/edits", b"prompt=x",
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and json.loads(body)["error"]["param"] == "image"


def test_tritonclient_http_infers_glm_image_and_glyph_encoder(server):
    url = server.http_url.removeprefix("http://")
    with httpclient.InferenceServerClient(url) as c, grpcclient.InferenceServerClient(server.url) as g:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("glm_image")
        assert c.get_server_metadata()["name"] == "glm-image-onnx"
        over_http = c.get_model_metadata("glyph_encoder")
        over_grpc = g.get_model_metadata("glyph_encoder", as_json=True)
        for tensors in ("inputs", "outputs"):  # protobuf's JSON writes int64 dims as strings: the only difference
            for t in over_grpc[tensors]:
                t["shape"] = [int(d) for d in t["shape"]]
        assert over_http == over_grpc
        assert [t["shape"] for t in over_http["inputs"]] == [[-1, -1], [-1, -1]]
        assert [t["name"] for t in over_http["outputs"]] == ["last_hidden_state"]
        config = c.get_model_config("glm_image")
        assert config["name"] == "glm_image" and config["parameters"]["ar_enabled"]["string_value"] == "true"
        assert {m["name"] for m in c.get_model_repository_index()} == set(server.server.state.models)

        inputs = []
        for name, value, datatype in (("prompt", np.array([b"a blue door"], object), "BYTES"),
                                      ("height", np.array([64], np.int32), "INT32"),
                                      ("width", np.array([64], np.int32), "INT32"),
                                      ("steps", np.array([2], np.int32), "INT32"),
                                      ("seed", np.array([9], np.int64), "INT64")):
            t = httpclient.InferInput(name, list(value.shape), datatype)
            t.set_data_from_numpy(value)
            inputs.append(t)
        result = c.infer("glm_image", inputs)
        expected = _grpc(server, prompt="a blue door", height=64, width=64, steps=2, seed=9)
        assert np.array_equal(result.as_numpy("image"), expected["image"])
        assert np.array_equal(result.as_numpy("tokens"), expected["tokens"])
        assert result.get_response()["parameters"]["seed"] == 9

        ids = np.random.default_rng(0).integers(0, 250, (2, 7)).astype(np.int64)
        reference = None
        for binary in (True, False):  # the binary-tensor extension and plain JSON tensors
            feeds = []
            for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
                t = httpclient.InferInput(name, list(array.shape), "INT64")
                t.set_data_from_numpy(array, binary_data=binary)
                feeds.append(t)
            out = c.infer("glyph_encoder", feeds, outputs=[httpclient.InferRequestedOutput("last_hidden_state",
                                                                                           binary_data=binary)])
            gfeeds = []
            for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
                t = grpcclient.InferInput(name, list(array.shape), "INT64")
                t.set_data_from_numpy(array)
                gfeeds.append(t)
            reference = g.infer("glyph_encoder", gfeeds).as_numpy("last_hidden_state")
            got = out.as_numpy("last_hidden_state")
            assert got.dtype == np.float32 and np.array_equal(got, reference) if binary else np.allclose(got, reference)
        stats = c.get_inference_statistics("glyph_encoder")["model_stats"][0]
        assert stats["name"] == "glyph_encoder" and stats["inference_stats"]["success"]["count"] >= 4


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_health_infer_and_stream(server):
    def curl(*args: str) -> str:
        return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60, check=True).stdout

    for route in ("/v2/health/live", "/v2/health/ready", "/v2/models/glyph_encoder/ready"):
        assert curl("-o", "/dev/null", "-w", "%{http_code}", server.http_url + route) == "200"
    body = {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [[5, 6, 7]]},
                       {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 1, 1]}]}
    out = json.loads(curl("-X", "POST", "-H", "Content-Type: application/json", "-d", json.dumps(body),
                          server.http_url + "/v2/models/glyph_encoder/infer"))
    assert out["model_name"] == "glyph_encoder" and out["outputs"][0]["shape"][:2] == [1, 3]
    events = curl("-N", "-H", "Content-Type: application/json", "-d",
                  json.dumps({"prompt": "a kite", "size": "64x64", "stream": True, "steps": 2, "seed": 1}),
                  server.http_url + "/v1/images/generations")
    assert ": progress ar " in events and ": progress denoise 2/2" in events
    assert "event: image_generation.completed" in events
    missing = curl("-o", "/dev/null", "-w", "%{http_code}", server.http_url + "/v2/models/nope/ready")
    assert missing == "404"


TRUNCATED = b'{"inputs":[{"name":"input_ids","shape":[1,2],"datatype":"INT64","parameters":{"binary_data_size":16}}]}'
KSERVE_BAD = [  # (route, body, headers, status, words)
    ("/v2/models/nope/infer", b"{}", {}, 404, ["unknown model 'nope'"]),
    ("/v2/models/glyph_encoder/infer", b"{not json", {}, 400, ["not valid JSON"]),
    ("/v2/models/glyph_encoder/infer", b'{"inputs": 3}', {}, 400, ["'inputs' must be a list"]),
    ("/v2/models/glyph_encoder/infer", TRUNCATED + bytes(5), {"Inference-Header-Content-Length": str(len(TRUNCATED))},
     400, ["binary_data_size 16 overruns"]),
    ("/v2/models/glyph_encoder/infer", b"{}", {"Inference-Header-Content-Length": "999"}, 400,
     ["Inference-Header-Content-Length"]),
    ("/v2/models/glyph_encoder/infer",
     b'{"inputs":[{"name":"input_ids","shape":[100000,100000,100000],"datatype":"INT64","data":[1]}]}', {}, 400,
     ["more than this server's limit"]),
    ("/v2/models/glyph_encoder/infer",
     b'{"inputs":[{"name":"input_ids","shape":[1,1],"datatype":"INT64","data":["a"]}]}', {}, 400,
     ["INT64 elements must be integers"]),
    ("/v2/models/glm_image/infer",
     b'{"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES","data":["x"]}],'
     b'"parameters":{"height":50}}', {}, 400, ["height must be a positive multiple of 32"]),
    ("/v2/repository/index", b"{oops", {}, 400, ["not valid JSON"]),
]


@pytest.mark.parametrize("route,body,headers,status,words", KSERVE_BAD, ids=[str(i) for i in range(len(KSERVE_BAD))])
def test_kserve_errors_are_the_protocols(server, route, body, headers, status, words):
    code, _, answer = http("POST", server.http_url + route, body, {"Content-Type": "application/json", **headers})
    assert code == status, answer
    message = json.loads(answer)["error"]
    assert all(w in message for w in words), message
    assert http("GET", server.http_url + "/v2/health/ready")[0] == 200


def test_drain_under_load_finishes_admitted_http_requests_and_refuses_new_ones(tiny_package: Path):
    """A streamed generation and two plain ones in flight when the drain starts: all three finish,
    health turns 503, a new request gets 503 naming the drain, then the port closes."""
    srv = start_server(tiny_package, limits=Limits(max_steps=100000))
    lines: list[str] = []
    answers: list[int] = []
    progressed = threading.Event()

    def long_stream() -> None:
        body = json.dumps({"prompt": "a slow one", "size": "64x64", "stream": True, "steps": 300}).encode()
        import urllib.request

        request = urllib.request.Request(f"{srv.http_url}/v1/images/generations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            for raw in response:
                lines.append(raw.decode())
                if raw.startswith(b": progress denoise"):
                    progressed.set()

    def plain(i: int) -> None:
        body = json.dumps({"prompt": f"queued {i}", "size": "64x64", "steps": 100}).encode()
        answers.append(http("POST", f"{srv.http_url}/v1/images/generations", body,
                            {"Content-Type": "application/json"}, timeout=300)[0])

    threads = [threading.Thread(target=long_stream)]
    try:
        threads[0].start()
        assert progressed.wait(120), "the streamed generation never reached denoising"
        threads += [threading.Thread(target=plain, args=(i,)) for i in range(2)]
        for t in threads[1:]:
            t.start()
        assert srv.server.state.admission.wait_for_in_flight(3, 60), "the two plain requests were not admitted"
        drained = threading.Thread(target=lambda: srv.call(srv.server.shutdown(120)))
        drained.start()
        assert _until(lambda: http("GET", srv.http_url + "/v2/health/ready")[0] == 503)
        status, _, body = http("POST", f"{srv.http_url}/v1/images/generations",
                               json.dumps({"prompt": "too late", "size": "64x64"}).encode(),
                               {"Content-Type": "application/json"})
        assert status == 503 and "draining" in json.loads(body)["error"]["message"]
        for t in threads:
            t.join(300)
        drained.join(120)
        with pytest.raises(OSError):  # drained: the port is closed
            http("GET", srv.http_url + "/v2/health/live", timeout=5)
    finally:
        srv.stop()
    assert any(line.startswith("event: image_generation.completed") for line in lines)
    assert answers == [200, 200]


def _until(condition, attempts: int = 2000) -> bool:
    """True once `condition()` holds (each attempt is one real request; no clock involved)."""
    return any(condition() for _ in range(attempts))


def test_a_client_leaving_mid_stream_stops_its_generation(server):
    """The worker is parked after denoising step 1 (its progress line sent) until the server has taken
    the disconnect, then let go: it must stop at step 2, and the generation never completes."""
    from http.client import HTTPConnection

    before, cancelled = finished(server), requests_total(server, "CANCELLED")
    with PipelineSteps(server, hold=lambda prompt, stage, done, total: stage == "denoise") as steps:
        connection = HTTPConnection(server.http_url.removeprefix("http://"), timeout=60)
        connection.request("POST", "/v1/images/generations", json.dumps(
            {"prompt": "never finished", "size": "64x64", "stream": True, "steps": 100}).encode(),
            {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response:
            if line.startswith(b": progress denoise"):
                break
        assert line.startswith(b": progress denoise 1/100") and steps.held.is_set(), line
        connection.sock.shutdown(2)  # gone, mid-denoising
        connection.close()
        until(lambda: requests_total(server, "CANCELLED") == cancelled + 1, what="the server to take the disconnect")
        steps.release()
        assert server.server.state.admission.wait_idle(60), "the abandoned generation kept running"
    run = steps.run("never finished")
    assert run.stopped and run.last("denoise") == 1 < run.total("denoise") == 100, \
        f"{run.last('denoise')} steps run: the disconnect did not stop it"
    assert finished(server) == before
    assert http("GET", server.http_url + "/v2/health/ready")[0] == 200


def test_kserve_timeout_parameter_is_a_deadline(server):
    body = json.dumps({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["late"]}],
                       "parameters": {"height": 64, "width": 64, "steps": 50, "timeout": 1}}).encode()
    status, _, answer = http("POST", server.http_url + "/v2/models/glm_image/infer", body)
    assert status == 504 and "deadline" in json.loads(answer)["error"]
    status, _, answer = http("POST", server.http_url + "/v2/models/glm_image/infer",
                             body.replace(b'"timeout": 1', b'"timeout": "soon"'))
    assert status == 400 and "timeout" in json.loads(answer)["error"]
