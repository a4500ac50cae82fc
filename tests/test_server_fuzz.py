"""Fuzzing the KServe endpoint with hypothesis: random and malformed ModelInferRequest protos (wrong
datatypes and shapes, truncated raw contents, bad BYTES length prefixes, huge dimensions, NaN / inf
and unknown parameters) sent through a raw gRPC stub, so that malformed ones really reach the server.
Every answer must be OK or a clean client-error status, never UNKNOWN / INTERNAL, and the server must
still serve a good request afterwards. Bounded: a fixed example count, a deadline per call."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest

from _server_helpers import http, start_small_server

hypothesis = pytest.importorskip("hypothesis", reason="needs hypothesis (test extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

from glm_image_onnx.server import glm_image_request as glm  # noqa: E402
from tritonclient.utils import triton_to_np_dtype  # noqa: E402

EXAMPLES = 200
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.RESOURCE_EXHAUSTED}
MODELS = ["glm_image"] * 3 + ["vae_decoder"] * 2 + ["glyph_encoder", "ar_planner", "dit_decoder", "nope", ""]
NAMES = ["prompt", "image", "height", "width", "steps", "guidance", "seed", "temperature", "top_p", "top_k",
         "latents", "input_ids", "attention_mask", "position_ids", "x", ""]
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES", "BF16", "STRING", "", "int32"]
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "UINT32": 4, "INT32": 4,
            "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
HUGE = [2 ** 31, 2 ** 32, 10 ** 12, 2 ** 62, 2 ** 63 - 1]
COUNTS = {"requests": 0, "codes": {}}


@pytest.fixture(scope="module")
def server(tiny_package: Path):
    srv = start_small_server(tiny_package)
    yield srv
    srv.stop()
    print(f"\nfuzzed {COUNTS['requests']} requests: {COUNTS['codes']}")


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.url, options=[("grpc.max_send_message_length", 64 << 20)])
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _bytes_contents(draw) -> bytes:
    kind = draw(st.sampled_from(["good", "huge_prefix", "truncated_prefix", "overrun", "junk"]))
    items = draw(st.lists(st.binary(max_size=12), max_size=3))
    good = b"".join(struct.pack("<I", len(i)) + i for i in items)
    if kind == "good":
        return good
    if kind == "huge_prefix":
        return good + struct.pack("<I", draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 1 << 30]))) + b"abc"
    if kind == "truncated_prefix":
        return good + b"\x05\x00"
    if kind == "overrun":
        return good + struct.pack("<I", 10) + b"short"
    return draw(st.binary(max_size=40))


@st.composite
def tensors(draw):
    name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=8)))
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.one_of(
        st.lists(st.integers(0, 8), max_size=4),
        st.lists(st.one_of(st.integers(-3, 70), st.sampled_from(HUGE)), max_size=6),
        st.lists(st.integers(1, 3), min_size=17, max_size=20),  # too many dimensions
    ))
    count = 1
    for d in shape:
        count *= max(d, 0)
    if datatype == "BYTES":
        raw = _bytes_contents(draw)
    elif datatype in ITEMSIZE and count <= 4096 and draw(st.booleans()):
        size = count * ITEMSIZE[datatype]
        raw = draw(st.sampled_from([
            bytes(size),
            size and np.random.default_rng(len(shape)).bytes(size),
            bytes(max(size - 1, 0)),  # truncated
            np.full(max(count, 0), np.nan, np.float32).tobytes() if datatype == "FP32" else bytes(size + 3),
        ])) or b""
    else:
        raw = draw(st.binary(max_size=64))
    return name, datatype, shape, raw


def _parameter(p: service_pb2.InferParameter, value) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


params_values = st.one_of(
    st.integers(-(2 ** 63), 2 ** 63 - 1), st.sampled_from([0, 1, 32, 64, 33, -1, 2 ** 31]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308]),
    st.booleans(), st.text(max_size=16), st.sampled_from(["nan", "inf", "64", "1e400", "a cat", "!!notbase64"]),
)


@st.composite
def requests(draw):
    req = service_pb2.ModelInferRequest(model_name=draw(st.sampled_from(MODELS)),
                                        model_version=draw(st.sampled_from(["", "", "", "", "1", "2"])),
                                        id=draw(st.text(max_size=8)))
    use_raw = draw(st.booleans())
    for name, datatype, shape, raw in draw(st.lists(tensors(), max_size=4)):
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        if use_raw:
            req.raw_input_contents.append(raw)
        elif datatype == "BYTES":
            t.contents.bytes_contents.extend([raw[:5]] * draw(st.integers(0, 3)))
        elif datatype in ("INT32", "INT8", "INT16"):
            t.contents.int_contents.extend(draw(st.lists(st.integers(-(2 ** 31), 2 ** 31 - 1), max_size=4)))
        elif datatype in ("FP32",):
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=4)))
        elif datatype in ("INT64",):
            t.contents.int64_contents.extend(draw(st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=4)))
    if use_raw and draw(st.integers(0, 9)) == 0:
        req.raw_input_contents.append(b"extra")  # more raw contents than inputs
    for key in draw(st.lists(st.sampled_from(NAMES[:10] + ["progress", "unknown", "priority", "timeout"]),
                             max_size=4)):
        _parameter(req.parameters[key], draw(params_values))
    for name in draw(st.lists(st.sampled_from(["image", "image_png", "tokens", "sample", "nope"]), max_size=2)):
        out = req.outputs.add(name=name)
        if draw(st.integers(0, 9)) == 0:
            out.parameters["shared_memory_region"].string_param = "region"
    return req


GLM_FIELDS = {name: glm.FIELDS[name].datatype for name in glm.SETTINGS}


@st.composite
def glm_requests(draw):
    """Well-formed glm_image requests with fuzzed values: they pass decoding and reach the checks (and,
    when every value is in range, the pipeline: cheap under this server's small bounds)."""
    req = service_pb2.ModelInferRequest(model_name="glm_image")
    prompt = draw(st.one_of(st.text(min_size=1, max_size=20).map(lambda t: t.encode("utf-8")), st.binary(max_size=8)))
    req.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(prompt)) + prompt)
    names = ["height", "width", "steps"] + draw(st.lists(st.sampled_from(sorted(GLM_FIELDS)), unique=True,
                                                         max_size=3))
    for name in dict.fromkeys(names):
        datatype = GLM_FIELDS[name]
        if datatype == "FP32":
            value = draw(st.one_of(st.floats(width=32), st.floats(0, 2, width=32)))
        elif name in ("height", "width"):
            value = draw(st.sampled_from([32, 64, 64, 64, 64, 0, -32, 96, 2 ** 31 - 1]))
        elif name == "steps":
            value = draw(st.sampled_from([1, 1, 2, 2, 0, -1, 3]))
        else:
            value = draw(st.integers(-(2 ** 31), 2 ** 31 - 1))
        req.inputs.add(name=name, datatype=datatype, shape=[1])
        req.raw_input_contents.append(np.array([value], triton_to_np_dtype(datatype)).tobytes())
    if draw(st.booleans()):
        req.outputs.add(name="tokens")
    return req


def _code(stub, request, timeout: float = 20.0) -> grpc.StatusCode:
    try:
        stub.ModelInfer(request, timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def _good(stub) -> None:
    req = service_pb2.ModelInferRequest(model_name="glm_image")
    t = req.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"a good request")
    for key, value in (("height", 64), ("width", 64), ("steps", 1), ("seed", 7)):
        req.parameters[key].int64_param = value
    response = stub.ModelInfer(req, timeout=60)
    assert {o.name for o in response.outputs} == {"image_png", "image", "tokens"}


def test_fuzzed_requests_get_clean_statuses(server, stub):
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(requests(), glm_requests()))
    def check(request):
        code = _code(stub, request)
        COUNTS["requests"] += 1
        COUNTS["codes"][code.name] = COUNTS["codes"].get(code.name, 0) + 1
        assert code in CLEAN, (code, request)

    check()
    _good(stub)
    assert COUNTS["requests"] >= EXAMPLES
    assert server.server.state.admission.in_flight == 0


HANDMADE = [
    ("BYTES length prefix claims 4 GB", "glm_image", "prompt", "BYTES", [1], struct.pack("<I", 0xFFFFFFFF) + b"x"),
    ("shape claims 10^12 elements", "vae_decoder", "latents", "FP32", [10 ** 6, 10 ** 6], b""),
    ("int64 overflow of the element count", "vae_decoder", "latents", "FP32", [2 ** 32, 2 ** 32, 4, 4], b""),
    ("truncated raw contents", "vae_decoder", "latents", "FP32", [1, 4, 8, 8], bytes(1023)),
    ("huge dynamic axis", "glyph_encoder", "input_ids", "INT64", [1, 4096], bytes(8 * 4096)),
    ("zero-length items beyond the shape", "glm_image", "prompt", "BYTES", [1], bytes(4 * 100000)),
    ("an empty shape whose other axis spans 2^62", "vae_decoder", "latents", "FP32", [0, 2 ** 62], b""),
    ("a negative dimension", "vae_decoder", "latents", "FP32", [-1, 4], b""),
]


@pytest.mark.parametrize("case,model,name,datatype,shape,raw", HANDMADE, ids=[c[0] for c in HANDMADE])
def test_hostile_sizes_are_refused_before_allocation(stub, case, model, name, datatype, shape, raw):
    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.append(raw)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert name in info.value.details()


def test_oversized_base64_image_parameter_is_refused_before_decoding(stub):
    req = service_pb2.ModelInferRequest(model_name="glm_image")
    req.inputs.add(name="prompt", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    req.parameters["image"].string_param = "A" * (3 << 20)  # 3 MB of base64 > the 1 MiB image limit
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image" in info.value.details()


def test_malformed_requests_in_a_stream_answer_in_band(server, stub):
    bad = service_pb2.ModelInferRequest(model_name="glm_image", id="bad")
    bad.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    bad.raw_input_contents.append(b"\x05\x00")
    nan = service_pb2.ModelInferRequest(model_name="glm_image", id="nan")
    nan.inputs.add(name="prompt", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    nan.parameters["guidance"].double_param = math.nan
    good = service_pb2.ModelInferRequest(model_name="glm_image", id="good")
    good.inputs.add(name="prompt", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ok")
    for key, value in (("height", 64), ("width", 64), ("steps", 1)):
        good.parameters[key].int64_param = value
    good.parameters["progress"].bool_param = False
    answers = list(stub.ModelStreamInfer(iter([bad, nan, good]), timeout=60))
    by_id = {a.infer_response.id: a for a in answers}
    assert "truncated" in by_id["bad"].error_message
    assert "guidance" in by_id["nan"].error_message
    assert by_id["good"].error_message == "" and len(by_id["good"].infer_response.outputs) == 3


def test_model_config_reports_the_bounds(stub):
    glm = stub.ModelConfig(service_pb2.ModelConfigRequest(name="glm_image"), timeout=10).config
    params = {k: v.string_value for k, v in glm.parameters.items()}
    assert params["max_side"] == "64" and params["max_steps"] == "2" and params["max_pixels"] == "4096"
    for key in ("max_prompt_bytes", "max_image_bytes", "max_source_pixels", "max_guidance"):
        assert key in params
    vae = stub.ModelConfig(service_pb2.ModelConfigRequest(name="vae_decoder"), timeout=10).config
    assert vae.parameters["max_tensor_elements"].string_value == str(1 << 16)
    assert vae.parameters["max_axis_size"].string_value == "64"


# ------------------------------------------------------------------------------------------ HTTP
HTTP_CLEAN = {200, 400, 404, 413, 429}
HTTP_ROUTES = ["/v2/models/glm_image/infer", "/v2/models/vae_decoder/infer", "/v2/models/glyph_encoder/infer",
               "/v2/models/nope/infer", "/v1/images/generations"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@st.composite
def kserve_bodies(draw) -> tuple[bytes, dict[str, str]]:
    """KServe infer bodies: plausible tensors with wrong types, hostile shapes, JSON or binary data,
    and a binary extension whose sizes and header length may lie."""
    tensors, binary = [], b""
    for _ in range(draw(st.integers(0, 3))):
        tensor = {"name": draw(st.sampled_from(NAMES)), "datatype": draw(st.sampled_from(DATATYPES)),
                  "shape": draw(st.lists(st.one_of(st.integers(-2, 4), st.sampled_from(HUGE)), max_size=4))}
        if draw(st.booleans()):
            chunk = draw(st.binary(max_size=64))
            tensor["parameters"] = {"binary_data_size": draw(st.one_of(st.just(len(chunk)), st.integers(-1, 100)))}
            binary += chunk
        else:
            tensor["data"] = draw(JSON)
        if draw(st.integers(0, 9)) == 0:
            tensor = draw(JSON)  # not a tensor at all
        tensors.append(tensor)
    body: dict = {"inputs": tensors}
    if draw(st.booleans()):
        body["parameters"] = draw(st.dictionaries(st.sampled_from(NAMES + ["timeout", "binary_data_output"]),
                                                  JSON, max_size=3))
    if draw(st.booleans()):
        body["outputs"] = draw(st.lists(st.one_of(JSON, st.fixed_dictionaries(
            {"name": st.sampled_from(["image", "image_png", "tokens", "sample", "x"])})), max_size=2))
    header = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if binary or draw(st.booleans()):
        size = draw(st.one_of(st.just(len(header)), st.integers(-5, len(header) + 10)))
        headers["Inference-Header-Content-Length"] = str(size)
    if draw(st.integers(0, 4)) == 0:  # truncated anywhere
        whole = header + binary
        return whole[: draw(st.integers(0, len(whole)))], headers
    return header + binary, headers


@st.composite
def openai_bodies(draw) -> tuple[bytes, dict[str, str]]:
    keys = ["prompt", "n", "size", "response_format", "output_format", "stream", "partial_images", "seed", "steps",
            "guidance", "temperature", "top_p", "top_k", "model", "background", "x"]
    body = draw(st.dictionaries(st.sampled_from(keys), st.one_of(
        JSON, st.sampled_from(["64x64", "32x64", "64x4096", "auto", "b64_json", "png", "a prompt", "glm_image"])),
        max_size=6))
    if draw(st.booleans()):
        body["prompt"] = draw(st.text(max_size=20))
    data = json.dumps(body).encode() if draw(st.integers(0, 5)) else draw(st.binary(max_size=40))
    return data, {"Content-Type": "application/json"}


def test_fuzzed_http_requests_get_clean_statuses(server):
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(HTTP_ROUTES), st.data())
    def check(route, data):
        body, headers = data.draw(openai_bodies() if route.startswith("/v1") else kserve_bodies())
        if route.startswith("/v1") and b'"stream": true' in body:
            headers["Accept"] = "text/event-stream"
        status, _, answer = http("POST", server.http_url + route, body, headers, timeout=30)
        seen[status] = seen.get(status, 0) + 1
        assert status in HTTP_CLEAN, (status, route, body[:300], answer[:300])
        if status != 200:
            error = json.loads(answer)["error"]
            assert (error["message"] if route.startswith("/v1") else error), answer

    check()
    print(f"\nHTTP fuzz: {seen}")
    assert http("GET", server.http_url + "/v2/health/ready")[0] == 200
    status, _, answer = http("POST", server.http_url + "/v1/images/generations",
                             json.dumps({"prompt": "a good request", "size": "64x64", "steps": 1}).encode(),
                             {"Content-Type": "application/json"})
    assert status == 200 and json.loads(answer)["data"][0]["b64_json"]
    assert server.server.state.admission.in_flight == 0


@pytest.mark.parametrize("case,model,name,datatype,shape,raw", HANDMADE, ids=[c[0] for c in HANDMADE])
def test_hostile_sizes_over_http_binary_are_refused(server, case, model, name, datatype, shape, raw):
    header = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    status, _, answer = http("POST", f"{server.http_url}/v2/models/{model}/infer", header + raw,
                             {"Inference-Header-Content-Length": str(len(header))}, timeout=10)
    assert status == 400 and name in json.loads(answer)["error"], answer
