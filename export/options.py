"""What an export is asked for and how it reports: the graphs a package can hold, the options, the
errors, and `ExportRun`, the one export under way that every stage of the exporter is handed.

Every other module of the exporter imports from here rather than from `export.package`, which
imports them; nothing here needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from glm_image_onnx.errors import UsageError
from glm_image_onnx.models.inspect import CheckpointInfo
from glm_image_onnx.targets import check_dtype, get_target

# graph name -> checkpoint folder it comes from (also the order of export).
GRAPHS: dict[str, str] = {
    "ar_planner": "vision_language_encoder",
    "vision_tokenizer": "vision_language_encoder",
    "glyph_encoder": "text_encoder",
    "dit_decoder": "transformer",
    "dit_condition_write": "transformer",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}
# checkpoint folder -> export modules (each returns GraphSpecs for the loaded component).
EXPORT_MODULES: dict[str, tuple[str, ...]] = {
    "vision_language_encoder": ("ar_planner", "vision_tokenizer"),
    "text_encoder": ("glyph_encoder",),
    "transformer": ("dit_decoder",),
    "vae": ("vae",),
}
# Above this many bytes of safetensors a checkpoint exports one component at a time, streaming its
# weights (ExportOptions.low_memory): several fully loaded components would not fit beside each other.
LARGE_CHECKPOINT = 2_000_000_000


class ExportError(RuntimeError):
    """An export that cannot go on; the message is one readable line."""


class ExportUsageError(ExportError, UsageError):
    """An export that cannot start as asked (options, checkpoint, output folder): exit 2."""


@dataclass
class ExportOptions:
    graphs: tuple[str, ...] = tuple(GRAPHS)
    verify: bool = False
    opset: int = 18
    overwrite: bool = False
    seed: int = 0
    jobs: int | None = None  # parallel component exports; None = default_jobs()
    target: str = "cpu"  # glm_image_onnx.targets: the provider the package is built for
    dtype: str | None = None  # None: the target's default (cpu fp32, cuda bf16)
    # Trace weightless models and stream each weight from the checkpoint's safetensors into the
    # graph (export.streaming), the same graphs as without; fp16 / bf16 convert the weightless fp32
    # graph, each weight read from the checkpoint as it is written (precision.convert(weights=...),
    # no fp32 weights on disk). One component at a time; --verify
    # runs onnxruntime first, then loads the fp32 PyTorch model, never both in memory together.
    # None: on for checkpoints of LARGE_CHECKPOINT bytes or more (the real one), off below.
    low_memory: bool | None = None

    def __post_init__(self) -> None:
        try:
            self.dtype = check_dtype(get_target(self.target), self.dtype)
        except ValueError as e:
            raise ExportUsageError(str(e)) from None


def checkpoint_bytes(info: CheckpointInfo) -> int:
    return sum(p.stat().st_size for p in info.root.rglob("*.safetensors"))


@dataclass(frozen=True)
class ExportRun:
    """One export under way: the checkpoint folder it reads, the staging folder it writes the
    package into, its options, each selected graph's progress label ("[2/7]") and where progress
    lines go (a worker process sends them to the parent instead)."""

    root: Path
    tmp: Path
    options: ExportOptions
    steps: dict[str, str]
    log: Callable[[str], None]
