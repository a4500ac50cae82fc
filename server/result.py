"""What a served model's work returns, before a front end encodes it (gRPC or HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Result:
    outputs: list[tuple[str, np.ndarray, str]]  # (name, array, KServe datatype), in the requested order
    parameters: dict[str, Any] = field(default_factory=dict)  # response parameters
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds, for the metrics
    ar_queue_s: float = 0.0  # glm_image: waiting for a free AR cache row (not compute)
    ar_tokens: int = 0  # glm_image: image tokens its AR planning generated
