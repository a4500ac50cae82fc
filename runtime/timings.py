"""What one generation spent where: seconds per pipeline stage and its AR planning's statistics.

One name per fact, here: the server's metrics (`glm_image_compute_duration_seconds{stage=...}`),
its log line and response parameters, the CLI and the benchmarks all read these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The stages, in pipeline order, as the metrics label them (each field is the stage + "_s").
STAGES = ("vision_tokenizer", "ar_prefill", "ar_decode", "glyph", "condition", "dit", "vae", "total")


@dataclass
class Timings:
    vision_tokenizer_s: float | None = None  # image-to-image only: the sources' VQ tokens
    ar_prefill_s: float = 0.0
    ar_decode_s: float = 0.0
    glyph_s: float = 0.0
    condition_s: float | None = None  # image-to-image only: the DiT's condition K/V
    dit_s: float = 0.0
    vae_s: float = 0.0
    total_s: float = 0.0
    ar_per_token_s: float = 0.0  # median decode step
    dit_per_step_s: float = 0.0  # median denoising step (CFG batch)
    ar_queue_s: float = 0.0  # waiting for a free AR cache row (AR batching): not compute
    ar_tokens: int = 0  # image tokens the AR planning generated
    ar_batch_rows: int = 1  # the most generations that shared one of its AR decode steps (1: alone)

    def stages(self) -> dict[str, float]:
        """Seconds per stage that ran, by the metrics' stage name."""
        out = {stage: getattr(self, f"{stage}_s") for stage in STAGES}
        return {stage: float(s) for stage, s in out.items() if s is not None}

    def as_dict(self) -> dict[str, Any]:
        """Every field (benchmarks' JSON)."""
        return dataclasses.asdict(self)
