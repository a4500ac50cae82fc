"""The fields of a glm_image request, each declared once, and the typed request they make.

Every front end reads this table: the KServe inputs and parameters (`glm_image_request`), the OpenAI
body's extra fields (`openai_protocol`), the Triton Python model's inputs, the client's flags, the
checks and the pipeline's keywords. A new setting is one `FIELDS` entry and one `GlmImageRequest`
field here. Needs only numpy and Pillow (the client command imports it without the server's extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from glm_image_onnx.server.limits import Limits

SEED_LIMIT = 2 ** 63  # seeds are int64 on the wire (KServe INT64, the response parameter `seed`)
# The least temperature / top_p: the sampler divides the logits by the temperature in float32, where
# 1e-300 is 0 and 1e-40 subnormal (infinite scores); below 1e-6 sampling is greedy anyway.
MIN_SAMPLING = 1e-6

Check = Callable[[Any, Limits], "str | None"]  # (value, limits) -> why it is refused, or None


def _within(name: str, low: float, high: Callable[[Limits], float], shown: str = "") -> Check:
    """low <= value <= high(limits), finite: the message says the range the server takes."""
    def check(value: Any, lim: Limits) -> str | None:
        top = high(lim)
        if math.isfinite(value) and low <= value <= top:
            return None
        return f"{name} must be between {low} and {shown or top}, got {value}"

    return check


def _side(name: str) -> Check:
    def check(value: int, lim: Limits) -> str | None:
        error = lim.grid.side_error(name, value)
        if error is None and lim.max_side is not None and value > lim.max_side:
            error = f"{name} {value} is larger than this server's limit of {lim.max_side} pixels"
        return error

    return check


@dataclass(frozen=True)
class FieldSpec:
    datatype: str
    kind: str  # text | image | int | float | bool
    check: Check | None = None  # a setting's bound (text and images are checked by `_check`)
    pipeline: str | None = None  # GlmImageOnnxPipeline's keyword for a setting, where not the same name


# Every field of a glm_image request, declared once: the KServe inputs and parameters, the OpenAI
# body's extra fields, the Triton model's inputs, the checks and the pipeline's keywords derive from
# it. A new setting is one entry here and one field of `GlmImageRequest` below.
FIELDS = {
    "prompt": FieldSpec("BYTES", "text"), "image": FieldSpec("BYTES", "image"),
    "height": FieldSpec("INT32", "int", _side("height")), "width": FieldSpec("INT32", "int", _side("width")),
    "steps": FieldSpec("INT32", "int", _within("steps", 1, lambda lim: lim.max_steps), "num_inference_steps"),
    "guidance": FieldSpec("FP32", "float", _within("guidance", 0, lambda lim: lim.max_guidance), "guidance_scale"),
    "seed": FieldSpec("INT64", "int", _within("seed", 0, lambda lim: SEED_LIMIT - 1, "2^63-1")),
    "temperature": FieldSpec("FP32", "float", _within("temperature", MIN_SAMPLING, lambda lim: 10)),
    "top_p": FieldSpec("FP32", "float", _within("top_p", MIN_SAMPLING, lambda lim: 1)),
    "top_k": FieldSpec("INT32", "int", lambda v, lim: None if 1 <= v < 2 ** 31 else
                       f"top_k must be between 1 and 2^31 - 1 (INT32), got {v}"),
    "do_sample": FieldSpec("BOOL", "bool"),
}
SETTINGS = tuple(n for n, f in FIELDS.items() if f.kind not in ("text", "image"))  # one value each


@dataclass
class Previews:
    """`count` previews of the image while it is denoised (the OpenAI API's partial images): the
    step's estimate of the final latents, VAE-decoded, at evenly spaced steps before the last.
    `emit(index, image, step, total)` is called on the worker; each costs one VAE decode."""

    count: int
    emit: Callable[[int, Image.Image, int, int], None]


@dataclass
class GlmImageRequest:
    """A checked glm_image request: what every front end's wire format becomes, once (`parse`)."""

    prompt: str
    images: list[Image.Image] = field(default_factory=list)  # source images: headers read, pixels decoded by `run`
    height: int | None = None  # None: the pipeline's default, here and below
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    do_sample: bool | None = None
    previews: Previews | None = None  # not a wire field: the OpenAI front end's partial images

    def pipeline_settings(self) -> dict[str, Any]:
        """The settings as GlmImageOnnxPipeline's keywords (size excepted: `output_size` fixes it)."""
        return {FIELDS[n].pipeline or n: getattr(self, n) for n in SETTINGS if n not in ("height", "width")}
