"""The OpenAI Images API's routes: `POST /v1/images/generations`, `POST /v1/images/edits`
(multipart), `GET /v1/models`, so that the `openai` SDKs, UIs and agents that speak it work unchanged
(the stacks that serve GLM-Image today, vLLM-Omni and SGLang-Diffusion, expose the same routes).

Thin: HTTP bodies and forms in, `openai_protocol.ImagesRequest` out of them, `openai_serving` to
run it, and responses back. With `stream`, the response is server-sent events:
`image_generation.partial_image` (edits: `image_edit.partial_image`) for each of `partial_images`
previews, carrying our progress (`progress_stage`, `progress_done`, `progress_total`) beside the
preview, then `...completed` with the image, or `error`; between events, progress goes out as SSE
comments (`: progress ar 64/256`). Errors are OpenAI's JSON, `{"error": {"message", "type", "param",
"code"}}`, `param` naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from glm_image_onnx.server import errors
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.glm_image_request import MAX_SOURCE_IMAGES
from glm_image_onnx.server.http_server import HttpFrontEnd
from glm_image_onnx.server.openai_protocol import MODEL, ImagesRequest, error_body
from glm_image_onnx.server.openai_serving import ImagesServing


def openai_error(e: RequestError) -> Response:
    return JSONResponse(error_body(e), status_code=e.http_status)


async def _json_object(front: HttpFrontEnd, request: Request) -> dict[str, Any]:
    body = await front.read_body(request)
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.invalid(f"the request body is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise errors.invalid("the request body must be a JSON object")
    return value


async def _edit_form(front: HttpFrontEnd, request: Request) -> tuple[ImagesRequest, dict[str, np.ndarray]]:
    """An edit's multipart form: (the request, its source images as glm_image's `image` input)."""
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
        ask = ImagesRequest({k: v for k, v in form.multi_items() if k not in ("image", "image[]")}, edit=True)
        images = np.empty(len(files), dtype=object)
        images[:] = [await f.read() for f in files]  # type: ignore[union-attr]
    finally:
        await form.close()
    return ask, {"image": images}


def routes(front: HttpFrontEnd) -> list[Route]:
    serving = ImagesServing(front.plane)
    created = int(time.time())

    def contexts(request: Request, n: int) -> list[RequestContext]:
        request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex[:16]
        return [RequestContext(MODEL, f"{request_id}/{i}", None, front.peer(request), protocol="http")
                for i in range(n)]

    async def answer(request: Request, ask: ImagesRequest, inputs: dict[str, np.ndarray]) -> Response:
        requests = serving.requests(ask, inputs)
        if ask.stream:
            events = await serving.stream(ask, requests[0], contexts(request, 1)[0])
            request.state.logged = True
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        images = await front.until_disconnect(request, serving.images(ask, requests, contexts(request, ask.n)))
        if isinstance(images, Response):  # the client left
            return images
        return JSONResponse(ask.body(images))

    async def generations(request: Request) -> Response:
        return await answer(request, ImagesRequest(await _json_object(front, request), edit=False), {})

    async def edits(request: Request) -> Response:
        return await answer(request, *await _edit_form(front, request))

    def model_entry() -> dict[str, Any]:
        return {"id": MODEL, "object": "model", "created": created, "owned_by": "glm-image-onnx"}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_entry()] if MODEL in front.state.models else []})

    async def get_model(request: Request) -> Response:
        if request.path_params["model"] != MODEL or MODEL not in front.state.models:
            raise errors.RequestError("NOT_FOUND", f"model '{request.path_params['model']}' is not served here "
                                      f"(models: {MODEL})", "model")
        return JSONResponse(model_entry())

    def guarded(handler: Any) -> Any:
        return front.guarded(handler, openai_error)

    return [Route("/v1/images/generations", guarded(generations), methods=["POST"]),
            Route("/v1/images/edits", guarded(edits), methods=["POST"]),
            Route("/v1/models", guarded(list_models), methods=["GET"]),
            Route("/v1/models/{model}", guarded(get_model), methods=["GET"])]
