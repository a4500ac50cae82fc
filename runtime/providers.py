"""Execution providers: CPU, CUDA and CANN, with their options, and honest fallback reporting.

onnxruntime silently runs on CPU when a provider cannot start (missing CUDA or Ascend libraries).
We compare what the session actually uses with what was asked for: a warning by default, an error
naming the provider and the reason with `strict=True`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
INSTALL_HINT = {
    "cuda": "install onnxruntime-gpu (instead of onnxruntime) and the CUDA 12 + cuDNN 9 libraries",
    "cann": "install onnxruntime-cann (instead of onnxruntime; it needs numpy<2) and the Ascend CANN toolkit, "
            "then source its set_env.sh",
}


# A library each provider's plugin loads first: failing to open it is the usual reason for a fallback.
DEVICE_LIBRARIES = {"cuda": ("libcudart.so.12", "libcublas.so.12", "libcudnn.so.9"), "cann": ("libascendcl.so",)}


def missing_library(provider: str) -> str | None:
    """The loader's error for the first device library that cannot be opened, if any."""
    import ctypes

    for lib in DEVICE_LIBRARIES.get(provider, ()):
        try:
            ctypes.CDLL(lib)
        except OSError as e:
            return str(e)
    return None


class ProviderError(RuntimeError):
    """A requested execution provider is not usable and strict mode was asked for."""


@dataclass
class ProviderRequest:
    """What the user asked for; `resolve()` turns it into onnxruntime's providers list."""

    name: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    strict: bool = False

    def __post_init__(self) -> None:
        self.name = self.name.lower()
        if self.name not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {self.name!r}")
        unknown = sorted(set(self.options) - PROVIDER_OPTIONS[self.name])
        if unknown:
            allowed = ", ".join(sorted(PROVIDER_OPTIONS[self.name])) or "none"
            raise ValueError(f"unknown {self.name} provider option {unknown[0]!r} (allowed: {allowed})")

    @property
    def ort_name(self) -> str:
        return PROVIDERS[self.name]

    def providers(self) -> list[Any]:
        """onnxruntime's providers argument: the requested one first, CPU as the fallback."""
        if self.name == "cpu":
            return ["CPUExecutionProvider"]
        opts = {k: str(v) for k, v in self.options.items()}  # onnxruntime takes string values
        return [(self.ort_name, opts), "CPUExecutionProvider"]


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


def session_options(provider: str, threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if provider == "cpu":
        # One op at a time on all cores: these graphs are chains of large MatMuls.
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or int(os.environ.get("GLM_IMAGE_ONNX_THREADS", 0)) or 0
        so.inter_op_num_threads = 1
    return so


def create_session(path: Path | str, request: ProviderRequest, threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on the requested provider; a silent fallback to CPU is reported."""
    use_requested = request.name == "cpu" or check_available(request)
    providers = request.providers() if use_requested else ["CPUExecutionProvider"]
    so = session_options(request.name if use_requested else "cpu", threads)
    try:
        session = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # a provider that fails hard at session creation
        if request.strict or not use_requested or request.name == "cpu":
            raise ProviderError(f"{Path(path).name}: cannot create a session on {request.ort_name}: {e}") from e
        log.warning("%s: %s failed (%s); running on CPU", Path(path).name, request.ort_name, e)
        return ort.InferenceSession(str(path), session_options("cpu", threads), providers=["CPUExecutionProvider"])
    if use_requested and request.name != "cpu" and request.ort_name not in session.get_providers():
        reason = missing_library(request.name) or "see onnxruntime's error above"
        msg = (f"{Path(path).name}: {request.ort_name} was requested with options {request.options or '{}'} "
               f"but the session fell back to {', '.join(session.get_providers())}: the provider is built in "
               f"but could not start ({reason}); {INSTALL_HINT[request.name]}")
        if request.strict:
            raise ProviderError(msg)
        log.warning(msg)
    return session
