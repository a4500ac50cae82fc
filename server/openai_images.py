"""The OpenAI Images API over `glm_image`: `POST /v1/images/generations`, `POST /v1/images/edits`
(multipart), `GET /v1/models`, so that the `openai` SDKs, UIs and agents that speak it work unchanged
(the stacks that serve GLM-Image today, vLLM-Omni and SGLang-Diffusion, expose the same routes).

A request becomes `n` glm_image generations through `inference.infer` (the gRPC path): the body's
fields are glm_image's request parameters, checked by the same parser with the same messages. Image
i takes `seed + i` (a random seed when none is given), as the pipeline's batch call does, so image 0
equals the gRPC result for that seed. Fields:

- OpenAI's: `prompt`, `model` (`glm_image`), `n` (1..10), `size` ("WIDTHxHEIGHT" within the
  package's limits, or "auto"), `response_format` (`b64_json`: images come back inline),
  `output_format` (png, jpeg, webp), `background` (auto / opaque), `stream`, `partial_images`
  (0..3); `quality`, `style`, `moderation`, `output_compression` and `user` are accepted and ignored.
- Ours, in the same body (the SDK's `extra_body`): `seed`, `steps`, `guidance`, `temperature`,
  `top_p`, `top_k`.

With `stream`, the response is server-sent events: `image_generation.partial_image` (edits:
`image_edit.partial_image`) for each of `partial_images` previews, carrying our progress
(`progress_stage`, `progress_done`, `progress_total`) beside the preview, then `...completed` with
the image, or `error`. Between events, progress goes out as SSE comments (`: progress ar 64/256`),
which SDKs skip and proxies see as traffic. Errors are OpenAI's JSON, `{"error": {"message", "type",
"param", "code"}}`, `param` naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
import uuid
from typing import Any, AsyncIterator

import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from glm_image_onnx.server import errors
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.glm_image_request import MAX_SOURCE_IMAGES, Previews, encode_image
from glm_image_onnx.server.http_server import HttpFrontEnd
from glm_image_onnx.server.inference import Decoded, ar_throttled, infer
from glm_image_onnx.server.models import Model, Result

MODEL = "glm_image"
MAX_N = 10
MAX_PARTIAL_IMAGES = 3
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = ("seed", "steps", "guidance", "temperature", "top_p", "top_k")
IGNORED = ("quality", "style", "moderation", "output_compression", "user")
KNOWN = {"prompt", "model", "n", "size", "response_format", "output_format", "background", "stream",
         "partial_images", *IGNORED, *EXTENSIONS}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
          504: "timeout_error"}
_CODES = {"UNAUTHENTICATED": "invalid_api_key", "RESOURCE_EXHAUSTED": "rate_limit_exceeded",
          "PAYLOAD_TOO_LARGE": "payload_too_large"}


def openai_error(e: RequestError) -> Response:
    status = e.http_status
    param = "size" if e.field in ("height", "width") else e.field
    return JSONResponse({"error": {"message": e.message, "type": _TYPES.get(status, "server_error"),
                                   "param": param, "code": _CODES.get(e.code)}}, status_code=status)


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise errors.invalid(f"{field} must be an integer between {low} and {high}, got {value!r}", field)
    return value


def _bool(value: Any, field: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise errors.invalid(f"{field} must be true or false, got {value!r}", field)
    return value


class ImagesRequest:
    """An OpenAI images request, checked: what it asks of glm_image and how to answer."""

    def __init__(self, body: dict[str, Any], edit: bool):
        unknown = sorted(set(body) - KNOWN - ({"image", "image[]", "mask"} if edit else set()))
        if unknown:
            raise errors.invalid(f"unknown parameter '{unknown[0]}' (this server takes: {', '.join(sorted(KNOWN))})",
                                 unknown[0])
        model = body.get("model")
        if model not in (None, MODEL):
            raise errors.RequestError("NOT_FOUND", f"model '{model}' is not served here (models: {MODEL})", "model")
        if "prompt" not in body:
            raise errors.invalid("prompt is missing", "prompt")
        self.edit = edit
        self.n = _int(body.get("n", 1), "n", 1, MAX_N)
        self.stream = _bool(body.get("stream", False), "stream")
        self.partial_images = _int(body.get("partial_images", 0), "partial_images", 0, MAX_PARTIAL_IMAGES)
        if self.stream and self.n != 1:
            raise errors.invalid("n must be 1 when stream is true", "n")
        response_format = body.get("response_format", "b64_json")
        if response_format != "b64_json":
            raise errors.invalid(f"response_format {response_format!r} is not supported: this server returns images "
                                 "inline (b64_json), it does not host them", "response_format")
        self.output_format = body.get("output_format", "png")
        if not isinstance(self.output_format, str) or self.output_format not in FORMATS:
            raise errors.invalid(f"output_format must be one of {', '.join(FORMATS)}, got {self.output_format!r}",
                                 "output_format")
        background = body.get("background", "auto")
        if background not in ("auto", "opaque"):
            raise errors.invalid(f"background {background!r} is not supported (GLM-Image paints opaque images)",
                                 "background")
        self.params: dict[str, Any] = {"prompt": body["prompt"]}
        size = body.get("size", "auto")
        if size != "auto":
            match = _SIZE.match(size) if isinstance(size, str) else None
            if match is None:
                raise errors.invalid(f"size must be 'WIDTHxHEIGHT' (for example '1024x1024') or 'auto', got {size!r}",
                                     "size")
            self.params["width"], self.params["height"] = int(match[1]), int(match[2])
        self.params.update({k: body[k] for k in EXTENSIONS if body.get(k) is not None})
        seed = self.params.get("seed")
        if self.n > 1 and seed is None:
            self.params["seed"] = seed = int(np.random.SeedSequence().entropy % (2 ** 62))
        self.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        self.event = "image_edit" if edit else "image_generation"

    def parameters(self, i: int) -> dict[str, Any]:
        """glm_image's parameters for image i (seed + i)."""
        if i == 0 or self.seed is None:
            return dict(self.params)
        return {**self.params, "seed": self.seed + i}

    @property
    def output(self) -> str:
        return "image_png" if self.output_format == "png" else "image"

    def encode(self, result: Result) -> tuple[str, str]:
        """(base64 file, "WIDTHxHEIGHT") of glm_image's output (runs off the event loop)."""
        _, array, _ = result.outputs[0]
        if self.output == "image_png":
            data = array[0]
            width, height = Image.open(io.BytesIO(data)).size
        else:
            height, width = array.shape[:2]
            data = encode_image(Image.fromarray(array), FORMATS[self.output_format])
        return base64.b64encode(data).decode("ascii"), f"{width}x{height}"

    def event_fields(self, size: str) -> dict[str, Any]:
        return {"created_at": int(time.time()), "size": size, "quality": "auto", "background": "opaque",
                "output_format": self.output_format}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def routes(front: HttpFrontEnd) -> list[Route]:
    state = front.state
    created = int(time.time())

    def context(request: Request, i: int, previews: Previews | None = None) -> RequestContext:
        request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex[:16]
        return RequestContext(MODEL, f"{request_id}/{i}", None, front.peer(request), protocol="http",
                              previews=previews)

    def generation(ask: ImagesRequest, inputs: dict[str, np.ndarray], i: int, ctx: RequestContext,
                   progress: Any = None, admitted: asyncio.Event | None = None) -> Any:
        def decode() -> Decoded:
            return Decoded(inputs, ask.parameters(i), [ask.output])

        def encode(model: Model, result: Result) -> Result:
            return result

        return infer(state, ctx, "", decode, encode, progress, admitted)

    async def answer(request: Request, ask: ImagesRequest, inputs: dict[str, np.ndarray]) -> Response:
        if ask.stream:
            return await stream(request, ask, inputs)
        tasks = [asyncio.ensure_future(generation(ask, inputs, i, context(request, i))) for i in range(ask.n)]

        async def all_images() -> list[Result]:
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in tasks:
                    if not task.done():
                        task.cancel()
            failed = [t for t in tasks if not t.cancelled() and t.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            return [t.result() for t in tasks]

        results = await front.until_disconnect(request, all_images())
        if isinstance(results, Response):  # the client left
            return results
        images = await asyncio.to_thread(lambda: [ask.encode(r) for r in results])
        body = {"created": int(time.time()), "data": [{"b64_json": b64} for b64, _ in images],
                "output_format": ask.output_format, "size": images[0][1], "quality": "auto",
                "background": "opaque"}
        return JSONResponse(body)

    async def stream(request: Request, ask: ImagesRequest, inputs: dict[str, np.ndarray]) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def progress(stage: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, f": progress {stage} {done}/{total}\n\n".encode())

        def preview(index: int, image: Image.Image, step: int, total: int) -> None:  # on the worker
            data = base64.b64encode(encode_image(image, FORMATS[ask.output_format])).decode("ascii")
            event = {"type": f"{ask.event}.partial_image", "b64_json": data, "partial_image_index": index,
                     **ask.event_fields(f"{image.width}x{image.height}"),
                     "progress_stage": "denoise", "progress_done": step, "progress_total": total}
            loop.call_soon_threadsafe(queue.put_nowait, _sse(event["type"], event))

        ctx = context(request, 0, Previews(ask.partial_images, preview))
        admitted = asyncio.Event()
        task = asyncio.ensure_future(generation(ask, inputs, 0, ctx, ar_throttled(progress), admitted))
        waiter = asyncio.ensure_future(admitted.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done() and task.exception() is not None:
            raise task.exception()  # refused before any work: a plain error response

        async def events() -> AsyncIterator[bytes]:
            try:
                while True:
                    get = asyncio.ensure_future(queue.get())
                    await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                    if get.done():
                        yield get.result()
                        continue
                    get.cancel()
                    while not queue.empty():
                        yield queue.get_nowait()
                    break
                try:
                    b64, size = await asyncio.to_thread(ask.encode, task.result())
                    yield _sse(f"{ask.event}.completed", {"type": f"{ask.event}.completed", "b64_json": b64,
                                                          **ask.event_fields(size)})
                except RequestError as e:
                    body = json.loads(openai_error(e).body)
                    yield _sse("error", {"type": "error", **body})
            finally:
                if not task.done():  # the client went away mid-stream
                    task.cancel()

        request.state.logged = True
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def read_json(request: Request) -> dict[str, Any]:
        body = await front.read_body(request)
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise errors.invalid(f"the request body is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise errors.invalid("the request body must be a JSON object")
        return value

    async def generations(request: Request) -> Response:
        ask = ImagesRequest(await read_json(request), edit=False)
        return await answer(request, ask, {})

    async def edits(request: Request) -> Response:
        body = await front.read_body(request)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=MAX_SOURCE_IMAGES + 1, max_fields=64)
        except (MultiPartException, AssertionError, ValueError) as e:
            raise errors.invalid(f"the request body is not a valid multipart form ({e})") from None
        try:
            files = form.getlist("image") + form.getlist("image[]")
            if "mask" in form:
                raise errors.invalid("mask: inpainting masks are not supported; GLM-Image edits the whole image "
                               "from the prompt", "mask")
            if not files:
                raise errors.invalid("image is missing: send the source image(s) as the file field 'image'", "image")
            if not all(isinstance(f, UploadFile) for f in files):
                raise errors.invalid("image must be a file (multipart file field), not text", "image")
            if len(files) > MAX_SOURCE_IMAGES:
                raise errors.invalid(f"{len(files)} images, more than the limit of {MAX_SOURCE_IMAGES}", "image")
            fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]")}
            ask = ImagesRequest(fields, edit=True)
            images = np.empty(len(files), dtype=object)
            images[:] = [await f.read() for f in files]  # type: ignore[union-attr]
        finally:
            await form.close()
        return await answer(request, ask, {"image": images})

    def model_entry() -> dict[str, Any]:
        return {"id": MODEL, "object": "model", "created": created, "owned_by": "glm-image-onnx"}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_entry()] if MODEL in state.models else []})

    async def get_model(request: Request) -> Response:
        if request.path_params["model"] != MODEL or MODEL not in state.models:
            raise errors.RequestError("NOT_FOUND", f"model '{request.path_params['model']}' is not served here "
                                      f"(models: {MODEL})", "model")
        return JSONResponse(model_entry())

    def guarded(handler: Any) -> Any:
        return front.guarded(handler, openai_error)

    return [Route("/v1/images/generations", guarded(generations), methods=["POST"]),
            Route("/v1/images/edits", guarded(edits), methods=["POST"]),
            Route("/v1/models", guarded(list_models), methods=["GET"]),
            Route("/v1/models/{model}", guarded(get_model), methods=["GET"])]
