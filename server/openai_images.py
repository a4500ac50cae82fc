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

import time
import uuid
from typing import Any, AsyncGenerator

import numpy as np
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
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
from glm_image_onnx.server.wire import parse_json, printable, text_error


MAX_FORM_FIELDS = 64  # text fields of an edit form (OpenAI's and ours are about 20)
MAX_FORM_TEXT_BYTES = 1 << 20  # one text field of it (a prompt is bounded far lower: --max-prompt-bytes)


def openai_error(e: RequestError) -> Response:
    return JSONResponse(error_body(e), status_code=e.http_status)


async def _json_object(front: HttpFrontEnd, request: Request) -> dict[str, Any]:
    value = parse_json(await front.read_body(request))
    if not isinstance(value, dict):
        raise errors.invalid("the request body must be a JSON object")
    return value


async def _form(request: Request, body: bytes) -> FormData:
    """The multipart form in `body` (read and bounded by `read_body`). Starlette's parser is called
    directly: through `Request.form` its refusals become an HTTPException, which no handler here maps."""
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "multipart/form-data":
        raise errors.invalid("image is missing: an edit's body is a multipart form (Content-Type: "
                             "multipart/form-data) with the source image(s) as the file field 'image'", "image")

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, chunks(), max_files=MAX_SOURCE_IMAGES + 1,  # + a mask, refused
                             max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_TEXT_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise _form_error(e.message) from None
    for name, value in form.multi_items():  # JSON bodies get the same check in `parse_json`
        why = text_error(name) or (text_error(value) if isinstance(value, str) else None)
        if why is not None:
            await form.close()
            raise errors.invalid(f"form field {printable(name)}: {why}", printable(name))
    return form


def _form_error(message: str) -> RequestError:
    """Starlette's refusal of a form, naming the bound it met (one exception type for all of them)."""
    if message.startswith("Too many files"):
        return errors.invalid(f"the form has more than {MAX_SOURCE_IMAGES + 1} files; image takes at most "
                              f"{MAX_SOURCE_IMAGES}", "image")
    if message.startswith("Too many fields"):
        return errors.invalid(f"the form has more than {MAX_FORM_FIELDS} text fields")
    if "exceeded maximum size" in message:
        return errors.too_large(f"a text field of the form is larger than {MAX_FORM_TEXT_BYTES} bytes (images go "
                                "in file fields)")
    return errors.invalid(f"the request body is not a valid multipart form ({message})")


async def _edit_form(front: HttpFrontEnd, request: Request) -> tuple[ImagesRequest, dict[str, np.ndarray]]:
    """An edit's multipart form: (the request, its source images as glm_image's `image` input)."""
    form = await _form(request, await front.read_body(request))
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
