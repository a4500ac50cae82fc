"""Real graph inputs, captured by running the fp32 runtime: calibration and evaluation data.

No torch here, so inputs cannot come from the exporter's wrappers: the fp32 package runs the
ordinary `GlmImageOnnxPipeline` on a set of prompts with every session wrapped in a recorder that
keeps a copy of what each call was fed (plain `run` and the AR planner's IO binding alike). Each
graph then has the inputs it really sees: the AR planner's prefill and decode steps with their KV
cache, the DiT at every timestep with both CFG branches, the VAE on denoised latents.
"""

from __future__ import annotations

import ctypes
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
    """Feeds per graph; `keep(graph, call_index_in_run)` decides which calls are stored."""

    keep: Callable[[str, int], bool] = lambda graph, i: graph != "ar_planner" or keep_ar_call(i)
    feeds: dict[str, list[Feed]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def new_run(self) -> None:
        self.calls.clear()

    def wants(self, graph: str) -> bool:
        i = self.calls.get(graph, 0)
        self.calls[graph] = i + 1
        return self.keep(graph, i)

    def add(self, graph: str, feed: Feed | None) -> None:
        if feed is None:
            self.skipped[graph] = self.skipped.get(graph, 0) + 1
        else:
            self.feeds.setdefault(graph, []).append(feed)


def _read_pointer(ptr: int, dtype: Any, shape: Sequence[int]) -> np.ndarray:
    """A copy of a host buffer bound by pointer."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) if len(shape) else 1
    if n == 0:
        return np.zeros(tuple(shape), dtype)
    raw = (ctypes.c_char * (n * dtype.itemsize)).from_address(int(ptr))
    return np.frombuffer(raw, dtype=dtype, count=n).reshape(tuple(shape)).copy()


class _RecordingBinding:
    """An IOBinding that remembers how each input was bound and reads it back at run time (only
    for kept calls): numpy inputs, OrtValues, and host buffers bound by pointer."""

    def __init__(self, binding: Any):
        self._binding = binding
        self.inputs: dict[str, Callable[[], np.ndarray | None]] = {}

    def bind_cpu_input(self, name: str, value: np.ndarray) -> None:
        self.inputs[name] = lambda v=value: np.array(v, copy=True)
        self._binding.bind_cpu_input(name, value)

    def bind_ortvalue_input(self, name: str, value: Any) -> None:
        self.inputs[name] = lambda v=value: np.array(v.numpy(), copy=True)
        self._binding.bind_ortvalue_input(name, value)

    def bind_input(self, name: str, device_type: Any, device_id: int, element_type: Any, shape: Sequence[int],
                   buffer_ptr: int) -> None:
        if str(device_type).lower() == "cpu":
            self.inputs[name] = lambda: _read_pointer(buffer_ptr, element_type, list(shape))
        else:  # device memory: not readable from here
            self.inputs[name] = lambda: None
        self._binding.bind_input(name, device_type, device_id, element_type, shape, buffer_ptr)

    def clear_binding_inputs(self) -> None:
        self.inputs.clear()
        self._binding.clear_binding_inputs()

    def read(self, names: Sequence[str]) -> Feed | None:
        if not set(names) <= set(self.inputs):
            return None
        feed = {k: self.inputs[k]() for k in names}
        return None if any(v is None for v in feed.values()) else feed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._binding, name)


class RecordingSession:
    """Wraps an onnxruntime InferenceSession; everything else is delegated unchanged."""

    def __init__(self, session: Any, graph: str, recorder: Recorder):
        self._session, self._graph, self._recorder = session, graph, recorder
        self._inputs = [i.name for i in session.get_inputs()]

    def run(self, output_names: Any, input_feed: Feed, *args: Any, **kwargs: Any) -> Any:
        if self._recorder.wants(self._graph):
            feed = {k: np.array(v, copy=True) for k, v in input_feed.items()}
            self._recorder.add(self._graph, feed if set(self._inputs) <= set(feed) else None)
        return self._session.run(output_names, input_feed, *args, **kwargs)

    def io_binding(self) -> _RecordingBinding:
        return _RecordingBinding(self._session.io_binding())

    def run_with_iobinding(self, binding: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(binding, _RecordingBinding):
            if self._recorder.wants(self._graph):
                self._recorder.add(self._graph, binding.read(self._inputs))
            binding = binding._binding
        return self._session.run_with_iobinding(binding, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def install(pipe: Any, recorder: Recorder) -> None:
    """Replace every session of `pipe` (and any helper object holding one, like the AR planner)."""
    for graph, session in list(pipe.sessions.items()):
        proxy = RecordingSession(session, graph, recorder)
        pipe.sessions[graph] = proxy
        for obj in vars(pipe).values():
            if hasattr(obj, "__dict__") and not isinstance(obj, type):
                for key, value in list(vars(obj).items()):
                    if value is session:
                        setattr(obj, key, proxy)


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
    install(pipe, recorder)
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

