"""`glm-image-onnx quantize`: each recipe turns the tiny package into a new, complete package that
the runtime loads and runs unchanged, with a quality report; a recipe below its thresholds writes
nothing. Small settings (64x64, 1 step, 1 prompt) keep every quantisation to a few seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from glm_image_onnx.manifest import to_json
from glm_image_onnx.quantize import QuantizeError, QuantizeOptions, Thresholds, quantize_package
from glm_image_onnx.quantize import graphs as G
from glm_image_onnx.quantize import quality as Q
from glm_image_onnx.quantize.capture import read_prompts
from glm_image_onnx.quantize.package import cache_names
from glm_image_onnx.runtime import GlmImageOnnxPipeline, Package

FAST = dict(height=64, width=64, steps=1, eval_prompts=1, calibration_limit=1)
RECIPES = ("int8-dynamic", "int8-static", "int4-weight", "fp16")


@pytest.fixture(scope="module")
def quantized(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each recipe applied once to the tiny package."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for recipe in RECIPES:
        out[recipe] = root / recipe
        quantize_package(tiny_package, out[recipe], QuantizeOptions(recipe=recipe, **FAST), log=lambda _: None)
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_writes_a_package_the_runtime_runs(quantized: dict[str, Path], tiny_package: Path,
                                                   recipe: str) -> None:
    path = quantized[recipe]
    package = Package.open(path, verify_files=True)  # every sha256 and size recomputed
    source = Package.open(tiny_package)
    q = package.manifest.quantization
    assert q["recipe"] == recipe and q["passed"] is True
    assert set(package.graphs) == set(source.graphs)
    assert set(package.manifest.files) == {p.relative_to(path).as_posix() for p in path.rglob("*")
                                              if p.is_file() and p.name != "manifest.json"}
    for name, graph in package.graphs.items():
        entry, src = to_json(graph), to_json(source.graphs[name])
        # The runtime's contract: same names and dtypes, except the AR cache, which is in the dtype
        # the manifest's kv_cache states (float16 after the fp16 recipe).
        cache = set(cache_names(graph))
        kv_dtype = entry["config"].get("kv_cache", {}).get("dtype")

        def expected(values: list) -> list:
            return [(v["name"], kv_dtype if v["name"] in cache else v["dtype"]) for v in values]

        for kind in ("inputs", "outputs"):
            assert [(v["name"], v["dtype"]) for v in entry[kind]] == expected(src[kind])
        sig = G.signature(path / entry["file"])
        assert [(v["name"], v["dtype"]) for v in sig["inputs"]] == expected(src["inputs"])
        if name in q["graphs"]:
            assert entry["quantization"]["recipe"] == recipe
            assert q["graphs"][name]["bytes_after"] == entry["bytes"]
        else:
            assert name in q["unchanged"]
    pipe = GlmImageOnnxPipeline.from_package(path)
    out = pipe("a red fox", height=64, width=64, num_inference_steps=2, seed=3)
    image = np.asarray(out.images[0])
    assert image.shape == (64, 64, 3) and image.std() > 0
    # The report: per-graph errors on fresh inputs, AR agreement, images vs fp32.
    report = q["report"]
    for name in q["graphs"]:
        assert report["graphs"][name]["cases"] > 0
        assert np.isfinite(report["graphs"][name]["rel_l2"])
    e2e = report["end_to_end"]
    assert e2e["fixed_tokens"]["psnr_db_min"] > 20 and e2e["free_running"]["images"] == 1
    if "ar_planner" in q["graphs"]:
        ar = report["ar_planner"]
        assert 0 <= ar["greedy_equal"] <= 1 and 0 <= ar["top1_agreement"] <= 1 and ar["tokens_per_prompt"] > 0
    assert "ar_planner" in report["table"] and "fixed tokens" in report["table"]


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_dynamic_quantises_every_large_weight(quantized: dict[str, Path]) -> None:
    q = json.loads((quantized["int8-dynamic"] / "manifest.json").read_text())["quantization"]
    for name in ("ar_planner", "dit_decoder", "dit_condition_write", "glyph_encoder"):
        info = q["graphs"][name]
        assert info["fp32_weight_share"] < 0.1, (name, info["largest_fp32_left"])
        assert info["settings"]["per_channel_choice"] == "auto"
        assert "DynamicQuantizeLinear" in _ops(quantized["int8-dynamic"] / f"{name}.onnx")
    # The DiT's Gemm (adaLN) weights are rewritten as MatMuls so that they are quantised too.
    assert q["graphs"]["dit_decoder"]["prepare"]["gemm_to_matmul"] > 0
    assert "Gemm" not in _ops(quantized["int8-dynamic"] / "dit_decoder.onnx")


def test_per_channel_is_chosen_only_where_it_clearly_helps(quantized: dict[str, Path]) -> None:
    from glm_image_onnx.quantize.package import choose_per_channel

    assert choose_per_channel(0.10, 0.05) and not choose_per_channel(0.10, 0.09)
    assert not choose_per_channel(0.10, 0.10) and not choose_per_channel(0.05, 0.10)
    q = json.loads((quantized["int8-dynamic"] / "manifest.json").read_text())["quantization"]
    for name, info in q["graphs"].items():  # the recorded choice follows the recorded errors
        errors = info["settings"]["calibration_rel_l2"]
        assert info["settings"]["per_channel"] == choose_per_channel(errors["per_tensor"], errors["per_channel"])


def test_int8_static_is_qdq_with_captured_calibration(quantized: dict[str, Path]) -> None:
    q = json.loads((quantized["int8-static"] / "manifest.json").read_text())["quantization"]
    for name in ("ar_planner", "dit_decoder", "glyph_encoder"):
        settings = q["graphs"][name]["settings"]
        assert settings["format"] == "QDQ" and settings["calibration_inputs"] > 0
        assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(quantized["int8-static"] / f"{name}.onnx")
    # the AR planner was calibrated on its prefill and on decode steps with a KV cache
    assert q["graphs"]["ar_planner"]["settings"]["calibration_inputs"] >= 3


def test_int4_weight_uses_matmulnbits(quantized: dict[str, Path]) -> None:
    q = json.loads((quantized["int4-weight"] / "manifest.json").read_text())["quantization"]
    assert set(q["graphs"]) == {"ar_planner", "dit_decoder", "dit_condition_write"}
    for name in q["graphs"]:
        assert q["graphs"][name]["settings"]["block_size"] == 32
        assert "MatMulNBits" in _ops(quantized["int4-weight"] / f"{name}.onnx")


def test_fp16_keeps_io_and_sensitive_ops_fp32(quantized: dict[str, Path], tiny_package: Path) -> None:
    path = quantized["fp16"]
    manifest = json.loads((path / "manifest.json").read_text())
    q = manifest["quantization"]
    assert manifest["target"] == {"name": "cuda", "dtype": "fp16"}
    assert manifest["graphs"]["ar_planner"]["config"]["kv_cache"]["dtype"] == "float16"
    assert set(q["graphs"]) == set(json.loads((tiny_package / "manifest.json").read_text())["graphs"])
    model = onnx.load(str(path / "ar_planner.onnx"))
    onnx.checker.check_model(model)
    # fp32 inputs, except the cache: float16 as the manifest says, bound in place by the runtime
    for i in model.graph.input:
        cache = i.name.startswith("past_key_values.")
        assert (i.type.tensor_type.elem_type == TensorProto.FLOAT16) == cache, i.name
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    infos = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Softmax", "Cos", "Sin", "ReduceMean"):
            dtype = infos.get(node.output[0])
            assert dtype in (None, TensorProto.FLOAT), node.name
            assert producers.get(node.input[0]) is None or dtype != TensorProto.FLOAT16
    rng = q["graphs"]["dit_decoder"]["settings"]["fp16_range"]
    assert {"overflow_values", "underflow_values", "max_abs_weight"} <= set(rng)


def test_threshold_failure_writes_nothing(tiny_package: Path, tmp_path: Path) -> None:
    out = tmp_path / "int4"
    with pytest.raises(QuantizeError, match="below the quality thresholds.*PSNR"):
        quantize_package(tiny_package, out, QuantizeOptions(
            recipe="int4-weight", graphs=("dit_decoder",), thresholds=Thresholds(min_psnr=99.0), **FAST),
            log=lambda _: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial or work folders either


def test_components_and_recipe_errors(tiny_package: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="unknown recipe"):
        quantize_package(tiny_package, tmp_path / "a", QuantizeOptions(recipe="int2"), log=lambda _: None)
    with pytest.raises(QuantizeError, match="unknown component 'unet'"):
        quantize_package(tiny_package, tmp_path / "a", QuantizeOptions(graphs=("unet",)), log=lambda _: None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep").write_text("x")
    with pytest.raises(QuantizeError, match="already exists"):
        quantize_package(tiny_package, tmp_path / "b", QuantizeOptions(**FAST), log=lambda _: None)
    assert (tmp_path / "b" / "keep").read_text() == "x"


def test_quantised_package_is_not_requantised(quantized: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="already quantised"):
        quantize_package(quantized["fp16"], tmp_path / "x", QuantizeOptions(**FAST), log=lambda _: None)


def test_cli_quantize(tiny_package: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    proc = subprocess.run([sys.executable, "-m", "glm_image_onnx", "quantize", str(tiny_package), str(out),
                           "--recipe", "int8-dynamic", "--components", "dit_decoder", "--per-channel", "on",
                           "--height", "64", "--width", "64", "--steps", "1", "--eval-prompts", "1",
                           "--min-psnr", "30"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "quantization recipe int8-dynamic" in proc.stderr and "dit_decoder" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert Package.open(out).manifest.quantization["thresholds"] == {"min_psnr": 30.0}
    bad = subprocess.run([sys.executable, "-m", "glm_image_onnx", "quantize", str(tiny_package), str(out),
                          "--recipe", "int8-dynamic"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "already exists" in bad.stderr and "Traceback" not in bad.stderr


def test_server_serves_a_quantised_package(quantized: dict[str, Path]) -> None:
    """The real gRPC server loads the int8 package unchanged; the stock tritonclient gets the same
    image as the in-process runtime on that package, and the model configs name the recipe."""
    from _server_helpers import glm_inputs, start_server, tritonclient_grpc as grpcclient

    path = quantized["int8-dynamic"]
    server = start_server(path)
    try:
        with grpcclient.InferenceServerClient(server.url) as client:
            result = client.infer("glm_image", glm_inputs(prompt='a sign that says "hi"', height=64, width=64,
                                                          steps=2, seed=11))
            glm = client.get_model_config("glm_image").config
            dit = client.get_model_config("dit_decoder").config
            vae = client.get_model_config("vae_decoder").config
    finally:
        server.stop()
    expected = GlmImageOnnxPipeline.from_package(path)('a sign that says "hi"', height=64, width=64,
                                                       num_inference_steps=2, seed=11)
    np.testing.assert_array_equal(result.as_numpy("image"), np.asarray(expected.images[0]))
    np.testing.assert_array_equal(result.as_numpy("tokens"), expected.tokens)
    assert glm.parameters["quantization"].string_value == "int8-dynamic"
    assert dit.parameters["quantization"].string_value == "int8-dynamic"
    assert vae.parameters["quantization"].string_value == "none"  # not in the recipe's graphs


def test_quantize_needs_no_torch() -> None:
    code = ("import sys; import glm_image_onnx.quantize.package, glm_image_onnx.quantize.capture; "
            "import onnxruntime.quantization.matmul_nbits_quantizer, onnxruntime.transformers.float16; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------ building blocks
def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_transpose_of_weight_is_folded_before_int8(tmp_path: Path) -> None:
    """The dynamo DiT's `Transpose(W) -> MatMul`: after preparation the quantiser sees W."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 96])], [numpy_helper.from_array(w, "w")])
    src = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    assert G.count_constant_transposes(src) == 1
    info = G.prepare(src, tmp_path / "p.onnx")
    assert info == {"constant_transposes_before": 1, "constant_transposes_after": 0}
    G.int8_dynamic(tmp_path / "p.onnx", tmp_path / "q.onnx", per_channel=True, op_types=["MatMul"])
    stats = G.weight_stats(tmp_path / "q.onnx")
    assert stats["large_fp32"] == 0 and stats["bytes_by_dtype"]["int8"] >= w.size  # + zero points
    x = rng.standard_normal((5, 64)).astype(np.float32)
    ref, got = _run(src, {"x": x}), _run(tmp_path / "q.onnx", {"x": x})
    assert np.linalg.norm(ref - got) / np.linalg.norm(ref) < 0.02


def test_gemm_to_matmul_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((48, 32)).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    src = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "g.onnx")
    x = rng.standard_normal((3, 32)).astype(np.float32)
    ref = _run(src, {"x": x})
    assert G.gemm_to_matmul(src) == 1
    assert _ops(src) == {"MatMul", "Add"}
    np.testing.assert_allclose(_run(src, {"x": x}), ref, rtol=1e-5, atol=1e-5)


def test_psnr_and_ssim() -> None:
    rng = np.random.default_rng(2)
    img = rng.random((32, 32, 3))
    assert Q.psnr(img, img) == Q.PSNR_CAP and Q.ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    assert 35 < Q.psnr(img, noisy) < 45
    assert 0.9 < Q.ssim(img, noisy) < 1.0
    assert Q.ssim(img, rng.random(img.shape)) < 0.1


def test_shipped_calibration_prompts() -> None:
    prompts = read_prompts()
    assert len(prompts) >= 8 and any('"' in p for p in prompts)  # some exercise the glyph encoder
