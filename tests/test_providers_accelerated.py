"""Execution providers for real: onnxruntime-cann / onnxruntime-gpu, each in its own virtual environment.

`bash scripts/test_providers.sh` builds .venv-cann (onnxruntime-cann, numpy<2) and .venv-cuda
(onnxruntime-gpu), installs the runtime there without torch, exports a tiny package with .venv and
runs this file in each with GLM_IMAGE_ONNX_EXPECT_EP=cann|cuda and GLM_IMAGE_ONNX_TEST_PACKAGE=<package>.
Without GLM_IMAGE_ONNX_EXPECT_EP every test here is skipped.

On a machine without the device libraries (CI) the provider is built in but cannot start: the
runtime must ask onnxruntime for it with the given options, notice that the session fell back to
CPU, say so (provider, options, the library that is missing), raise `ProviderError` when strict, and
still generate images. With GLM_IMAGE_ONNX_EXPECT_DEVICE=1 (a machine with the NPU / GPU) the
sessions must run on the provider instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

EP = os.environ.get("GLM_IMAGE_ONNX_EXPECT_EP", "").lower()
DEVICE = os.environ.get("GLM_IMAGE_ONNX_EXPECT_DEVICE") == "1"
pytestmark = pytest.mark.skipif(
    not EP, reason="accelerated-provider tests: run `bash scripts/test_providers.sh` (it builds .venv-cann / "
                   ".venv-cuda with onnxruntime-cann / onnxruntime-gpu and sets GLM_IMAGE_ONNX_EXPECT_EP=cann|cuda "
                   "and GLM_IMAGE_ONNX_TEST_PACKAGE)")

import onnxruntime as ort  # noqa: E402

from glm_image_onnx.runtime import GlmImageOnnxPipeline, ProviderError, ProviderRequest  # noqa: E402
from glm_image_onnx.runtime import providers as P  # noqa: E402

LOGGER = "glm_image_onnx.runtime"
# Per provider: the wheel, the options we ask for (every kind of value), and what the fallback
# reason must name when the device libraries are absent.
SPEC: dict[str, dict[str, Any]] = {
    "cann": {
        "distribution": "onnxruntime-cann",
        "options": {"device_id": 0, "npu_mem_limit": 2 << 30, "arena_extend_strategy": "kSameAsRequested",
                    "enable_cann_graph": True, "precision_mode": "force_fp16",
                    "op_select_impl_mode": "high_performance", "optypelist_for_implmode": "Gelu",
                    "dump_graphs": False, "dump_om_model": False},
        "reason": "libonnxruntime_providers_cann.so needs libascendcl.so",
        "other": "cuda",
    },
    "cuda": {
        "distribution": "onnxruntime-gpu",
        "options": {"device_id": 0, "gpu_mem_limit": 2 << 30, "arena_extend_strategy": "kSameAsRequested",
                    "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True,
                    "enable_cuda_graph": False, "use_tf32": False},
        "reason": "libonnxruntime_providers_cuda.so needs lib",
        "other": "cann",
    },
}
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-cann", "onnxruntime-openvino",
                     "onnxruntime-directml", "onnxruntime-qnn", "onnxruntime-training")
fallback_only = pytest.mark.skipif(DEVICE, reason="GLM_IMAGE_ONNX_EXPECT_DEVICE=1: the provider must start here")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    if EP not in SPEC:
        pytest.fail(f"GLM_IMAGE_ONNX_EXPECT_EP must be one of {', '.join(SPEC)}, got {EP!r}")
    return SPEC[EP]


@pytest.fixture(scope="module")
def package() -> Path:
    value = os.environ.get("GLM_IMAGE_ONNX_TEST_PACKAGE")
    if not value or not (Path(value) / "manifest.json").is_file():
        pytest.fail(f"GLM_IMAGE_ONNX_TEST_PACKAGE must name an exported package (got {value!r}); "
                    "scripts/test_providers.sh builds one with .venv")
    return Path(value)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every InferenceSession the runtime creates: what onnxruntime received, and what it returned."""
    calls: list[dict[str, Any]] = []
    real = ort.InferenceSession

    def recording(path: Any, sess_options: Any = None, providers: Any = None, **kwargs: Any) -> Any:
        call = {"path": Path(path).name, "providers": providers, "kwargs": kwargs}
        calls.append(call)
        session = real(path, sess_options, providers=providers, **kwargs)
        call["got"] = session.get_providers()
        return session

    monkeypatch.setattr(P.ort, "InferenceSession", recording)
    return calls


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]


# ----------------------------------------------------------------------------------- environment
def test_environment_has_one_onnxruntime_and_no_torch(spec: dict[str, Any]) -> None:
    installed = []
    for name in ORT_DISTRIBUTIONS:
        try:
            installed.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            pass
    assert [n for n, _ in installed] == [spec["distribution"]], \
        f"exactly one onnxruntime distribution must be installed (they share the import name): {installed}"
    assert dict(installed)[spec["distribution"]] == ort.__version__
    assert importlib.util.find_spec("torch") is None, "the runtime environment must not need torch"
    if EP == "cann":
        assert int(np.__version__.split(".")[0]) < 2, f"onnxruntime-cann needs numpy<2, got {np.__version__}"
    print(f"\n{spec['distribution']} {ort.__version__}, numpy {np.__version__}, "
          f"providers {ort.get_available_providers()}")


def test_provider_is_built_in(spec: dict[str, Any]) -> None:
    assert P.PROVIDERS[EP] in ort.get_available_providers()
    assert P.provider_library(EP).is_file()


def test_every_graph_loads_in_this_onnxruntime(package: Path) -> None:
    """The exporter's IR version / opset must be accepted by this (possibly older) onnxruntime."""
    import json

    manifest = json.loads((package / "manifest.json").read_text())
    failures = []
    for name, graph in manifest["graphs"].items():
        try:
            ort.InferenceSession(str(package / graph["file"]), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - collect them all
            failures.append(f"{name} (opset {manifest.get('opset')}): {e}")
    assert not failures, f"onnxruntime {ort.__version__} rejects: " + "; ".join(failures)


# ------------------------------------------------------------------------ request and fallback
def test_runtime_asks_for_the_provider_with_its_options(package: Path, spec: dict[str, Any],
                                                         spy: list[dict[str, Any]],
                                                         caplog: pytest.LogCaptureFixture,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    request = ProviderRequest(EP, spec["options"])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        session = P.create_session(package / "vae_decoder.onnx", request)
    expected = {k: ("1" if v is True else "0" if v is False else str(v)) for k, v in spec["options"].items()}
    first = spy[0]
    assert first["providers"] == [(P.PROVIDERS[EP], expected), "CPUExecutionProvider"]
    assert all(isinstance(v, str) for v in first["providers"][0][1].values())
    assert first["kwargs"].get("enable_fallback") == 0  # onnxruntime must not fall back behind our back
    out = capfd.readouterr().out
    assert "EP Error" not in out, f"onnxruntime's own fallback printed: {out}"
    if DEVICE:
        assert session.get_providers()[0] == P.PROVIDERS[EP] and not _warnings(caplog)
        return
    assert session.get_providers() == ["CPUExecutionProvider"]
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    msg = warnings[0]
    print(f"\nwarning: {msg}")
    assert msg.startswith(f"vae_decoder.onnx: {P.PROVIDERS[EP]} was requested with options ")
    for key, value in expected.items():
        assert f"'{key}': '{value}'" in msg
    assert spec["reason"] in msg and "cannot open shared object file" in msg
    assert "Running on CPUExecutionProvider" in msg and P.INSTALL_HINT[EP] in msg


@fallback_only
def test_strict_request_raises(package: Path, spec: dict[str, Any]) -> None:
    with pytest.raises(ProviderError) as err:
        P.create_session(package / "dit_decoder.onnx", ProviderRequest(EP, {"device_id": 0}, strict=True))
    msg = str(err.value)
    print(f"\nProviderError: {msg}")
    sent = ProviderRequest(EP, {"device_id": 0}).ort_options()  # with the runtime's defaults (cann)
    assert msg.startswith(f"dit_decoder.onnx: {P.PROVIDERS[EP]} was requested with options {sent}")
    assert spec["reason"] in msg and P.INSTALL_HINT[EP] in msg and "strict: not falling back to CPU" in msg


def test_the_other_accelerator_is_not_built_in(package: Path, spec: dict[str, Any]) -> None:
    other = spec["other"]
    with pytest.raises(ProviderError, match=f"{P.PROVIDERS[other]} is not available in this onnxruntime build "
                                            rf"\({ort.__version__}"):
        P.create_session(package / "vae_decoder.onnx", ProviderRequest(other, strict=True))


def test_cpu_request_stays_on_cpu(package: Path, spy: list[dict[str, Any]]) -> None:
    session = P.create_session(package / "vae_decoder.onnx", ProviderRequest("cpu"))
    assert spy[0]["providers"] == ["CPUExecutionProvider"] and session.get_providers() == ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------ whole pipeline
@pytest.fixture(scope="module")
def cpu_pipe(package: Path) -> GlmImageOnnxPipeline:
    return GlmImageOnnxPipeline.from_package(package)


def test_pipeline_on_the_provider_generates(package: Path, spec: dict[str, Any], cpu_pipe: GlmImageOnnxPipeline,
                                            spy: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pipe = GlmImageOnnxPipeline.from_package(package, provider=EP, provider_options=spec["options"])
    asked = [c for c in spy if c["providers"][0] != "CPUExecutionProvider"]
    assert {c["path"] for c in asked} == {pipe.package.graph_path(g).name for g in pipe.sessions}
    if DEVICE:
        assert pipe.providers[0] == P.PROVIDERS[EP]
    else:
        assert pipe.providers == ["CPUExecutionProvider"]
        warnings = _warnings(caplog)
        assert len(warnings) == len(pipe.sessions)  # one per graph, each naming its file
        assert {w.split(":")[0] for w in warnings} == {c["path"] for c in asked}
    kwargs = dict(height=64, width=96, num_inference_steps=2, seed=7)
    prompt = 'a shop sign that says "OPEN"'
    out = pipe(prompt, **kwargs)
    assert out.images[0].size == (96, 64) and out.tokens.max() < pipe.codebook_size
    ref = cpu_pipe(prompt, **kwargs)
    assert np.array_equal(out.tokens, ref.tokens)
    if DEVICE:
        diff = np.abs(np.asarray(out.images[0], np.int16) - np.asarray(ref.images[0], np.int16)).max()
        assert diff <= 8, f"{EP} image differs from CPU by {diff} levels"
    else:  # the fallback is the CPU pipeline: bit-identical
        assert np.array_equal(np.asarray(out.images[0]), np.asarray(ref.images[0]))
    if pipe.supports_image_to_image:
        edit = pipe("make it 'blue'", image=ref.images[0], height=64, width=64, num_inference_steps=2, seed=1)
        assert edit.images[0].size == (64, 64)
    print(f"\n{EP} pipeline ran on {pipe.providers}: {out.timings.total_s:.2f}s")


def test_the_providers_own_target_package_runs_and_checks_clean(cpu_pipe: GlmImageOnnxPipeline) -> None:
    """The package built for this provider (cann fp16 / cuda fp16, exported with .venv): the placement
    check finds no fallback here too (library and CLI), and it generates, on the device or, without
    one, on the CPU with the same result as a CPU session of the same package."""
    value = os.environ.get("GLM_IMAGE_ONNX_TEST_TARGET_PACKAGE")
    if not value or not (Path(value) / "manifest.json").is_file():
        pytest.fail(f"GLM_IMAGE_ONNX_TEST_TARGET_PACKAGE must name the {EP} package (got {value!r}); "
                    "scripts/test_providers.sh builds one")
    from glm_image_onnx.export.placement import check_package

    target = Path(value)
    reports = check_package(target, EP)
    assert reports and all(not r.problems for r in reports), [r.summary() for r in reports]
    cli = subprocess.run([sys.executable, "-m", "glm_image_onnx", "check", str(target), "--provider", EP],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "0 nodes fall back" in cli.stderr, cli.stdout + cli.stderr
    pipe = GlmImageOnnxPipeline.from_package(target, provider=EP)
    kwargs = dict(height=64, width=64, num_inference_steps=2, seed=3)
    out = pipe("a 'sign'", **kwargs)
    image = np.asarray(out.images[0])
    assert image.shape == (64, 64, 3) and image.std() > 0
    if not DEVICE:
        assert pipe.providers == ["CPUExecutionProvider"]
        on_cpu = GlmImageOnnxPipeline.from_package(target, provider="cpu")("a 'sign'", **kwargs)
        assert np.array_equal(out.tokens, on_cpu.tokens) and np.array_equal(image, np.asarray(on_cpu.images[0]))
    print(f"\n{target.name} ({EP} target) ran on {pipe.providers}, placement check clean")


def test_same_outputs_as_the_main_environment(cpu_pipe: GlmImageOnnxPipeline) -> None:
    """numpy<2 / another onnxruntime release must not change what the runtime computes."""
    path = os.environ.get("GLM_IMAGE_ONNX_TEST_REFERENCE")
    if not path:
        pytest.skip("GLM_IMAGE_ONNX_TEST_REFERENCE is not set (scripts/test_providers.sh writes it with .venv)")
    from provider_reference import generate

    ref = np.load(path)
    ours = generate(cpu_pipe)
    assert set(ours) == set(ref.files) - {"versions"}
    for key, value in ours.items():
        if key.endswith("_tokens"):
            assert np.array_equal(value, ref[key]), f"{key} differ from {ref['versions'][0]}"
        else:
            diff = int(np.abs(value.astype(np.int16) - ref[key].astype(np.int16)).max())
            assert value.shape == ref[key].shape and diff <= 1, f"{key} differs by {diff} levels from {ref['versions'][0]}"
    print(f"\nsame tokens and images (<= 1 level) as {ref['versions'][0]}; here onnxruntime {ort.__version__}, "
          f"numpy {np.__version__}")


@fallback_only
def test_strict_pipeline_raises_before_generating(package: Path) -> None:
    with pytest.raises(ProviderError, match=f"{P.PROVIDERS[EP]} was requested"):
        GlmImageOnnxPipeline.from_package(package, provider=EP, provider_options={"device_id": 0}, strict=True)


@fallback_only
def test_cli_generate_reports_the_fallback(package: Path, spec: dict[str, Any], tmp_path: Path) -> None:
    key = "precision_mode=force_fp16" if EP == "cann" else "use_tf32=0"
    base = [sys.executable, "-m", "glm_image_onnx", "generate", str(package), "--prompt", "a 'cat'",
            "--height", "32", "--width", "32", "--steps", "1", "--seed", "0", "--quiet", "--provider", EP,
            "--provider-option", "device_id=0", "--provider-option", key]
    ok = subprocess.run(base + ["--out", str(tmp_path / "a.png")], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "a.png").is_file()
    name, value = key.split("=")
    sent = ProviderRequest(EP, {"device_id": "0", name: value}).ort_options()
    assert f"{P.PROVIDERS[EP]} was requested with options {sent}" in ok.stderr
    assert spec["reason"] in ok.stderr and "on CPUExecutionProvider" in ok.stderr.splitlines()[-1]
    assert "EP Error" not in ok.stdout
    strict = subprocess.run(base + ["--strict", "--out", str(tmp_path / "b.png")], capture_output=True, text=True,
                            timeout=300)
    assert strict.returncode == 2 and not (tmp_path / "b.png").exists()
    errors = [line for line in strict.stderr.splitlines() if line.startswith("glm-image-onnx generate: error:")]
    assert len(errors) == 1 and P.PROVIDERS[EP] in errors[0] and spec["reason"] in errors[0], strict.stderr
    print(f"\nCLI --strict: {errors[0]}")
