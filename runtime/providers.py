"""Execution providers: CPU, CUDA and CANN, with their options, and honest fallback reporting.

onnxruntime silently runs on CPU when a provider cannot start (missing CUDA or Ascend libraries):
its Python wrapper catches the provider's error, prints it and retries on CPU, and some providers
are simply left out of the session. We create sessions with that fallback off, compare what the
session actually uses with what was asked for, and report the difference: a warning naming the
provider, the options onnxruntime received and the reason (usually the device library that cannot
be loaded) by default, a `ProviderError` with the same text with `strict=True`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

log = logging.getLogger("glm_image_onnx.runtime")

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cann": "CANNExecutionProvider",
}
# Options each provider accepts (onnxruntime's documented keys); anything else is a typo.
PROVIDER_OPTIONS = {
    "cpu": set(),
    "cuda": {"device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search",
             "do_copy_in_default_stream", "enable_cuda_graph", "use_tf32", "prefer_nhwc",
             "cudnn_conv_use_max_workspace", "tunable_op_enable", "tunable_op_tuning_enable"},
    "cann": {"device_id", "npu_mem_limit", "arena_extend_strategy", "enable_cann_graph", "dump_graphs",
             "dump_om_model", "precision_mode", "op_select_impl_mode", "optypelist_for_implmode"},
}
# What this runtime asks of the CANN EP unless told otherwise (onnxruntime's own defaults in brackets):
# - enable_cann_graph 1 [1]: graph mode, whole stretches compiled by CANN's graph engine; the
#   single-op mode has no Softmax, Gather, Concat or Slice kernel (export/kernels/cann.json).
# - precision_mode must_keep_origin_dtype [force_fp16]: compute each node in the dtype the package
#   says; force_fp16 would also run a fp32 package, and the fp32 norms of a fp16 one, in fp16.
# - dump_om_model 0 [1]: otherwise every compiled model (one per shape set) is written to the
#   working directory.
# device_id and npu_mem_limit (bytes) pass through as given.
CANN_DEFAULTS = {"enable_cann_graph": True, "precision_mode": "must_keep_origin_dtype", "dump_om_model": False}
INSTALL_HINT = {
    "cuda": "install onnxruntime-gpu (instead of onnxruntime) and the CUDA + cuDNN libraries it was built for "
            "(e.g. pip install 'onnxruntime-gpu[cuda,cudnn]'), on a machine with an NVIDIA GPU and driver",
    "cann": "install onnxruntime-cann (instead of onnxruntime; it needs numpy<2) and the Ascend CANN toolkit, "
            "then source its set_env.sh",
}

# Used when the provider's plugin library cannot be inspected (not ELF, not found): a library the
# plugin needs, whose absence is the usual reason for a fallback.
DEVICE_LIBRARIES = {"cuda": ("libcudart.so.13", "libcublas.so.13", "libcuda.so.1"), "cann": ("libascendcl.so",)}
# Libraries every Linux system has: not worth probing.
_SYSTEM_LIBRARIES = ("libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so", "libstdc++.so", "libgcc_s.so",
                     "ld-linux", "libonnxruntime")


def provider_library(provider: str) -> Path:
    """onnxruntime's plugin for a provider, e.g. .../onnxruntime/capi/libonnxruntime_providers_cann.so."""
    return Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{provider}.so"


@functools.lru_cache(maxsize=8)
def _elf_dynamic(path: Path) -> tuple[list[str], list[str]]:
    """(DT_NEEDED, DT_RUNPATH + DT_RPATH entries) of a 64-bit little-endian ELF shared library."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # CUDA's is ~300 MB
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
            if sh_type != 6:  # SHT_DYNAMIC
                continue
            strtab = sections[link][4]

            def string(at: int) -> str:
                start = strtab + at
                return data[start:data.find(b"\0", start)].decode()

            needed, paths = [], []
            for pos in range(offset, offset + size, entsize or 16):
                tag, value = struct.unpack_from("<qQ", data, pos)
                if tag == 0:  # DT_NULL
                    break
                if tag == 1:  # DT_NEEDED
                    needed.append(string(value))
                elif tag in (15, 29):  # DT_RPATH, DT_RUNPATH
                    paths += [p.replace("$ORIGIN", str(path.parent)) for p in string(value).split(":") if p]
            return needed, paths
    return [], []


def missing_library(provider: str) -> str | None:
    """The loader's error for the first library the provider's plugin needs that cannot be loaded, if any.

    Reads the plugin's DT_NEEDED entries (so it names what this onnxruntime build links: CUDA 12 or 13,
    libascendcl.so) and tries them the way the dynamic loader would: the plugin's RUNPATH first.
    """
    plugin = provider_library(provider)
    try:
        needed, search = _elf_dynamic(plugin)
    except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error):
        needed, search = list(DEVICE_LIBRARIES.get(provider, ())), []
    for lib in needed:
        if lib.startswith(_SYSTEM_LIBRARIES):
            continue
        candidates = [str(Path(d) / lib) for d in search if (Path(d) / lib).is_file()] + [lib]
        try:
            ctypes.CDLL(candidates[0])
        except OSError as e:
            error = str(e)
            return f"{plugin.name} needs {error if error.startswith(lib) else f'{lib}: {error}'}"
    return None


class ProviderError(RuntimeError):
    """A requested execution provider is not usable and strict mode was asked for."""


def _option_value(value: Any) -> str:
    # onnxruntime takes string values; booleans as "1"/"0", which every provider parses.
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


@dataclass
class ProviderRequest:
    """What the user asked for; `providers()` turns it into onnxruntime's providers list."""

    name: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name.lower() not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {self.name!r}")
        self.name = self.name.lower()
        self.options = {**(CANN_DEFAULTS if self.name == "cann" else {}), **dict(self.options or {})}
        unknown = sorted(set(self.options) - PROVIDER_OPTIONS[self.name])
        if unknown:
            allowed = ", ".join(sorted(PROVIDER_OPTIONS[self.name])) or "none"
            raise ValueError(f"unknown {self.name} provider option {unknown[0]!r} (allowed: {allowed})")

    @property
    def ort_name(self) -> str:
        return PROVIDERS[self.name]

    def ort_options(self) -> dict[str, str]:
        """The options as onnxruntime receives them (strings)."""
        return {k: _option_value(v) for k, v in self.options.items()}

    def providers(self) -> list[Any]:
        """onnxruntime's providers argument: the requested one first, CPU as the fallback."""
        if self.name == "cpu":
            return ["CPUExecutionProvider"]
        return [(self.ort_name, self.ort_options()), "CPUExecutionProvider"]


def check_available(request: ProviderRequest) -> bool:
    """Is the provider compiled into this onnxruntime build? Warn or raise when it is not."""
    available = ort.get_available_providers()
    if request.ort_name in available:
        return True
    msg = (f"{request.ort_name} is not available in this onnxruntime build "
           f"({ort.__version__}, providers: {', '.join(available)}); {INSTALL_HINT[request.name]}")
    if request.strict:
        raise ProviderError(msg)
    log.warning("%s; running on CPU", msg)
    return False


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once); os.cpu_count() if unknown."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


# How long (microseconds) an idle intra-op worker spins before it sleeps. onnxruntime's default spins
# much longer, and every session owns its own pool: after the DiT's last step its worker was still
# spinning through the VAE decode (+15% there, and 2x on the AR prefill after the glyph encoder),
# and beside another busy process a spinning worker halves the AR decode. 100 us still bridges the
# gaps between the small ops of one AR token (no spinning at all costs ~15% per token).
# Measured in benchmarks/README.md; GLM_IMAGE_ONNX_SPIN_US overrides it (0 = never spin).
DEFAULT_SPIN_US = 100


def release_arena(session: ort.InferenceSession, device: str, device_id: int = 0) -> ort.RunOptions | None:
    """Run options that hand the session's arenas' free memory back at the end of the run, or None
    where it has none.

    An arena keeps its largest allocation for ever: each session would hold its worst step's
    buffers while the next stage allocates its own. Passed to the last run of each stage (a graph
    run once, the final denoising step, the last AR token, the last VAE tile), so that the runs of
    one stage still reuse the arena's memory. `device` is the session's (device_of): a CUDA session
    also shrinks its GPU arena; onnxruntime shrinks only "cpu" and "gpu" arenas, so a CANN session
    keeps its NPU arena. onnxruntime rejects a run that names an arena the session does not have."""
    arenas = ["cpu:0"] if session.get_session_options().enable_cpu_mem_arena else []
    if device == "cuda":
        arenas.append(f"gpu:{device_id}")
    if not arenas:
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", ";".join(arenas))
    return options


# How a CPU session allocates (session_options), chosen per graph by the runtime; measured in
# benchmarks/README.md, "Real scale". onnxruntime's buffer-reuse planner is off in all three.
MEMORY_MODES = {
    # onnxruntime's arena and memory patterns: a graph run again and again at one large shape (VAE
    # tiles), whose first run would otherwise fault in every tensor's pages; released per stage.
    "arena": (True, True),
    # memory patterns without the arena: many small runs (AR decode steps), one block per run.
    "pattern": (False, True),
    # neither: memory follows the graph's own frees exactly, for working sets that grow with the
    # image (the DiT: a pattern's block, laid out first-fit, was a third above the live peak).
    "exact": (False, False),
}


def session_options(provider: str, threads: int | None = None, memory: str = "pattern") -> ort.SessionOptions:
    """`memory`: a MEMORY_MODES key (CPU sessions; other providers keep onnxruntime's defaults)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if provider == "cpu":
        # One op at a time on all cores: these graphs are chains of large MatMuls. The thread count
        # is set explicitly (0 would let onnxruntime pick it and also pin threads to cores, which
        # hurts on a shared machine).
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or int(os.environ.get("GLM_IMAGE_ONNX_THREADS", 0)) or physical_cores()
        so.inter_op_num_threads = 1
        spin_us = int(os.environ.get("GLM_IMAGE_ONNX_SPIN_US", DEFAULT_SPIN_US))
        if spin_us <= 0:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        else:
            so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
            so.add_session_config_entry("session.intra_op.spin_backoff_max", "8")
        # A graph's working set must not grow with its layers. The buffer-reuse planner hands a
        # freed buffer to a later value of the same symbolic size, and in the DiT that kept each
        # block's intermediates alive into the next; the arena, growing in powers of two, kept more
        # per layer. One 2048 px DiT call above its weights: 1 layer 4.13 -> 3.29 GiB, 2 layers
        # 7.67 -> 3.54 GiB, at the same speed (the AR decode step too).
        so.enable_mem_reuse = False
        so.enable_cpu_mem_arena, so.enable_mem_pattern = MEMORY_MODES[memory]
    return so


def _ort_error(error: BaseException) -> str:
    """onnxruntime's error without its source location and C++ signature prefix."""
    text = str(error).strip()
    text = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ .*?\)(?: const)? (?=\S)", "", text.splitlines()[-1] if text else "")
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text or type(error).__name__


def fallback_message(path: Path | str, request: ProviderRequest, running_on: list[str],
                     error: BaseException | None = None) -> str:
    """Why a session is not on the requested provider: provider, options, reason, how to fix."""
    reasons = [f"onnxruntime: {_ort_error(error)}"] if error is not None else []
    library = missing_library(request.name)
    if library:
        reasons.append(library)
    reason = "; ".join(reasons) or "onnxruntime gave no reason; set log_severity_level 0 for its log"
    return (f"{Path(path).name}: {request.ort_name} was requested with options {request.ort_options()} "
            f"but {'could not start' if error is not None else 'was left out of the session'}: {reason}. "
            + ("strict: not falling back to CPU. " if request.strict else f"Running on {', '.join(running_on)}. ")
            + f"To use {request.ort_name}: {INSTALL_HINT[request.name]}")


def _session(path: Path | str, so: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
    # enable_fallback=0: onnxruntime's wrapper would otherwise catch a provider error, print it to stdout
    # and retry on CPU behind our back; we decide (and report) the fallback ourselves.
    return ort.InferenceSession(str(path), so, providers=providers, enable_fallback=0)


ConfigureSession = Callable[[ort.SessionOptions], None]
"""configure(options): adjusts a session's options just before it is created (a benchmark's
profiling, a test's graph-optimisation level): the one way to change them from outside."""


def _options(provider: str, threads: int | None, memory: str, configure: ConfigureSession | None
             ) -> ort.SessionOptions:
    so = session_options(provider, threads, memory)
    if configure is not None:
        configure(so)
    return so


def _cpu_session(path: Path | str, threads: int | None, memory: str,
                 configure: ConfigureSession | None = None) -> ort.InferenceSession:
    try:
        return _session(path, _options("cpu", threads, memory, configure), ["CPUExecutionProvider"])
    except Exception as e:  # a broken graph: name the file
        raise ProviderError(f"{Path(path).name}: cannot create a session on CPUExecutionProvider: {e}") from e


def create_session(path: Path | str, request: ProviderRequest, threads: int | None = None,
                   memory: str = "pattern", configure: ConfigureSession | None = None) -> ort.InferenceSession:
    """An InferenceSession on the requested provider; a fallback to CPU is reported (or raised if strict).
    `memory`: how it allocates on CPU (MEMORY_MODES); `configure`: see ConfigureSession."""
    if request.name == "cpu" or not check_available(request):
        return _cpu_session(path, threads, memory, configure)
    try:
        session = _session(path, _options(request.name, threads, "pattern", configure), request.providers())
    except Exception as e:  # the provider failed at session creation, or the graph is broken
        cpu = _cpu_session(path, threads, memory, configure)  # raises if the graph itself is the problem
        msg = fallback_message(path, request, cpu.get_providers(), e)
        if request.strict:
            raise ProviderError(msg) from e
        log.warning(msg)
        return cpu
    if request.ort_name not in session.get_providers():  # left out without an error
        msg = fallback_message(path, request, session.get_providers())
        if request.strict:
            raise ProviderError(msg)
        log.warning(msg)
        return session
    if not request.strict:
        session.enable_fallback()  # a provider failure inside run() then retries on CPU (onnxruntime prints it)
    return session


def device_of(session: ort.InferenceSession, request: ProviderRequest) -> tuple[str, int]:
    """(device, id) for a session's IO-bound buffers: "cuda" or "cann" (onnxruntime's device names)
    when that provider really runs it, else "cpu"."""
    for name in ("cuda", "cann"):
        if PROVIDERS[name] in session.get_providers():
            return name, int(request.options.get("device_id", 0))
    return "cpu", 0


# onnxruntime's type strings -> numpy dtypes of the graph inputs the host fills.
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
          "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def input_types(session: ort.InferenceSession) -> dict[str, Any]:
    """Each graph input's numpy dtype, as the graph declares it (the manifest's signature)."""
    out = {}
    for i in session.get_inputs():
        if i.type not in _NUMPY:
            raise ProviderError(f"input {i.name!r} is {i.type}, which the host cannot fill; "
                                "re-export the package (only the AR cache may be bfloat16)")
        out[i.name] = _NUMPY[i.type]
    return out


def check_target(package: Any, request: ProviderRequest) -> None:
    """One line when a package is opened on a provider it was not built for (an error if strict)."""
    from glm_image_onnx.targets import TARGETS, mismatch

    target = package.manifest.target
    if target.name == request.name:
        return
    msg = f"{package.root}: {mismatch(target, request.name, request.ort_name, package.root)}"
    if request.strict or target.name not in TARGETS:
        raise ProviderError(msg)
    log.warning(msg)


def parse_options(pairs: list[str] | None, flag: str = "--provider-option") -> dict[str, str]:
    """Command-line KEY=VALUE pairs -> a provider options dict (values stay strings, as onnxruntime takes them)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} must be KEY=VALUE, got {pair!r}")
        options[key] = value
    return options
