"""Real graph inputs, captured by running the fp32 runtime: calibration and evaluation data.

No torch here, so inputs cannot come from the exporter's wrappers: the fp32 package runs the
ordinary `GlmImageOnnxPipeline` on a set of prompts with a `Recorder` installed as its feed
observer (`observe_feeds`), which keeps a copy of what chosen calls are fed (plain runs and IO
bindings alike). Each graph then has the inputs it really sees: the AR planner's prefill and
decode steps with their KV cache, the DiT at every timestep with both CFG branches, the VAE on
denoised latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

Feed = dict[str, np.ndarray]


def default_prompts_file() -> Path:
    return Path(__file__).with_name("calibration_prompts.txt")


def read_prompts(path: Path | str | None = None) -> list[str]:
    """One prompt a line; blank lines and lines starting with '#' are skipped."""
    path = Path(path) if path is not None else default_prompts_file()
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one a line)")
    return prompts


def keep_ar_call(index: int, every: int = 32) -> bool:
    """Which AR calls to keep: the prefill, the first decode steps, then log- and evenly spaced
    ones. Every decode step carries the whole KV cache, so keeping all of them would be huge."""
    return index < 4 or (index & (index - 1)) == 0 or index % every == 0


@dataclass
class Recorder:
    """A feed observer (runtime.ar.FeedObserver) that keeps copies of the feeds of chosen calls per
    graph; `keep(graph, call_index_in_run)` decides which."""

    keep: Callable[[str, int], bool] = lambda graph, i: graph != "ar_planner" or keep_ar_call(i)
    feeds: dict[str, list[Feed]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def new_run(self) -> None:
        self.calls.clear()

    def __call__(self, graph: str, feeds: Callable[[], Feed | None]) -> None:
        i = self.calls.get(graph, 0)
        self.calls[graph] = i + 1
        if not self.keep(graph, i):
            return
        feed = feeds()
        if feed is None:  # inputs in device memory
            self.skipped[graph] = self.skipped.get(graph, 0) + 1
        else:
            self.feeds.setdefault(graph, []).append({k: np.array(v, copy=True) for k, v in feed.items()})


def source_image(size: int, seed: int = 0) -> Any:
    """A deterministic smooth RGB test image (gradients plus low-frequency noise), for i2i runs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    coarse = rng.random((4, 4, 3))
    idx = np.minimum((np.stack([y, x], -1) * 4).astype(int), 3)
    noise = coarse[idx[..., 0], idx[..., 1]]
    rgb = np.stack([x, y, 1 - x * y], -1) * 0.6 + noise * 0.4
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def open_pipeline(path: Path, threads: int | None = None) -> Any:
    """The runtime on CPU; files were checked when the package was opened or just written."""
    from glm_image_onnx.runtime import GlmImageOnnxPipeline, Package, ProviderRequest

    return GlmImageOnnxPipeline(Package.open(path, verify_files=False), ProviderRequest("cpu"), threads)


def capture(package: Path | str, prompts: Sequence[str], height: int, width: int, steps: int,
            seed: int = 0, guidance_scale: float | None = None, image_to_image: int = 0,
            threads: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, list[Feed]]:
    """Run the fp32 package on `prompts` (sampled AR, seeds seed, seed+1, ...) and on
    `image_to_image` edits of synthetic source images; return the recorded feeds per graph."""
    pipe = open_pipeline(Path(package), threads)
    recorder = Recorder()
    pipe.observe_feeds(recorder)
    runs: list[tuple[str, Any]] = [(p, None) for p in prompts]
    if image_to_image and pipe.supports_image_to_image:
        runs += [(prompts[i % len(prompts)], source_image(min(height, width), seed + i))
                 for i in range(image_to_image)]
    for k, (prompt, image) in enumerate(runs):
        recorder.new_run()
        pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
             seed=seed + k, image=image)
        if log:
            log(f"captured run {k + 1}/{len(runs)}{' (image-to-image)' if image is not None else ''}")
    for graph, n in recorder.skipped.items():
        if log:
            log(f"warning: {n} {graph} calls could not be recorded (inputs in device memory)")
    return recorder.feeds

