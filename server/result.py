"""What a served model's work returns, before a front end encodes it (gRPC or HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from glm_image_onnx.runtime.timings import Timings


@dataclass
class Result:
    outputs: list[tuple[str, np.ndarray, str]]  # (name, array, KServe datatype), in the requested order
    parameters: dict[str, Any] = field(default_factory=dict)  # response parameters
    timings: Timings | None = None  # glm_image: its stages and AR statistics (metrics, log line)
