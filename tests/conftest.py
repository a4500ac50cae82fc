"""Shared fixtures: tiny random checkpoints of the real classes, built once per test session, and the
default real server on loopback, started once per test module that asks for it."""

from __future__ import annotations

import json

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

pytest_plugins = ("skip_policy",)  # no silent skips (tests/skip_policy.py)

if TYPE_CHECKING:
    from glm_image_onnx.server.app import ServerThread


@pytest.fixture(scope="session", autouse=True)
def _verification_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Package checksum cache (runtime.package) in a temporary folder, not the user's ~/.cache;
    subprocesses inherit it."""
    import os

    before = os.environ.get("GLM_IMAGE_ONNX_CACHE")
    os.environ["GLM_IMAGE_ONNX_CACHE"] = str(tmp_path_factory.mktemp("verify-cache"))
    yield
    if before is None:
        os.environ.pop("GLM_IMAGE_ONNX_CACHE", None)
    else:
        os.environ["GLM_IMAGE_ONNX_CACHE"] = before


def build_checkpoint(preset: Any, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A random checkpoint of `preset` (seed 0) in a fresh temporary folder."""
    from glm_image_onnx.models.checkpoint import write_checkpoint

    return write_checkpoint(preset, tmp_path_factory.mktemp("ckpt") / name, seed=0)


def build_package(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, name: str, **options: Any) -> Path:
    """`checkpoint` exported (ExportOptions(**options)) into a fresh temporary folder.

    With GLM_IMAGE_ONNX_TEST_PACKAGE_CACHE=DIR (scripts/mutation_check.py sets it: many short pytest
    runs of one unchanged exporter) a package is exported once into DIR, keyed by `name` and the
    options (the test checkpoints are seeded, so the name stands for the checkpoint), and reused."""
    import hashlib
    import os
    import shutil

    from glm_image_onnx.export.package import ExportOptions, export_package

    out = tmp_path_factory.mktemp("pkg") / name
    cache = os.environ.get("GLM_IMAGE_ONNX_TEST_PACKAGE_CACHE")
    key = hashlib.sha256(repr(sorted(options.items())).encode()).hexdigest()[:12]
    cached = Path(cache, f"{name}-{key}") if cache else None
    if cached is not None and cached.exists():
        return cached
    export_package(checkpoint, out, ExportOptions(**options), log=lambda _: None)
    if cached is not None:
        partial = Path(f"{cached}.{os.getpid()}.partial")
        shutil.copytree(out, partial)
        try:
            os.replace(partial, cached)
        except OSError:  # another pytest process cached it first
            shutil.rmtree(partial, ignore_errors=True)
    return out


def measured_errors(spec: Any, path: Path, seed: int = 0) -> dict[str, float]:
    """graph.verify's worst error per output, measured in the test without graph.compare: the graph
    run by graph.run_onnx on verify's cases against the module called directly; max |ref - got| /
    max |ref| for floats, the share of differing values for integers."""
    import numpy as np
    import torch

    from glm_image_onnx.export import graph

    cases = spec.verify_inputs(torch.Generator().manual_seed(seed))
    worst: dict[str, float] = {}
    for inputs, got in zip(cases, graph.run_onnx(spec, path, cases), strict=True):
        with torch.no_grad():
            ref = spec.module(*inputs.values())
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        assert len(ref) == len(got) == len(spec.output_names), spec.name
        for name, r, g in zip(spec.output_names, ref, got):
            r, g = r.numpy(), np.asarray(g)
            assert r.shape == g.shape, name
            if r.dtype.kind in "iub":
                err = float(np.mean(r != g))
            else:
                r64, g64 = r.astype(np.float64), g.astype(np.float64)
                err = float(np.abs(r64 - g64).max() / np.abs(r64).max())
            worst[name] = max(worst.get(name, 0.0), err)
    return worst


def assert_verify_numbers(spec: Any, path: Path, result: dict[str, Any]) -> None:
    """graph.verify's `result` covers every output, with the errors measured here, within its bound."""
    import pytest

    from glm_image_onnx.export import graph

    mine = measured_errors(spec, path)
    assert set(result["outputs"]) == set(mine) == set(spec.output_names), (spec.name, result["outputs"])
    assert max(mine.values()) < graph.MAX_RELATIVE_ERROR, (spec.name, mine)
    for name, value in mine.items():
        assert result["outputs"][name]["max_rel"] == pytest.approx(value, rel=1e-3, abs=1e-9), (spec.name, name)


def manifest_of(package: Path) -> dict[str, Any]:
    """A package's manifest.json as written, after the schema has read it strictly (no key without a reader)."""
    from glm_image_onnx.manifest import MANIFEST, Manifest

    data = json.loads((Path(package) / MANIFEST).read_text())
    Manifest.from_dict(data, strict=True)
    return data


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from glm_image_onnx.models.presets import TINY

    return build_checkpoint(TINY, tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with --verify (every graph)."""
    return build_package(tiny_checkpoint, tmp_path_factory, "tiny-onnx", verify=True)


def greedy_reference(checkpoint: Path) -> Any:
    """diffusers' GlmImagePipeline on `checkpoint`, greedy (top_k 1: the pipeline always samples),
    recording each generation's new AR tokens in `pipe.generated`."""
    import torch
    from diffusers import GlmImagePipeline

    pipe = GlmImagePipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    pipe.vision_language_encoder.generation_config.top_k = 1
    generated: list[torch.Tensor] = []
    original = pipe.vision_language_encoder.generate

    def recording_generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        generated.append(out[0, kwargs["input_ids"].shape[1]:].clone())
        return out

    pipe.vision_language_encoder.generate = recording_generate
    pipe.generated = generated
    return pipe


def export_target(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, target: str,
                  dtypes: tuple[str, ...]) -> dict[str, Path]:
    """`checkpoint` exported for `target` in each of `dtypes`, with --verify: dtype -> package."""
    return {dtype: build_package(checkpoint, tmp_path_factory, f"tiny-{target}-{dtype}", verify=True, target=target,
                                 dtype=dtype) for dtype in dtypes}


@pytest.fixture(scope="session")
def cann_packages(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint exported for the cann target in both dtypes, with --verify."""
    return export_target(tiny_checkpoint, tmp_path_factory, "cann", ("fp32", "fp16"))


@pytest.fixture(scope="module")
def server(tiny_package: Path) -> Iterator[ServerThread]:
    """The real server on a free loopback port serving the tiny package, default config, one per module.

    Modules that need other settings (limits, concurrency, TLS) define their own `server`, which
    overrides this one. Imported lazily: _server_helpers skips when the serve extra is missing.
    """
    from _server_helpers import start_server

    srv = start_server(tiny_package)
    yield srv
    srv.stop()
