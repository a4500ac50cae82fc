"""The server's memory budget (`serve --max-memory`): each admitted request reserves its estimated
peak memory until its work ends, and admission refuses one that would take the process past the
budget (RESOURCE_EXHAUSTED, HTTP 429, naming the flag), so no request meets an allocation failure
or the OOM killer.

The estimates are measured, not tabulated. At first load the server runs small generations (one
denoising step, at a quarter and half of the largest side; an edit too where the package has the
graphs) and keeps the first call of each graph as the pipeline made it. It measures the peak
resident memory above the level before (Linux's peak-RSS counter, reset first) of each generation
and of each of those graph calls run alone, and fits peak = a*n + b*n^2 through the two sizes: n is
the image's pixels for glm_image, and the elements per row of its largest input for a component
call (linear for convolutions and caches, quadratic for attention). The fit is cached per package
and provider (runtime.package.cache_dir), so later loads skip the probe.

What it does not see: device memory (a CUDA or CANN session's tensors; the budget bounds the host),
and that the pipeline runs one generation's DiT and VAE at a time: every admitted generation
reserves its whole peak, which overcounts when several are in flight (it errs toward refusing).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from glm_image_onnx.server import errors

log = logging.getLogger("glm_image_onnx.server")

PROBE_PROMPT = "a sign that says 'OPEN'"
# Estimates are the fit times this: the allocator's own overhead, and what two sizes cannot show.
# Between and beyond the probed sizes the fit can only overestimate where the pipeline switches to
# cheaper calls (per-row guidance, VAE tiles); measured in benchmarks/README.md (bench_memory).
MARGIN = 1.25
PROBE_FORMAT = 2  # the cached fit's: a new one measures again


@dataclass(frozen=True)
class Cost:
    """Peak bytes of one call: a*n + b*min(n, cap)^2 in its size n (the quadratic part stops
    growing at `cap` where the pipeline switches to a kernel without it)."""

    a: float
    b: float
    cap: float | None = None
    floor: float = 0.0  # the smaller probe's cost: below its size the fit is not trusted lower

    @classmethod
    def fit(cls, n1: int, c1: int, n2: int, c2: int) -> "Cost":
        """Through (n1, c1) and (n2, c2), n1 <= n2, with a, b >= 0 (noise can make one negative);
        linear through the larger where both calls had one size (a VAE tile, one glyph text)."""
        if n1 == n2:
            return cls(max(c1, c2) / n1, 0.0, floor=max(c1, c2))
        b = (c2 / n2 - c1 / n1) / (n2 - n1)
        a = c1 / n1 - b * n1
        if b < 0:
            return cls(max(c1 / n1, c2 / n2), 0.0, floor=c1)
        if a < 0:
            return cls(0.0, max(c1 / n1 ** 2, c2 / n2 ** 2), floor=c1)
        return cls(a, b, floor=c1)

    def __call__(self, n: int) -> int:
        q = n if self.cap is None else min(n, self.cap)
        return int(MARGIN * max(self.floor, self.a * n + self.b * q * q))


def rows_and_size(graph: str, inputs: dict[str, np.ndarray], batched: bool) -> tuple[int, int]:
    """(rows, n) of a component call: n is the elements per row of its largest input, except for the
    AR planner, whose attention scores are [tokens x cache capacity] per head (a long prompt's
    prefill costs far more than its cache)."""
    if graph == "ar_planner":
        ids = inputs["input_ids"]
        capacity = max(a.shape[2] for n, a in inputs.items() if a.ndim == 4)
        return int(ids.shape[0]) or 1, max(1, int(ids.shape[1]) * int(capacity))
    largest = max(inputs.values(), key=lambda a: a.size)
    rows = int(largest.shape[0]) if batched and largest.ndim and largest.shape[0] else 1
    return rows, max(1, largest.size // rows)


# ------------------------------------------------------------------------------- measuring
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def resident_bytes() -> int:
    return _status("VmRSS")


def _trim() -> None:
    """Hand the C heap's free pages back, so that a probe's growth is not hidden by an earlier one's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_above(fn: Callable[[], Any]) -> int:
    """Bytes by which the process's resident memory peaked above its level before `fn()` ran."""
    _trim()
    before = resident_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    fn()
    return max(0, _status("VmHWM") - before)


def measurable() -> str | None:
    """Why peaks cannot be measured here, or None."""
    try:
        peak_above(lambda: None)
        return None
    except OSError as e:
        return f"the peak-RSS counter is not available ({e})"


def machine_memory() -> int:
    """The memory this process may use: its cgroup's limit, else the machine's."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
            if value.isdigit() and int(value) < (1 << 60):
                return int(value)
        except OSError:
            continue
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str) -> int:
    """Bytes of "4G", "512M", "1.5T", "1048576" (binary units); ValueError naming the form."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper().removesuffix("B").removesuffix("I"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not number.replace(".", "", 1).isdigit() or value < 0:
        raise ValueError(f"--max-memory must be a size such as 4G, 512M or 0, got {text!r}")
    return int(value * units[unit])


# --------------------------------------------------------------------------------- probing
@dataclass(frozen=True)
class Costs:
    """What the probe measured: glm_image's peak in pixels, each graph's per row in its size."""

    glm_image: Cost
    graphs: dict[str, Cost]

    def to_json(self) -> str:
        return json.dumps({"glm_image": asdict(self.glm_image), "graphs": {g: asdict(c) for g, c in self.graphs.items()}})

    @classmethod
    def from_json(cls, text: str) -> "Costs":
        data = json.loads(text)
        return cls(Cost(**data["glm_image"]), {g: Cost(**c) for g, c in data["graphs"].items()})


def _cache_file(pipeline: Any, sides: tuple[int, int]) -> Path:
    from glm_image_onnx.runtime.package import cache_dir

    manifest = (pipeline.package.root / "manifest.json").read_bytes()
    what = (PROBE_FORMAT, pipeline.providers, pipeline.vae_tile_sample, sides)
    key = hashlib.sha256(manifest + repr(what).encode()).hexdigest()
    return cache_dir() / "memory" / f"{key[:32]}.json"


def probe(pipeline: Any, sides: tuple[int, int]) -> Costs:
    """Measure the costs at two image sides (see the module docstring); cached."""
    cached = _cache_file(pipeline, sides)
    if cached.is_file():
        return Costs.from_json(cached.read_text())
    log.info("measuring memory use at %d and %d px (once per package; cached in %s)", *sides, cached.parent)
    points: dict[str, dict[int, tuple[int, int]]] = {}  # graph -> side -> (n, bytes per row)
    glm: list[tuple[int, int]] = []
    for side in sides:
        for edit in ([False, True] if pipeline.supports_image_to_image else [False]):
            calls = _record_calls(pipeline)
            image = Image.new("RGB", (side, side), (200, 40, 40)) if edit else None
            peak = peak_above(lambda: pipeline(PROBE_PROMPT, height=side, width=side, num_inference_steps=1, seed=0,
                                               image=image))
            pipeline.observe_feeds(None)
            if not edit:
                glm.append((side * side, peak))
            for graph, feeds in calls.items():
                rows, n = rows_and_size(graph, feeds, batched=True)
                session = pipeline.sessions[graph]
                cost = peak_above(lambda: session.run(None, feeds, pipeline.release[graph]))
                points.setdefault(graph, {}).setdefault(side, (n, cost // rows))
    # Past this many pixels the pipeline's DiT calls stop holding [heads x S x S] scores (one CFG
    # row at a time on the flash kernel): the generation's quadratic part grows no further.
    cap = pipeline.batched_cfg_max_seq * (pipeline.vae_scale * pipeline.patch_size) ** 2
    costs = Costs(dataclasses.replace(Cost.fit(*glm[0], *glm[1]), cap=cap),
                  {g: Cost.fit(*p[sides[0]], *p[sides[1]]) for g, p in points.items() if len(p) == 2})
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(costs.to_json())
    return costs


def _record_calls(pipeline: Any) -> dict[str, dict[str, np.ndarray]]:
    """From now on, a copy of the first call's feeds of each graph (host feeds only)."""
    calls: dict[str, dict[str, np.ndarray]] = {}

    def observe(graph: str, feeds: Callable[[], Any]) -> None:
        if graph not in calls:
            host = feeds()
            if host is not None:
                calls[graph] = {k: np.array(v, copy=True) for k, v in host.items()}

    pipeline.observe_feeds(observe)
    return calls


# ---------------------------------------------------------------------------------- budget
class MemoryBudget:
    """Bytes the admitted requests may reserve: --max-memory less what the process holds when the
    models are loaded (weights, sessions, the probe's leftovers)."""

    def __init__(self, total: int, baseline: int):
        self.total, self.baseline = total, baseline
        self.capacity = total - baseline
        self.reserved = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        """Take `nbytes` or refuse (RESOURCE_EXHAUSTED naming the budget)."""
        with self._lock:
            if nbytes > self.capacity:
                raise errors.exhausted(
                    f"this request needs about {_gib(nbytes)} of memory, more than this server has for requests "
                    f"({_gib(self.capacity)} of --max-memory {_gib(self.total)}); ask for a smaller image")
            if self.reserved + nbytes > self.capacity:
                raise errors.exhausted(
                    f"server busy: requests in flight hold {_gib(self.reserved)} of its {_gib(self.capacity)} "
                    f"memory budget (--max-memory) and this one needs about {_gib(nbytes)}; retry later")
            self.reserved += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.reserved -= nbytes


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"
