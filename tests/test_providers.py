"""Execution providers under plain onnxruntime (CPU only): requests, validation, strict errors, fallback.

CUDA and CANN are not built into the `onnxruntime` wheel, so here a request for them is the
"provider not built in" case: a strict request raises `ProviderError`, a non-strict one warns and
runs on CPU. The built-in-but-cannot-start case (onnxruntime-cann / onnxruntime-gpu without their
device libraries) is tests/test_providers_accelerated.py, run by scripts/test_providers.sh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from glm_image_onnx.runtime import GlmImageOnnxPipeline, ProviderError, ProviderRequest
from glm_image_onnx.runtime import providers as P

LOGGER = "glm_image_onnx.runtime"


@pytest.fixture(scope="module")
def graph(tiny_package: Path) -> Path:
    return tiny_package / "vae_decoder.onnx"


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every InferenceSession the runtime creates: the providers argument onnxruntime received."""
    calls: list[dict[str, Any]] = []
    real = ort.InferenceSession

    def recording(path: Any, sess_options: Any = None, providers: Any = None, **kwargs: Any) -> Any:
        calls.append({"path": str(path), "providers": providers, "kwargs": kwargs})
        return real(path, sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(P.ort, "InferenceSession", recording)
    return calls


def _plain_onnxruntime() -> None:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available or "CANNExecutionProvider" in available:
        pytest.skip(f"this onnxruntime build has accelerated providers ({available}); these tests are "
                    "for the plain onnxruntime wheel")


# ------------------------------------------------------------------------------------------- CPU
def test_cpu_session_runs(graph: Path, spy: list[dict[str, Any]]) -> None:
    session = P.create_session(graph, ProviderRequest("cpu"))
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert spy[0]["providers"] == ["CPUExecutionProvider"]
    assert spy[0]["kwargs"].get("enable_fallback") == 0  # onnxruntime's own silent fallback is off
    options = session.get_session_options()  # "pattern" (providers.MEMORY_MODES)
    assert not options.enable_mem_reuse and not options.enable_cpu_mem_arena and options.enable_mem_pattern
    inp = session.get_inputs()[0]  # latents [batch, C, h, w]
    out = session.run(None, {inp.name: np.zeros((1, inp.shape[1], 4, 4), np.float32)})[0]
    assert out.shape[:2] == (1, 3) and np.isfinite(out).all()


def test_cpu_is_the_default_and_case_insensitive() -> None:
    assert ProviderRequest().name == "cpu" and ProviderRequest().providers() == ["CPUExecutionProvider"]
    assert ProviderRequest("CANN").name == "cann"
    assert ProviderRequest("Cuda").ort_name == "CUDAExecutionProvider"


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", ["tensorrt", "gpu", "", "npu"])
def test_unknown_provider_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError, match=rf"provider must be one of cpu, cuda, cann, got {name!r}"):
        ProviderRequest(name)


@pytest.mark.parametrize("name, key", [("cann", "gpu_mem_limit"), ("cuda", "npu_mem_limit"),
                                       ("cann", "device"), ("cpu", "device_id"), ("cuda", "precision_mode")])
def test_unknown_option_key_is_a_value_error_naming_it(name: str, key: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown {name} provider option '{key}' \(allowed: "):
        ProviderRequest(name, {"device_id": 0, key: "1"} if key != "device_id" else {key: 0})


def test_pipeline_rejects_bad_requests_before_loading(tiny_package: Path) -> None:
    with pytest.raises(ValueError, match="got 'rocm'"):
        GlmImageOnnxPipeline.from_package(tiny_package, provider="rocm")
    with pytest.raises(ValueError, match="unknown cann provider option 'npu_memory'"):
        GlmImageOnnxPipeline.from_package(tiny_package, provider="cann", provider_options={"npu_memory": 1})


def test_every_documented_option_is_accepted() -> None:
    for name, keys in P.PROVIDER_OPTIONS.items():
        ProviderRequest(name, {k: "1" for k in keys})
    assert {"device_id", "npu_mem_limit", "arena_extend_strategy", "enable_cann_graph", "precision_mode",
            "op_select_impl_mode", "optypelist_for_implmode", "dump_graphs", "dump_om_model"} == P.PROVIDER_OPTIONS["cann"]


def test_cann_gets_graph_mode_origin_dtypes_and_no_model_dumps_unless_told() -> None:
    assert ProviderRequest("cann").ort_options() == {"enable_cann_graph": "1", "precision_mode": "must_keep_origin_dtype",
                                                     "dump_om_model": "0"}
    assert ProviderRequest("cann", {"dump_om_model": True}).ort_options()["dump_om_model"] == "1"
    assert ProviderRequest("cuda").ort_options() == {}


def test_release_names_only_the_arenas_a_session_has(graph: Path) -> None:
    key = "memory.enable_memory_arena_shrinkage"
    plain, arena = (P.create_session(graph, ProviderRequest("cpu"), memory=m) for m in ("exact", "arena"))
    assert not plain.get_session_options().enable_cpu_mem_arena and not plain.get_session_options().enable_mem_pattern
    assert P.release_arena(plain, "cpu") is None  # onnxruntime rejects a run naming a missing arena
    assert P.release_arena(arena, "cuda", 1).get_run_config_entry(key) == "cpu:0;gpu:1"
    assert P.release_arena(arena, "cann", 1).get_run_config_entry(key) == "cpu:0"  # cpu and gpu only
    inp = arena.get_inputs()[0]
    arena.run(None, {inp.name: np.zeros((1, inp.shape[1], 4, 4), np.float32)}, P.release_arena(arena, "cpu"))


def test_pipeline_sessions_allocate_as_their_graph_needs(tiny_package: Path) -> None:
    pipe = GlmImageOnnxPipeline.from_package(tiny_package, verify_files="off")
    options = {g: s.get_session_options() for g, s in pipe.sessions.items()}
    assert all(not o.enable_mem_reuse for o in options.values())
    assert options["vae_decoder"].enable_cpu_mem_arena and options["vae_decoder"].enable_mem_pattern
    assert not options["dit_decoder"].enable_cpu_mem_arena and not options["dit_decoder"].enable_mem_pattern
    assert not options["ar_planner"].enable_cpu_mem_arena and options["ar_planner"].enable_mem_pattern


def test_options_are_passed_as_strings() -> None:
    request = ProviderRequest("cann", {"device_id": 1, "npu_mem_limit": 2 << 30, "enable_cann_graph": True,
                                       "dump_graphs": False, "precision_mode": "force_fp16",
                                       "arena_extend_strategy": "kSameAsRequested"})
    assert request.providers() == [
        ("CANNExecutionProvider", {"device_id": "1", "npu_mem_limit": str(2 << 30), "enable_cann_graph": "1",
                                   "dump_graphs": "0", "precision_mode": "force_fp16",
                                   "arena_extend_strategy": "kSameAsRequested", "dump_om_model": "0"}),
        "CPUExecutionProvider",
    ]
    cuda = ProviderRequest("cuda", {"device_id": 0, "gpu_mem_limit": 1.5e9}).providers()
    assert cuda == [("CUDAExecutionProvider", {"device_id": "0", "gpu_mem_limit": "1500000000.0"}),
                    "CPUExecutionProvider"]


# ------------------------------------------------------------------ providers not built in here
@pytest.mark.parametrize("name, package", [("cuda", "onnxruntime-gpu"), ("cann", "onnxruntime-cann")])
def test_strict_request_for_a_missing_provider_raises(graph: Path, name: str, package: str) -> None:
    _plain_onnxruntime()
    with pytest.raises(ProviderError) as err:
        P.create_session(graph, ProviderRequest(name, {"device_id": 0}, strict=True))
    msg = str(err.value)
    assert P.PROVIDERS[name] in msg and "not available in this onnxruntime build" in msg
    assert ort.__version__ in msg and "CPUExecutionProvider" in msg  # what this build has
    assert f"install {package} (instead of onnxruntime" in msg  # how to get it


@pytest.mark.parametrize("name", ["cuda", "cann"])
def test_non_strict_request_warns_and_runs_on_cpu(graph: Path, name: str, spy: list[dict[str, Any]],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    _plain_onnxruntime()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        session = P.create_session(graph, ProviderRequest(name, {"device_id": 0}))
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert spy[-1]["providers"] == ["CPUExecutionProvider"]  # not asked for what cannot exist
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert P.PROVIDERS[name] in warnings[0] and "running on CPU" in warnings[0]
    assert P.INSTALL_HINT[name] in warnings[0]


def test_strict_pipeline_fails_before_generating(tiny_package: Path) -> None:
    _plain_onnxruntime()
    with pytest.raises(ProviderError, match="CANNExecutionProvider is not available.*onnxruntime-cann"):
        GlmImageOnnxPipeline.from_package(tiny_package, provider="cann", strict=True)


def test_non_strict_pipeline_generates_on_cpu(tiny_package: Path, caplog: pytest.LogCaptureFixture) -> None:
    _plain_onnxruntime()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pipe = GlmImageOnnxPipeline.from_package(tiny_package, provider="cuda",
                                                 provider_options={"device_id": 0, "gpu_mem_limit": 1 << 30})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("CUDAExecutionProvider is not available" in w for w in warnings)
    assert pipe.providers == ["CPUExecutionProvider"]
    assert all(s.get_providers() == ["CPUExecutionProvider"] for s in pipe.sessions.values())
    out = pipe("a sign that says 'hi'", height=64, width=32, num_inference_steps=2, seed=0)
    assert out.images[0].size == (32, 64)
    # The fallback is the CPU pipeline: the same image as asking for CPU.
    cpu = GlmImageOnnxPipeline.from_package(tiny_package)("a sign that says 'hi'", height=64, width=32,
                                                          num_inference_steps=2, seed=0)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(cpu.images[0]))


# ------------------------------------------------------------------- the fallback report itself
def test_fallback_message_names_provider_options_and_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """The message a built-in-but-failing provider produces (exercised for real in the accelerated venvs)."""
    monkeypatch.setattr(P, "missing_library",
                        lambda name: "libonnxruntime_providers_cann.so needs libascendcl.so: cannot open shared "
                                     "object file: No such file or directory")
    error = RuntimeError("/root/onnxruntime/python/onnxruntime_pybind_state.cc:1189 std::shared_ptr<onnxruntime::"
                         "IExecutionProviderFactory> onnxruntime::python::CreateExecutionProviderFactoryInstance("
                         "const onnxruntime::SessionOptions&, const std::string&) create CANN ExecutionProvider fail")
    request = ProviderRequest("cann", {"device_id": 3, "precision_mode": "force_fp16"})
    msg = P.fallback_message("/pkg/dit_decoder.onnx", request, ["CPUExecutionProvider"], error)
    assert msg.startswith("dit_decoder.onnx: CANNExecutionProvider was requested with options "
                          "{'enable_cann_graph': '1', 'precision_mode': 'force_fp16', 'dump_om_model': '0', "
                          "'device_id': '3'} but could not start: "
                          "onnxruntime: create CANN ExecutionProvider fail; libonnxruntime_providers_cann.so "
                          "needs libascendcl.so")
    assert "Running on CPUExecutionProvider" in msg and "set_env.sh" in msg


def test_missing_library_reads_the_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason comes from the provider plugin's own DT_NEEDED list, probed like the loader would."""
    import shutil

    # A real ELF shared library from this onnxruntime, with one NEEDED entry renamed to a library
    # that does not exist (same length, so the string table stays valid).
    capi = Path(ort.__file__).parent / "capi"
    source = next(capi.glob("libonnxruntime_providers_shared.so*"), None)
    if source is None:
        pytest.skip("no ELF provider library in this onnxruntime build")
    needed, _ = P._elf_dynamic(source)
    target = next((n for n in needed if n.startswith("libc.so")), needed[0] if needed else None)
    if target is None:
        pytest.skip(f"{source.name} has no DT_NEEDED entries")
    fake = "libzz" + "q" * (len(target) - len("libzz"))
    data = source.read_bytes().replace(target.encode() + b"\0", fake.encode() + b"\0", 1)
    fake_capi = tmp_path / "onnxruntime" / "capi"
    fake_capi.mkdir(parents=True)
    (fake_capi / "libonnxruntime_providers_cann.so").write_bytes(data)
    shutil.copy(Path(ort.__file__), tmp_path / "onnxruntime" / "__init__.py")
    monkeypatch.setattr(P.ort, "__file__", str(tmp_path / "onnxruntime" / "__init__.py"))
    assert fake in P._elf_dynamic(fake_capi / "libonnxruntime_providers_cann.so")[0]
    reason = P.missing_library("cann")
    assert reason is not None and reason.startswith(f"libonnxruntime_providers_cann.so needs {fake}")
