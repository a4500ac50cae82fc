"""The KServe v2 server against the stock tritonclient (sync and aio): metadata, the glm_image model
against the in-process runtime, the component models against onnxruntime, and bad requests."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _server_helpers import glm_inputs, outputs, tensor, tritonclient_grpc as grpcclient
from glm_image_onnx.runtime import GlmImageOnnxPipeline
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

SMALL = dict(height=64, width=64, steps=2, seed=1234)


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def runtime(tiny_package: Path) -> GlmImageOnnxPipeline:
    return GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False)


def _expect(client, model: str, inputs, code: str, *words: str, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, **kwargs)
    assert info.value.status() == f"StatusCode.{code}", info.value
    for word in words:
        assert word in info.value.message(), info.value.message()
    return info.value.message()


# ------------------------------------------------------------------------------------ metadata
def test_server_and_model_metadata(client, tiny_package: Path):
    from glm_image_onnx.runtime import Package

    assert client.is_server_live() and client.is_server_ready()
    graphs = list(Package.open(tiny_package, verify_files=False).graphs)
    index = client.get_model_repository_index(as_json=True)["models"]
    assert [m["name"] for m in index] == ["glm_image"] + graphs
    assert all(m["state"] == "READY" for m in index)
    for name in ["glm_image"] + graphs:
        assert client.is_model_ready(name)
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "glm-image-onnx" and "statistics" in meta["extensions"]

    md = client.get_model_metadata("glm_image", as_json=True)
    assert {t["name"]: t["datatype"] for t in md["inputs"]}["prompt"] == "BYTES"
    assert {t["name"]: t["shape"] for t in md["outputs"]} == {"image_png": ["1"], "image": ["-1", "-1", "3"],
                                                            "tokens": ["-1"]}
    vae = client.get_model_metadata("vae_decoder", as_json=True)
    assert vae["platform"] == "onnxruntime_onnx"
    assert vae["inputs"] == [{"name": "latents", "datatype": "FP32", "shape": ["-1", "4", "-1", "-1"]}]


def test_model_config_is_a_triton_config(client):
    cfg = client.get_model_config("glyph_encoder").config
    assert isinstance(cfg, model_config_pb2.ModelConfig)
    assert cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input_ids", [-1]), ("attention_mask", [-1])]
    assert cfg.input[0].data_type == model_config_pb2.TYPE_INT64
    ar = client.get_model_config("ar_planner").config
    assert ar.max_batch_size == 0 and not ar.HasField("dynamic_batching")  # position_ids is [3, B, S]
    glm = client.get_model_config("glm_image").config
    assert {i.name: i.optional for i in glm.input}["prompt"] is False
    assert {i.name: i.data_type for i in glm.input}["prompt"] == model_config_pb2.TYPE_STRING
    assert glm.parameters["quantization"].string_value == "none"  # an exported fp32 package
    for name in ("nope", ""):
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_model_config(name)


# ------------------------------------------------------------------------------------ glm_image
def test_image_equals_the_in_process_runtime(client, runtime):
    result = client.infer("glm_image", glm_inputs(prompt='a sign that says "hi"', **SMALL))
    expected = runtime('a sign that says "hi"', height=64, width=64, num_inference_steps=2, seed=1234)
    pixels = result.as_numpy("image")
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
    np.testing.assert_array_equal(pixels, np.asarray(expected.images[0]))
    png = Image.open(io.BytesIO(result.as_numpy("image_png")[0]))
    assert png.format == "PNG"
    np.testing.assert_array_equal(np.asarray(png), pixels)
    np.testing.assert_array_equal(result.as_numpy("tokens"), expected.tokens)
    assert result.get_response().parameters["seed"].int64_param == 1234


def test_parameters_work_like_inputs_and_outputs_are_selectable(client):
    by_tensor = client.infer("glm_image", glm_inputs(prompt="a cat", **SMALL), outputs=outputs("image", "tokens"))
    by_param = client.infer("glm_image", glm_inputs(prompt="a cat"), outputs=outputs("image"),
                            parameters={"height": 64, "width": 64, "steps": 2, "seed": 1234})
    assert [o.name for o in by_param.get_response().outputs] == ["image"]
    np.testing.assert_array_equal(by_tensor.as_numpy("image"), by_param.as_numpy("image"))
    only_prompt_param = client.infer("glm_image", [], outputs=outputs("tokens"),
                                     parameters={"prompt": "a cat", "height": 64, "width": 64, "steps": 2,
                                                 "seed": 1234})
    assert [o.name for o in only_prompt_param.get_response().outputs] == ["tokens"]
    assert only_prompt_param.as_numpy("image") is None
    tokens = only_prompt_param.as_numpy("tokens")
    assert tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, by_tensor.as_numpy("tokens"))  # the same prompt, size and seed
    other_prompt = client.infer("glm_image", [], outputs=outputs("tokens"),
                                parameters={"prompt": "a dog", "height": 64, "width": 64, "steps": 2, "seed": 1234})
    assert not np.array_equal(other_prompt.as_numpy("tokens"), tokens)  # the prompt parameter is what it planned


def test_image_to_image_over_grpc_equals_runtime(client, runtime):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    result = client.infer("glm_image", glm_inputs(prompt="make it blue", image=buffer.getvalue(), steps=2, seed=5),
                          outputs=outputs("image"))
    expected = runtime("make it blue", num_inference_steps=2, seed=5, image=source)
    np.testing.assert_array_equal(result.as_numpy("image"), np.asarray(expected.images[0]))


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_GLM = [
    ("missing prompt", dict(height=64), "INVALID_ARGUMENT", ["prompt", "missing"]),
    ("wrong dtype", dict(prompt="x", height=np.array([64.0], np.float32)), "INVALID_ARGUMENT",
     ["'height'", "INT32", "FP32"]),
    ("wrong shape", dict(prompt=["a", "b"]), "INVALID_ARGUMENT", ["'prompt'", "shape [1]", "[2]"]),
    ("height not a multiple of 32", dict(prompt="x", height=50, width=64), "INVALID_ARGUMENT",
     ["height", "multiple of 32", "50"]),
    ("absurd size", dict(prompt="x", height=64, width=1 << 20), "INVALID_ARGUMENT", ["width", "limit"]),
    ("too many steps", dict(prompt="x", steps=100000), "INVALID_ARGUMENT", ["steps", "100000"]),
    ("zero steps", dict(prompt="x", steps=0), "INVALID_ARGUMENT", ["steps"]),
    ("negative guidance", dict(prompt="x", guidance=-1.0), "INVALID_ARGUMENT", ["guidance"]),
    ("top_p above one", dict(prompt="x", top_p=1.5), "INVALID_ARGUMENT", ["top_p"]),
    ("negative seed", dict(prompt="x", seed=-3), "INVALID_ARGUMENT", ["seed"]),
    ("corrupt image", dict(prompt="x", image=b"\x89PNG\r\n\x1a\nnot really a png"), "INVALID_ARGUMENT",
     ["image"]),
    ("truncated image", dict(prompt="x", image=_png_bytes()[:60]), "INVALID_ARGUMENT", ["image"]),
    ("not utf-8", dict(prompt=b"\xff\xfe"), "INVALID_ARGUMENT", ["prompt", "UTF-8"]),
]


@pytest.mark.parametrize("case,fields,code,words", BAD_GLM, ids=[c[0] for c in BAD_GLM])
def test_bad_glm_image_requests(client, case, fields, code, words):
    inputs = []
    for name, value in fields.items():
        if isinstance(value, np.ndarray) and value.dtype == np.float32:
            inputs.append(tensor(name, value, "FP32"))
        else:
            inputs.append(tensor(name, value))
    _expect(client, "glm_image", inputs, code, *words)
    assert client.is_server_ready()


def _failed(client, model: str) -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"].get("fail", {}).get("count", 0))


def test_other_bad_requests_and_the_server_keeps_serving(client):
    vae_failed, glm_failed = _failed(client, "vae_decoder"), _failed(client, "glm_image")
    _expect(client, "nope", glm_inputs(prompt="x"), "NOT_FOUND", "unknown model 'nope'", "glm_image")
    _expect(client, "glm_image", glm_inputs(prompt="x", **SMALL), "NOT_FOUND", "version", model_version="7")
    _expect(client, "glm_image", glm_inputs(prompt="x") + [tensor("colour", [1], "INT32")], "INVALID_ARGUMENT",
            "unknown input 'colour'")
    _expect(client, "glm_image", glm_inputs(prompt="x", **SMALL), "INVALID_ARGUMENT", "requested output 'mask'",
            outputs=outputs("mask"))
    _expect(client, "glm_image", glm_inputs(prompt="x"), "INVALID_ARGUMENT", "parameter 'height'",
            parameters={"height": "tall"})
    _expect(client, "glm_image", glm_inputs(prompt="x"), "INVALID_ARGUMENT", "height", "multiple of 32",
            parameters={"height": 33})
    # a 6 MB image passes gRPC's default 4 MB limit (raised) and is refused for what it is
    _expect(client, "glm_image", glm_inputs(prompt="x", image=b"\x89PNG\r\n\x1a\n" + bytes(6 << 20)),
            "INVALID_ARGUMENT", "image")
    # component models: dtype, rank, missing input, inconsistent dynamic axes, batch over the limit
    latents = np.zeros((1, 4, 8, 8), np.float32)
    _expect(client, "vae_decoder", [tensor("latents", latents.astype(np.float64), "FP64")], "INVALID_ARGUMENT",
            "'latents'", "FP32", "FP64")
    _expect(client, "vae_decoder", [tensor("latents", latents[0], "FP32")], "INVALID_ARGUMENT", "'latents'",
            "4 dimensions")
    _expect(client, "vae_decoder", [tensor("latents", np.zeros((1, 3, 8, 8), np.float32), "FP32")],
            "INVALID_ARGUMENT", "dimension 1 must be 4")
    _expect(client, "vae_decoder", [tensor("latents", np.zeros((9, 4, 8, 8), np.float32), "FP32")],
            "INVALID_ARGUMENT", "batch size 9", "max_batch_size")
    ids = np.ones((1, 5), np.int64)
    _expect(client, "glyph_encoder", [tensor("input_ids", ids, "INT64")], "INVALID_ARGUMENT",
            "'attention_mask' is missing")
    _expect(client, "glyph_encoder", [tensor("input_ids", ids, "INT64"),
                                      tensor("attention_mask", np.ones((1, 6), np.int64), "INT64")],
            "INVALID_ARGUMENT", "'attention_mask'", "'seq'", "6", "5")
    # still serving, and the failures were counted
    result = client.infer("glm_image", glm_inputs(prompt="still here", **SMALL), outputs=outputs("image"))
    assert result.as_numpy("image").shape == (64, 64, 3)
    assert _failed(client, "vae_decoder") == vae_failed + 4  # failed requests count, as in Triton
    assert _failed(client, "glm_image") >= glm_failed + 5


def test_component_models_equal_onnxruntime(client, runtime):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    result = client.infer("vae_decoder", [tensor("latents", latents, "FP32")])
    expected = runtime.sessions["vae_decoder"].run(None, {"latents": latents})[0]
    np.testing.assert_array_equal(result.as_numpy("sample"), expected)

    ids = rng.integers(0, 200, (1, 7)).astype(np.int64)
    mask = np.ones((1, 7), np.int64)
    result = client.infer("glyph_encoder", [tensor("input_ids", ids, "INT64"), tensor("attention_mask", mask, "INT64")])
    expected = runtime.sessions["glyph_encoder"].run(None, {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_array_equal(result.as_numpy("last_hidden_state"), expected)


def test_statistics_count_requests_and_executions(client):
    before = client.get_inference_statistics("vae_decoder", as_json=True)["model_stats"][0]
    latents = np.zeros((3, 4, 8, 8), np.float32)
    for _ in range(2):
        client.infer("vae_decoder", [tensor("latents", latents, "FP32")])
    after = client.get_inference_statistics("vae_decoder", as_json=True)["model_stats"][0]
    assert int(after.get("inference_count", 0)) - int(before.get("inference_count", 0)) == 6  # rows
    assert int(after["execution_count"]) - int(before.get("execution_count", 0)) == 2
    success = after["inference_stats"]["success"]
    assert int(success["count"]) - int(before["inference_stats"].get("success", {}).get("count", 0)) == 2
    assert int(success["ns"]) > 0 and int(after["inference_stats"]["compute_infer"]["ns"]) > 0
    assert int(after["last_inference"]) > 0
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert len(every) == len(client.get_model_repository_index(as_json=True)["models"])


def test_aio_client(server, runtime):
    import tritonclient.grpc.aio as aioclient

    async def main():
        async with aioclient.InferenceServerClient(server.url) as c:
            assert await c.is_server_ready()
            result = await c.infer("glm_image", glm_inputs(prompt="an owl", **SMALL), outputs=outputs("image"))
            with pytest.raises(InferenceServerException) as info:
                await c.infer("glm_image", glm_inputs(height=64))
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            return result.as_numpy("image")

    pixels = asyncio.run(main())
    expected = runtime("an owl", height=64, width=64, num_inference_steps=2, seed=1234)
    np.testing.assert_array_equal(pixels, np.asarray(expected.images[0]))


def test_client_command_writes_the_same_png(server, runtime, tmp_path: Path, capsys):
    from glm_image_onnx.cli import main as cli_main

    args = ["client", "--url", server.url, "--prompt", "a red kite", "--height", "64", "--width", "96",
            "--steps", "2", "--seed", "21"]
    assert cli_main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "b.png"), "--stream"]) == 0
    expected = np.asarray(runtime("a red kite", height=64, width=96, num_inference_steps=2, seed=21).images[0])
    for name in ("a.png", "b.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / name)), expected)
    err = capsys.readouterr().err
    assert "denoising 2/2" in err and "(seed 21)" in err
    assert cli_main(["client", "--url", server.url, "--prompt", "x", "--height", "50", "--out",
                     str(tmp_path / "c.png")]) == 1
    assert "height must be a positive multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_serve_command_errors(server, tiny_package: Path, capsys):
    from glm_image_onnx.cli import main as cli_main

    assert cli_main(["serve", str(tiny_package.parent / "nope")]) == 2
    assert "not an exported package" in capsys.readouterr().err
    assert cli_main(["serve", str(tiny_package), "--max-concurrency", "0"]) == 2
    assert cli_main(["serve", str(tiny_package), "--provider-option", "novalue"]) == 2
    capsys.readouterr()
    assert cli_main(["serve", str(tiny_package), "--ar-max-rows", "0"]) == 2
    assert "--ar-max-rows must be >= 1" in capsys.readouterr().err
    assert cli_main(["serve", str(tiny_package), "--ar-join-wait-ms", "-1"]) == 2
    port = server.url.rsplit(":", 1)[1]
    assert cli_main(["serve", str(tiny_package), "--port", port, "--no-verify", "--quiet"]) == 1  # in use
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_runtime_and_server_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, glm_image_onnx.runtime, glm_image_onnx.runtime.scheduler, glm_image_onnx.runtime.glyphs, "
            "glm_image_onnx.runtime.prompt, glm_image_onnx.runtime.images, glm_image_onnx.cli, "
            "glm_image_onnx.server.app, glm_image_onnx.server.client, glm_image_onnx.server.triton_repo, "
            "glm_image_onnx.server.http_server, glm_image_onnx.server.openai_images; "
            "glm_image_onnx.cli.build_parser(); "
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
