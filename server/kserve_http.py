"""KServe v2 over HTTP/REST, as Triton serves it: the routes `tritonclient.http`, curl and KServe's
clients use, with JSON tensors and the binary-tensor extension.

An infer body is a JSON header, optionally followed by binary tensors: the request header
`Inference-Header-Content-Length` gives the JSON's length, and each input with the parameter
`binary_data_size` takes that many bytes of what follows, in input order (the same little-endian /
length-framed BYTES contents as gRPC's `raw_input_contents`). An output comes back binary when it
asks (`"parameters": {"binary_data": true}`), when the request asks for all (`binary_data_output`),
or when JSON cannot carry it (FP16, non-UTF-8 BYTES such as `image_png`). Errors are
`{"error": "..."}` with the status Triton uses (`errors.HTTP_STATUS`).

A thin codec over `dataplane.DataPlane`, as the gRPC service is: the core's plain answers go out
as they are, and everything past the wire format (validation, admission, cancellation, Triton's
request parameters such as `timeout`, stats, the log line) is the core's, the same for both.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from glm_image_onnx.server import errors
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.http_server import HttpFrontEnd
from glm_image_onnx.server.models import VERSION, Decoded, Model, Result
from glm_image_onnx.server.tensors import MAX_INPUTS, NUMPY, encode_bytes, from_raw, from_values
from glm_image_onnx.server.wire import parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPES = set(NUMPY) - {"FP16"}  # JSON numbers cannot round-trip FP16 exactly: binary only


# ------------------------------------------------------------------------------------- request
def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise errors.invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _flat(data: Any, name: str, limit: int) -> list:
    """`data` (flat or nested lists, as the protocol allows) as one flat list of at most `limit` items."""
    out: list = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
            if len(out) > limit:
                raise errors.invalid(f"input '{name}': 'data' holds more elements than its shape")
    return out


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of an infer body."""
    if header_length is None:
        return body, b""
    try:
        size = int(header_length)
    except ValueError:
        raise errors.invalid(f"header {HEADER_LENGTH}: not an integer ({header_length[:40]!r})") from None
    if not 0 <= size <= len(body):
        raise errors.invalid(f"header {HEADER_LENGTH}: {size} is outside the {len(body)}-byte body")
    return body[:size], body[size:]


def _input(i: int, tensor: Any, seen: dict[str, np.ndarray]) -> tuple[str, str, list[int], dict[str, Any]]:
    """(name, datatype, shape, parameters) of inputs[i], checked."""
    tensor = _object(tensor, f"inputs[{i}]")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not name:
        raise errors.invalid(f"inputs[{i}]: 'name' must be a non-empty string")
    if name in seen:
        raise errors.invalid(f"input '{name}' is given twice")
    if not isinstance(datatype, str):
        raise errors.invalid(f"input '{name}': 'datatype' must be a string")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise errors.invalid(f"input '{name}': 'shape' must be a list of integers")
    tparams = _object(tensor.get("parameters", {}), f"input '{name}': 'parameters'")
    if "shared_memory_region" in tparams:
        raise errors.no_shared_memory(f"input '{name}'")
    return name, datatype, shape, tparams


def _inputs(tensors: Any, binary: bytes, max_elements: int) -> dict[str, np.ndarray]:
    if not isinstance(tensors, list):
        raise errors.invalid("'inputs' must be a list of tensors")
    if len(tensors) > MAX_INPUTS:
        raise errors.invalid(f"the request has {len(tensors)} inputs, more than the limit of {MAX_INPUTS}")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(tensors):
        name, datatype, shape, tparams = _input(i, tensor, inputs)
        if "binary_data_size" in tparams:
            size = tparams["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise errors.invalid(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise errors.invalid(f"input '{name}': binary_data_size {size} overruns the binary data "
                                     f"({len(binary) - offset} bytes left)")
            inputs[name] = from_raw(name, datatype, shape, binary[offset: offset + size], max_elements)
            offset += size
        elif "data" in tensor:
            if datatype not in JSON_TYPES and datatype in NUMPY:
                raise errors.invalid(f"input '{name}': {datatype} must be sent as binary data")
            data = tensor["data"]
            values = _flat(data if isinstance(data, list) else [data], name, max_elements)
            inputs[name] = from_values(name, datatype, shape, values, max_elements)
        else:
            raise errors.invalid(f"input '{name}': no 'data' and no binary_data_size")
    if offset != len(binary):
        raise errors.invalid(f"the body has {len(binary) - offset} bytes of binary data no input claims")
    return inputs


def _outputs(outputs: Any, all_binary: bool) -> dict[str, bool]:
    """Requested output name -> sent binary."""
    if not isinstance(outputs, list):
        raise errors.invalid("'outputs' must be a list")
    requested: dict[str, bool] = {}
    for i, out in enumerate(outputs):
        out = _object(out, f"outputs[{i}]")
        name = out.get("name")
        if not isinstance(name, str):
            raise errors.invalid(f"outputs[{i}]: 'name' must be a string")
        oparams = _object(out.get("parameters", {}), f"output '{name}': 'parameters'")
        if "shared_memory_region" in oparams:
            raise errors.no_shared_memory(f"output '{name}'")
        requested[name] = oparams.get("binary_data", all_binary) is True
    return requested


def decode_request(body: bytes, header_length: str | None, max_elements: int) -> tuple[str, Decoded, dict[str, bool]]:
    """(request id, decoded request, output name -> binary) of an infer body."""
    header, binary = _split(body, header_length)
    request = _object(parse_json(header), "the request body")
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise errors.invalid("'id' must be a string")
    params = _object(request.get("parameters", {}), "'parameters'")
    for key, value in params.items():
        if not isinstance(value, (str, int, float, bool)):
            raise errors.invalid(f"parameter '{key}' must be a string, number or bool")
    inputs = _inputs(request.get("inputs"), binary, max_elements)
    all_binary = params.pop("binary_data_output", False) is True
    requested = _outputs(request.get("outputs", []), all_binary)
    return request_id, Decoded(inputs, params, list(requested)), {"*": all_binary, **requested}


# ------------------------------------------------------------------------------------ response
def _json_data(array: np.ndarray, datatype: str) -> list | None:
    """The tensor as a JSON list, or None when JSON cannot carry it."""
    if datatype not in JSON_TYPES:
        return None
    flat = array.reshape(-1)
    if datatype == "BYTES":
        try:
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
        except UnicodeDecodeError:
            return None
    return flat.tolist()


def encode_response(model: Model, request_id: str, result: Result, binary: dict[str, bool]) -> Response:
    outputs, chunks = [], []
    for name, array, datatype in result.outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        data = None if binary.get(name, binary["*"]) else _json_data(array, datatype)
        if data is None:
            raw = (encode_bytes(array.reshape(-1)) if datatype == "BYTES"
                   else np.ascontiguousarray(array, dtype=NUMPY[datatype]).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model.name, "model_version": VERSION, "outputs": outputs}
    if request_id:
        body["id"] = request_id
    if result.parameters:
        body["parameters"] = dict(result.parameters)
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(b"".join([header, *chunks]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


# -------------------------------------------------------------------------------------- routes
def kserve_error(e: errors.RequestError) -> Response:
    return JSONResponse({"error": e.message}, status_code=e.http_status)


class _Handlers:
    """The KServe v2 REST handlers: HTTP in, the core's answer out."""

    def __init__(self, front: HttpFrontEnd):
        self.front = front
        self.plane = front.plane

    @staticmethod
    def path(request: Request) -> tuple[str, str]:
        return request.path_params.get("model", ""), request.path_params.get("version", "")

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.plane.ready() else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(self.plane.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(self.plane.model_metadata(*self.path(request)))

    async def model_ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.plane.model_ready(*self.path(request)) else 503)

    async def model_config(self, request: Request) -> Response:
        return JSONResponse(self.plane.model_config(*self.path(request)))

    async def model_stats(self, request: Request) -> Response:
        return JSONResponse(self.plane.model_statistics(*self.path(request)))

    async def repository_index(self, request: Request) -> Response:
        body = await self.front.read_body(request)
        wanted = parse_json(body) if body.strip() else {}
        return JSONResponse(self.plane.repository_index(isinstance(wanted, dict) and wanted.get("ready") is True))

    async def model_infer(self, request: Request) -> Response:
        front = self.front
        body = await front.read_body(request)
        model, version = self.path(request)
        ctx = RequestContext(model, "", None, front.peer(request), protocol="http")
        ctx.wire_bytes = len(body)
        binary: dict[str, bool] = {}  # output name ("*": the default) -> sent binary

        def decode() -> Decoded:
            ctx.request_id, decoded, wanted = decode_request(body, request.headers.get(HEADER_LENGTH),
                                                             front.max_tensor_elements)
            binary.update(wanted)
            return decoded

        def encode(model: Model, result: Result) -> Response:
            return encode_response(model, ctx.request_id, result, binary)

        return await front.until_disconnect(request, self.plane.infer(ctx, version, decode, encode))


def routes(front: HttpFrontEnd) -> list[Route]:
    """Triton's HTTP routes: health without a token, the rest guarded (RequestError -> its status)."""
    h = _Handlers(front)

    def guarded(handler: Any) -> Any:
        return front.guarded(handler, kserve_error)

    out = [Route("/v2/health/live", front.open(h.live), methods=["GET"]),
           Route("/v2/health/ready", front.open(h.ready), methods=["GET"]),
           Route("/v2", guarded(h.server_metadata), methods=["GET"]),
           Route("/v2/models/stats", guarded(h.model_stats), methods=["GET"]),
           Route("/v2/repository/index", guarded(h.repository_index), methods=["POST"])]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        out += [Route(prefix, guarded(h.model_metadata), methods=["GET"]),
                Route(prefix + "/ready", guarded(h.model_ready), methods=["GET"]),
                Route(prefix + "/config", guarded(h.model_config), methods=["GET"]),
                Route(prefix + "/stats", guarded(h.model_stats), methods=["GET"]),
                Route(prefix + "/infer", guarded(h.model_infer), methods=["POST"])]
    return out
