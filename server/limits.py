"""What one request may ask for, each bound declared once: its default, its command-line flag and
its help. `serve` and `triton-repo` take their flags from here, glm_image's model config carries
the bounds as parameters (in both servers: ours and Triton's Python backend), and the README's
table is printed from it (`python -m glm_image_onnx.server.limits`). Larger requests are refused
with INVALID_ARGUMENT / HTTP 400 naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any, TypeVar

from glm_image_onnx.manifest import Grid

T = TypeVar("T")


def bound(default: Any, help: str, minimum: float = 1, unit: int = 1, flag: str | None = None) -> Any:
    """A limit field: its flag is --<flag or name> (in units of `unit`: MiB flags for byte limits)."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "unit": unit, "flag": flag})


@dataclass(frozen=True)
class Limits:
    """glm_image requests. The size bounds left None come from the package (`for_package`): the
    published model takes 512x512 .. 2048x2048, a toy package what its processor says."""

    max_side: int | None = bound(None, "largest height or width a request may ask (default: sqrt(max-pixels); "
                                       "2048 for the published model)", minimum=Grid().factor)  # one token
    max_pixels: int | None = bound(None, "largest height x width (default: max-side squared, else the package's "
                                         "processor config)", minimum=1024)
    min_pixels: int | None = bound(None, "smallest height x width (default: the package's processor config)")
    max_steps: int = bound(100, "most denoising steps a request may ask")
    max_guidance: float = bound(50.0, "largest guidance scale a request may ask", minimum=0)
    max_prompt_bytes: int = bound(16384, "longest prompt in UTF-8 bytes")
    max_image_bytes: int = bound(32 << 20, "largest source image file, in MiB", unit=1 << 20, flag="max_image_mb")
    max_source_pixels: int = bound(4096 * 4096, "most pixels of a source image file (its header is read first)")
    grid: Grid = Grid()  # not a bound: the package's token grid (image sides are multiples of its factor)

    def for_package(self, processor: Any, grid: Grid) -> "Limits":
        """The unset size bounds from an `images.ImageProcessor`: its pixel range, and a side of at
        most sqrt(max_pixels) (the published vision encoder's image_size is that 2048 too); the
        package's grid (manifest `pipeline.grid`)."""
        max_pixels = self.max_pixels or (self.max_side ** 2 if self.max_side else processor.max_pixels)
        return dataclasses.replace(self, max_pixels=max_pixels, grid=grid,
                                   min_pixels=processor.min_pixels if self.min_pixels is None else self.min_pixels,
                                   max_side=self.max_side or math.isqrt(max_pixels))

    def check_size(self, height: int, width: int, origin: str = "", minimum: bool = True) -> None:
        """ValueError naming the field when (height, width) is outside this server's bounds (only
        the upper ones without `minimum`)."""
        src = f" (from {origin})" if origin else ""
        for name, size in (("height", height), ("width", width)):
            if self.max_side is not None and size > self.max_side:
                raise ValueError(f"{name} {size}{src} is larger than this server's limit of {self.max_side} pixels")
        if self.max_pixels is not None and height * width > self.max_pixels:
            raise ValueError(f"height x width = {height}x{width}{src} is more than this server's limit of "
                             f"{self.max_pixels} pixels")
        if minimum and self.min_pixels and height * width < self.min_pixels:
            raise ValueError(f"height x width = {height}x{width}{src} is less than this model's minimum of "
                             f"{self.min_pixels} pixels")


@dataclass(frozen=True)
class ComponentLimits:
    """Requests to a component model (and the server-wide tensor decode bound)."""

    max_tensor_elements: int = bound(1 << 28, "most elements of one input tensor of any request")
    max_axis_size: int = bound(16384, "largest dynamic axis (other than batch) of a component model input")


@dataclass(frozen=True)
class ConnectionLimits:
    """HTTP connections: how long a client may take, and how much body all of them may hold at once
    (bodies are read before a request is admitted, so admission cannot bound them)."""

    header_timeout: float = bound(10.0, "seconds a client may take to send a request's headers", minimum=0.01)
    body_timeout: float = bound(30.0, "seconds a request body may stall between two reads", minimum=0.01)
    keep_alive: float = bound(5.0, "seconds an idle keep-alive connection stays open", minimum=0.01)
    max_body_memory: int = bound(1 << 30, "MiB of HTTP request bodies held at once, all requests together; "
                                           "more get 429", unit=1 << 20, flag="max_body_memory_mb")


def _bounds(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _flag(f: dataclasses.Field) -> str:
    return "--" + (f.metadata["flag"] or f.name).replace("_", "-")


def _type(f: dataclasses.Field) -> type:
    return float if isinstance(f.default, float) else int


def add_arguments(parser: argparse.ArgumentParser, *classes: type) -> None:
    """One flag per bound of `classes`, with its default and help."""
    for cls in classes:
        for f in _bounds(cls):
            default = None if f.default is None else f.default // f.metadata["unit"]
            shown = f" (default {default})" if default is not None else ""
            parser.add_argument(_flag(f), dest=f.name, type=_type(f), default=default, help=f.metadata["help"] + shown)


def from_arguments(args: argparse.Namespace, cls: type[T]) -> T:
    """The limits the flags ask for; ValueError naming the flag below its minimum."""
    values = {}
    for f in _bounds(cls):
        value = getattr(args, f.name)
        if value is not None:
            if not value >= f.metadata["minimum"]:
                raise ValueError(f"{_flag(f)} must be >= {f.metadata['minimum']}, got {value}")
            value *= f.metadata["unit"]
        values[f.name] = value
    return cls(**values)


def to_parameters(limits: Any) -> dict[str, str]:
    """The bounds as model config parameters (unset ones left out)."""
    return {f.name: str(getattr(limits, f.name)) for f in _bounds(type(limits)) if getattr(limits, f.name) is not None}


def from_parameters(cls: type[T], params: dict[str, str]) -> T:
    """`to_parameters`' inverse (Triton's Python model reads its config with it)."""
    return cls(**{f.name: _type(f)(params[f.name]) for f in _bounds(cls) if params.get(f.name)})


def markdown_table(*classes: type) -> str:
    rows = ["| flag | model config parameter | default | what it bounds |", "|---|---|---|---|"]
    for cls in classes:
        for f in _bounds(cls):
            default = "from the package" if f.default is None else str(f.default // f.metadata["unit"])
            parameter = "(server only)" if cls is ConnectionLimits else f"`{f.name}`"
            rows.append(f"| `{_flag(f)}` | {parameter} | {default} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table(Limits, ComponentLimits, ConnectionLimits) + "\n")
