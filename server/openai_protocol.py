"""The OpenAI Images API's wire format, alone: a request body checked into `ImagesRequest`, its answer
(JSON body, server-sent events) and its error shape. No web framework and no model here: the
serving logic is `openai_serving`, the routes `openai_images`.

Fields:
- OpenAI's: `prompt`, `model` (`glm_image`), `n` (1..10), `size` ("WIDTHxHEIGHT" within the
  package's limits, or "auto"), `response_format` (`b64_json`: images come back inline),
  `output_format` (png, jpeg, webp), `background` (auto / opaque), `stream`, `partial_images`
  (0..3); `quality`, `style`, `moderation`, `output_compression` and `user` are accepted and ignored.
- Ours, in the same body (the SDK's `extra_body`): every glm_image setting but the size
  (`glm_image_request.SETTINGS`: `seed`, `steps`, `guidance`, `temperature`, `top_p`, `top_k`,
  `do_sample`), checked by glm_image's one parser with its messages.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from typing import Any

from PIL import Image

from glm_image_onnx.server import errors
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.glm_image_fields import SETTINGS
from glm_image_onnx.server.glm_image_request import encode_image
from glm_image_onnx.server.result import Result
from glm_image_onnx.server.wire import integer

MODEL = "glm_image"
MAX_N = 10
MAX_PARTIAL_IMAGES = 3
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = tuple(n for n in SETTINGS if n not in ("height", "width"))  # `size` carries those
IGNORED = ("quality", "style", "moderation", "output_compression", "user")
KNOWN = {"prompt", "model", "n", "size", "response_format", "output_format", "background", "stream",
         "partial_images", *IGNORED, *EXTENSIONS}
EDIT_FILES = ("image", "image[]", "mask")  # multipart file fields of an edit
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # ASCII digits, all of it: \d and $ take more
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
          504: "timeout_error"}
_CODES = {"UNAUTHENTICATED": "invalid_api_key", "RESOURCE_EXHAUSTED": "rate_limit_exceeded",
          "PAYLOAD_TOO_LARGE": "payload_too_large"}


def error_body(e: RequestError) -> dict[str, Any]:
    """OpenAI's error object; `param` names the field (the size for a height or width)."""
    param = "size" if e.field in ("height", "width") else e.field
    return {"error": {"message": e.message, "type": _TYPES.get(e.http_status, "server_error"), "param": param,
                      "code": _CODES.get(e.code)}}


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _int(value: Any, field: str, low: int, high: int) -> int:
    number = integer(value) if isinstance(value, str) else value  # a form field (edits) is text
    if not isinstance(number, int) or isinstance(number, bool) or not low <= number <= high:
        raise errors.invalid(f"{field} must be an integer between {low} and {high}, got {value!r:.60}", field)
    return number


def _bool(value: Any, field: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise errors.invalid(f"{field} must be true or false, got {value!r}", field)
    return value


def _choice(body: dict[str, Any], field: str, default: str, allowed: Any, why: str) -> str:
    value = body.get(field, default)
    if not isinstance(value, str) or value not in allowed:
        raise errors.invalid(f"{field} {value!r} is not supported: {why}", field)
    return value


class ImagesRequest:
    """An OpenAI images request, checked: what it asks of glm_image (`params`, glm_image's request
    parameters) and how to answer."""

    def __init__(self, body: dict[str, Any], edit: bool):
        unknown = sorted(set(body) - KNOWN - (set(EDIT_FILES) if edit else set()))
        if unknown:
            raise errors.invalid(f"unknown parameter '{unknown[0]}' (this server takes: {', '.join(sorted(KNOWN))})",
                                 unknown[0])
        model = body.get("model")
        if model not in (None, MODEL):
            raise errors.RequestError("NOT_FOUND", f"model '{model}' is not served here (models: {MODEL})", "model")
        if "prompt" not in body:
            raise errors.invalid("prompt is missing", "prompt")
        self.edit = edit
        self.event = "image_edit" if edit else "image_generation"
        self.n = _int(body.get("n", 1), "n", 1, MAX_N)
        self.stream = _bool(body.get("stream", False), "stream")
        self.partial_images = _int(body.get("partial_images", 0), "partial_images", 0, MAX_PARTIAL_IMAGES)
        if self.stream and self.n != 1:
            raise errors.invalid("n must be 1 when stream is true", "n")
        _choice(body, "response_format", "b64_json", ("b64_json",),
                "this server returns images inline (b64_json), it does not host them")
        self.output_format = _choice(body, "output_format", "png", FORMATS, f"use one of {', '.join(FORMATS)}")
        _choice(body, "background", "auto", ("auto", "opaque"), "GLM-Image paints opaque images")
        self.params: dict[str, Any] = {"prompt": body["prompt"], **self._size(body.get("size", "auto"))}
        self.params.update({k: body[k] for k in EXTENSIONS if body.get(k) is not None})

    @staticmethod
    def _size(size: Any) -> dict[str, int]:
        if size == "auto":
            return {}
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise errors.invalid(f"size must be 'WIDTHxHEIGHT' (for example '1024x1024') or 'auto', "
                                 f"got {size!r:.60}", "size")
        return {"width": int(match[1]), "height": int(match[2])}

    @property
    def output(self) -> str:
        """glm_image's output to ask for: the PNG as is, else the pixels to encode."""
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

    def image_fields(self, size: str) -> dict[str, Any]:
        return {"created_at": int(time.time()), "size": size, "quality": "auto", "background": "opaque",
                "output_format": self.output_format}

    def body(self, images: list[tuple[str, str]]) -> dict[str, Any]:
        """The non-streamed answer, from `encode`'s (base64, size) per image."""
        return {"created": int(time.time()), "data": [{"b64_json": b64} for b64, _ in images],
                "output_format": self.output_format, "size": images[0][1], "quality": "auto", "background": "opaque"}

    def partial_event(self, index: int, image: Image.Image, step: int, total: int) -> bytes:
        """A preview as `...partial_image`, carrying our progress beside it."""
        data = base64.b64encode(encode_image(image, FORMATS[self.output_format])).decode("ascii")
        event = {"type": f"{self.event}.partial_image", "b64_json": data, "partial_image_index": index,
                 **self.image_fields(f"{image.width}x{image.height}"),
                 "progress_stage": "denoise", "progress_done": step, "progress_total": total}
        return sse(event["type"], event)

    def completed_event(self, b64: str, size: str) -> bytes:
        kind = f"{self.event}.completed"
        return sse(kind, {"type": kind, "b64_json": b64, **self.image_fields(size)})


def progress_comment(stage: str, done: int, total: int) -> bytes:
    """Progress between events: an SSE comment, which SDKs skip and proxies see as traffic."""
    return f": progress {stage} {done}/{total}\n\n".encode()


def error_event(e: RequestError) -> bytes:
    return sse("error", {"type": "error", **error_body(e)})
