"""Padded lengths for static-shapes packages (the cann target).

CANN graph mode compiles each supported stretch of a graph once per set of input shapes. A package
built for it records length buckets in its manifest (`target.shape_buckets`, written from
`glm_image_onnx.targets.SHAPE_BUCKETS`); the runtime pads every variable length up to the smallest
bucket that holds it, with a mask or a write position saying what is real. Packages without buckets
run at their exact lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from glm_image_onnx.manifest import Target

BUCKET_KINDS = ("prompt", "capacity", "glyph", "dit_text")


@dataclass(frozen=True)
class ShapeBuckets:
    """Bucket lists by kind (see BUCKET_KINDS); empty: exact lengths."""

    buckets: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, target: Target) -> "ShapeBuckets":
        raw = target.shape_buckets or {}
        if not isinstance(raw, dict) or (raw and sorted(raw) != sorted(BUCKET_KINDS)):
            raise ValueError(f"target.shape_buckets must list {', '.join(BUCKET_KINDS)}, got {raw!r}")
        out = {}
        for kind, values in raw.items():
            if (not isinstance(values, list) or not values
                    or any(not isinstance(v, int) or v < 1 for v in values) or values != sorted(values)):
                raise ValueError(f"target.shape_buckets.{kind} must be an ascending list of positive ints")
            out[kind] = tuple(values)
        return cls(out)

    @property
    def static(self) -> bool:
        return bool(self.buckets)

    def pad(self, kind: str, length: int) -> int:
        """The padded length for `length` (itself without buckets); a length past the largest
        bucket is an error naming the kind, since a new shape would compile a new graph."""
        if not self.static:
            return length
        for bucket in self.buckets[kind]:
            if bucket >= length:
                return bucket
        raise ValueError(f"{kind} length {length} exceeds this package's largest {kind} bucket "
                         f"({self.buckets[kind][-1]}); re-export with larger buckets")


    def prefill(self, length: int) -> tuple[int, int]:
        """(padded prompt length, chunk) for an AR prefill of `length` tokens: one call at its bucket,
        or, past the largest prompt bucket, calls of that many tokens each (a chunked prefill keeps
        one shape and bounds the attention scores, [chunk x capacity] per head). Exact without buckets."""
        if not self.static:
            return length, length
        chunk = self.buckets["prompt"][-1]
        if length <= chunk:
            padded = self.pad("prompt", length)
            return padded, padded
        return -(-length // chunk) * chunk, chunk


def pad_right(rows: list[np.ndarray], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[1, T_i, D] rows -> ([B, L, D] zero-padded on the right, mask int64 [B, L]); L is the longest
    row, or `length` when given (a bucket)."""
    longest = max(e.shape[1] for e in rows)
    width = longest if length is None else length
    text = np.zeros((len(rows), width, rows[0].shape[2]), np.float32)
    mask = np.zeros((len(rows), width), np.int64)
    for i, e in enumerate(rows):
        text[i, : e.shape[1]] = e[0]
        mask[i, : e.shape[1]] = 1
    return text, mask


# ------------------------------------------------------------------------ counting shape sets
def record_shapes(pipe: Any) -> dict[str, list[tuple]]:
    """From now on, record each call's input shapes per graph of a GlmImageOnnxPipeline: graph ->
    one sorted ((input, shape), ...) tuple per call. The distinct tuples are what CANN graph mode
    compiles (once each per process). Through the pipeline's feed observer (`observe_feeds`), so
    the inputs must live on the host (every provider but CUDA keeps them there)."""
    seen: dict[str, list[tuple]] = {g: [] for g in pipe.sessions}

    def observe(graph: str, feeds: Any) -> None:
        host = feeds()
        if host is None:
            raise RuntimeError(f"record_shapes: {graph}'s inputs live in device memory")
        seen[graph].append(tuple(sorted((name, tuple(np.shape(value))) for name, value in host.items())))

    pipe.observe_feeds(observe)
    return seen
