"""One `glm_image` request, protocol-free: decode and check the fields, run the pipeline, shape
the outputs. Shared by the gRPC server's `glm_image` model and the Triton Python-backend model, so
both accept the same inputs and refuse the same requests with the same messages (numpy + Pillow
only: no grpc, no tritonclient).

Inputs (each also accepted as a request parameter of the same name; a tensor wins over a parameter):

| name | datatype, shape | meaning |
|---|---|---|
| `prompt` | BYTES [1] | UTF-8 prompt (required) |
| `image` | BYTES [k] | encoded PNG / JPEG / WebP source image(s) to edit, k <= 4 (as a parameter: one, base64) |
| `height`, `width` | INT32 [1] | pixels, multiples of the package's grid (32); default: the source's, else the package's |
| `steps` | INT32 [1] | denoising steps |
| `guidance` | FP32 [1] | classifier-free guidance scale |
| `seed` | INT64 [1] | >= 0; the same seed gives the same image |
| `temperature`, `top_p` | FP32 [1] | AR sampling |
| `top_k` | INT32 [1] | AR sampling |
| `do_sample` | BOOL [1] | AR sampling (false: greedy) |

Outputs (those requested, or all): `image_png` BYTES [1], `image` UINT8 [H, W, 3], `tokens` INT64 [N].
Response parameters: `seed` (the one used), `total_s` and `ar_batch_rows` (the most generations
that shared one of its AR decode steps; 1 when it decoded alone).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from glm_image_onnx.manifest import Pipeline
from glm_image_onnx.server import errors
from glm_image_onnx.server.glm_image_fields import FIELDS, SETTINGS, FieldSpec, GlmImageRequest, Previews
from glm_image_onnx.server.limits import Limits
from glm_image_onnx.server.result import Result
from glm_image_onnx.server.specs import TensorSpec, select_outputs
from glm_image_onnx.server.tensors import datatype_of
from glm_image_onnx.server.wire import decimal, integer

if TYPE_CHECKING:
    from glm_image_onnx.runtime.ar import Progress

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SOURCE_IMAGES = 4  # source images of one edit (GLM-Image conditions on each)
INPUTS = [TensorSpec(n, f.datatype, ("images",) if f.kind == "image" else (1,), optional=(n != "prompt"))
          for n, f in FIELDS.items()]
OUTPUTS = [TensorSpec("image_png", "BYTES", (1,)), TensorSpec("image", "UINT8", ("height", "width", 3)),
           TensorSpec("tokens", "INT64", ("tokens",))]


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _from_tensor(name: str, f: FieldSpec, array: np.ndarray) -> Any:
    got = datatype_of(array.dtype)
    if got != f.datatype:
        raise errors.invalid(f"input '{name}' must be {f.datatype}, got {got}", name)
    if f.kind == "image":
        if array.ndim != 1 or not 1 <= array.shape[0] <= MAX_SOURCE_IMAGES:
            raise errors.invalid(f"input 'image' must have shape [k] with 1 <= k <= {MAX_SOURCE_IMAGES} source "
                                 f"images, got {list(array.shape)}", name)
        return [_as_bytes(v) for v in array]
    if array.shape != (1,):
        raise errors.invalid(f"input '{name}' must have shape [1], got {list(array.shape)}", name)
    value = array[0]
    if f.kind == "text":
        return _as_bytes(value)
    return {"int": int, "float": float, "bool": bool}[f.kind](value)


def _from_param(name: str, f: FieldSpec, value: Any) -> Any:
    if f.kind == "text":
        if not isinstance(value, str):
            raise errors.invalid(f"parameter '{name}' must be a string, got {type(value).__name__}", name)
        return value.encode("utf-8")
    if f.kind == "image":
        if not isinstance(value, str):
            raise errors.invalid(f"parameter 'image' must be a base64 string, got {type(value).__name__}", name)
        try:
            return [base64.b64decode(value, validate=True)]
        except (binascii.Error, ValueError):
            raise errors.invalid("parameter 'image' is not valid base64 (send raw bytes as the BYTES input "
                                 "'image' instead)", name) from None
    if f.kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):  # a form field (OpenAI edits)
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise errors.invalid(f"parameter '{name}' must be true or false, got {value!r}", name)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise errors.invalid(f"parameter '{name}' must be a number, got {type(value).__name__}", name)
    if isinstance(value, str):  # a form field (OpenAI edits), a KServe string parameter: ASCII digits only
        number = decimal(value) if f.kind == "float" else integer(value)
        if number is None:
            raise errors.invalid(f"parameter '{name}' must be a number, got {value!r:.60}", name)
        value = number
    if f.kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise errors.invalid(f"parameter '{name}' must be an integer, got {value}", name)
        return int(value)
    return float(value)


def requested_outputs(requested: list[str]) -> list[str]:
    return select_outputs("glm_image", OUTPUTS, requested)


def parse(inputs: dict[str, np.ndarray], params: dict[str, Any], limits: Limits,
          image_to_image: bool = True) -> GlmImageRequest:
    """Decoded input tensors and request parameters -> a checked request (cheap: image header only)."""
    for name in inputs:
        if name not in FIELDS:
            raise errors.invalid(f"unknown input '{name}' for glm_image (inputs: {', '.join(FIELDS)})", name)
    values: dict[str, Any] = {}
    for name, f in FIELDS.items():
        if name in inputs:
            values[name] = _from_tensor(name, f, inputs[name])
        elif params.get(name) is not None:
            value = params[name]
            if f.kind == "image" and isinstance(value, str) and len(value) > limits.max_image_bytes * 4 // 3 + 4:
                raise errors.invalid(f"parameter 'image' is {len(value)} base64 characters, more than the limit "
                                     f"of {limits.max_image_bytes} bytes", name)
            values[name] = _from_param(name, f, value)
    return _check(values, limits, image_to_image)


def _check(v: dict[str, Any], lim: Limits, image_to_image: bool) -> GlmImageRequest:
    if "prompt" not in v:
        raise errors.invalid("input 'prompt' is missing: glm_image needs a prompt (BYTES [1], UTF-8)", "prompt")
    if len(v["prompt"]) > lim.max_prompt_bytes:
        raise errors.invalid(f"prompt is {len(v['prompt'])} bytes, more than the limit of {lim.max_prompt_bytes}",
                             "prompt")
    try:
        prompt = v["prompt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.invalid(f"prompt is not valid UTF-8 ({e.reason} at byte {e.start})", "prompt") from None
    if not prompt.strip():
        raise errors.invalid("prompt is empty", "prompt")
    for name in SETTINGS:
        check = FIELDS[name].check
        error = check(v[name], lim) if name in v and check is not None else None
        if error:
            raise errors.invalid(error, name)
    if "height" in v and "width" in v:
        try:
            lim.check_size(v["height"], v["width"])
        except ValueError as e:
            raise errors.invalid(str(e), "height") from None
    images = [_open_image(data, lim, image_to_image) for data in v.get("image", [])]
    return GlmImageRequest(prompt, images, **{n: v.get(n) for n in SETTINGS})


def _open_image(data: bytes, lim: Limits, image_to_image: bool) -> Image.Image:
    """Read the header only (cheap); the pixels are decoded by `run`, on a worker."""
    if not image_to_image:
        raise errors.invalid("image: this package has no image-to-image graphs; export vision_tokenizer, "
                             "vae_encoder and dit_condition_write to edit images", "image")
    if len(data) > lim.max_image_bytes:
        raise errors.invalid(f"image is {len(data)} bytes, more than the limit of {lim.max_image_bytes}", "image")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:  # PIL's own bound (twice MAX_IMAGE_PIXELS), met before ours
        raise errors.invalid(f"image: more than the limit of {lim.max_source_pixels} pixels", "image") from None
    except (UnidentifiedImageError, OSError, ValueError):  # PIL's message names its buffer object, not the data
        raise errors.invalid("image: not a readable PNG, JPEG or WebP image", "image") from None
    if image.width * image.height > lim.max_source_pixels:
        raise errors.invalid(f"image is {image.width}x{image.height}, more than the limit of "
                             f"{lim.max_source_pixels} pixels", "image")
    try:  # a source is encoded at its own size: it is bounded as an output is
        lim.check_size(image.height, image.width, "the source image", minimum=False)
    except ValueError as e:
        raise errors.invalid(f"image: {e}; resize it", "image") from None
    return image


def output_size(r: GlmImageRequest, source: Image.Image | None, config: Pipeline,
                lim: Limits) -> tuple[int, int]:
    """The size the pipeline will produce, checked against the limits before any work."""
    height, width = config.image_size(r.height, r.width, (source.height, source.width) if source is not None else None)
    origin = "the source image" if source is not None else "the package default"
    for name, size in (("height", height), ("width", width)):
        if size < lim.grid.factor:
            raise errors.invalid(f"{name} {size} (from {origin}) is less than {lim.grid.factor}; pass {name}", name)
    try:
        lim.check_size(height, width, origin)
    except ValueError as e:
        raise errors.invalid(f"{e}; pass height and width", "height") from None
    return height, width


def _with_previews(pipeline: Any, previews: Previews, progress: Progress | None) -> tuple[Any, Progress]:
    """(callback_on_step_end, progress) for the pipeline: the callback keeps the step's estimate and
    the progress callback, which learns the step count, decodes it at the preview steps."""
    from glm_image_onnx.runtime.images import to_pil

    latest: dict[str, np.ndarray] = {}

    def on_step_end(_pipe: Any, _i: int, _t: float, tensors: dict[str, np.ndarray]) -> None:
        latest["denoised"] = tensors["denoised"]

    def on_progress(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)
        if stage != "denoise" or "denoised" not in latest:
            return
        at = sorted({max(1, round(total * (j + 1) / (previews.count + 1))) for j in range(previews.count)} - {total})
        if done in at:
            previews.emit(at.index(done), to_pil(pipeline.decode(latest.pop("denoised")))[0], done, total)

    return on_step_end, on_progress


def run(pipeline: Any, r: GlmImageRequest, outputs: list[str], limits: Limits,
        progress: Progress | None = None) -> Result:
    """Decode the source images, run the pipeline (progress may raise to stop it), encode the outputs."""
    for image in r.images:  # from the headers: nothing is decoded for a refused request
        error = pipeline.source_error(image.width, image.height)
        if error:
            raise errors.invalid(error, "image")
    sources = []
    for image in r.images:
        try:
            image.load()
            sources.append(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise errors.invalid(f"image: cannot decode the {image.format} data ({e})", "image") from None
    error = pipeline.prompts.prompt_error(r.prompt)
    if error:
        raise errors.invalid(error, "prompt")
    height, width = output_size(r, sources[0] if sources else None, pipeline.config, limits)
    on_step_end = None
    if r.previews is not None and r.previews.count > 0:
        on_step_end, progress = _with_previews(pipeline, r.previews, progress)
    # Every setting was checked by `parse`: a ValueError from here on is a bug, answered as INTERNAL.
    out = pipeline(r.prompt, height=height, width=width, image=sources or None, progress=progress,
                   callback_on_step_end=on_step_end, **r.pipeline_settings())
    image = out.images[0].convert("RGB")
    result: list[tuple[str, np.ndarray, str]] = []
    for name in outputs:
        if name == "image_png":
            value = np.empty(1, dtype=object)
            value[0] = encode_image(image, "PNG")
            result.append((name, value, "BYTES"))
        elif name == "image":
            result.append((name, np.asarray(image, dtype=np.uint8), "UINT8"))
        elif name == "tokens":
            result.append((name, np.asarray(out.tokens, np.int64).reshape(-1), "INT64"))
    t = out.timings
    parameters = {"seed": int(out.seed), "total_s": float(t.total_s), "ar_batch_rows": int(t.ar_batch_rows)}
    return Result(result, parameters, t)


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    """An image file (PNG, JPEG or WEBP) of `image`."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
