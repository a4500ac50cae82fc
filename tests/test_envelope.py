"""The component models' shape bounds (server.envelope): proven against what the pipeline sends,
and enforced by the server before onnxruntime sees a request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glm_image_onnx.runtime import GlmImageOnnxPipeline
from glm_image_onnx.server.envelope import Envelope, RequestBounds, envelope

# A small server: 128 px a side at most (128x96 by area), two sources, a 60-byte prompt.
BOUNDS = RequestBounds(max_side=128, max_pixels=128 * 96, max_prompt_bytes=60, max_images=2)
# Sixty bytes of quoted texts, the glyph encoder's worst case: many texts, one of them long.
PROMPT = "'" + "a" * 30 + "' '' '' '' '' '' '' '' '' ''"


def _observe(pipe: GlmImageOnnxPipeline) -> dict[str, dict[str, list[tuple[int, ...]]]]:
    seen: dict[str, dict[str, list[tuple[int, ...]]]] = {}

    def observe(graph: str, feeds) -> None:
        for name, value in feeds().items():
            seen.setdefault(graph, {}).setdefault(name, []).append(tuple(np.shape(value)))

    pipe.observe_feeds(observe)
    return seen


def _check(env: Envelope, seen: dict[str, dict[str, list[tuple[int, ...]]]]) -> dict[str, dict[str, int]]:
    """Every fed shape within its bound; returns, per bounded axis, how often the bound was reached."""
    reached: dict[str, dict[str, int]] = {}
    for graph, inputs in seen.items():
        for name, shapes in inputs.items():
            bound = env[graph].get(name)
            if bound is None:
                continue
            for shape in shapes:
                assert bound.error(name, shape) is None, (graph, bound.error(name, shape))
                for axis, (size, most) in enumerate(zip(shape, bound.shape)):
                    if size == most:
                        key = f"{name}[{axis}]"
                        reached.setdefault(graph, {})[key] = reached.get(graph, {}).get(key, 0) + 1
    return reached


@pytest.mark.parametrize("tiling", ["auto", "off"])
def test_the_pipeline_sends_nothing_beyond_the_envelope_and_reaches_it(tiny_package: Path, tiling: str) -> None:
    pipe = GlmImageOnnxPipeline.from_package(tiny_package, vae_tiling=tiling, vae_tile_size=64 if tiling == "auto" else None)
    assert pipe.supports_image_to_image
    env = envelope(pipe, BOUNDS)
    seen = _observe(pipe)
    for height, width in ((128, 96), (96, 128)):  # the largest area, both ways round
        pipe(PROMPT, height=height, width=width, num_inference_steps=1, seed=0)
    source = Image.new("RGB", (96, 128), (200, 30, 30))
    pipe(PROMPT, image=[source] * BOUNDS.max_images, num_inference_steps=1, seed=0)
    reached = _check(env, seen)
    # Tight where the memory is: the DiT's latent side and glyph text, the VAE tile, the condition.
    assert "hidden_states[2]" in reached["dit_decoder"] or "hidden_states[3]" in reached["dit_decoder"], reached
    assert "hidden_states[2]" in reached["dit_condition_write"] or "hidden_states[3]" in reached["dit_condition_write"]
    assert reached["vae_decoder"], reached
    pipe.close()


def test_the_envelope_refuses_what_the_pipeline_never_sends(tiny_package: Path) -> None:
    pipe = GlmImageOnnxPipeline.from_package(tiny_package)
    env = envelope(pipe, BOUNDS)
    c = pipe.latent_channels
    big = env["vae_decoder"]["latents"].error("latents", (1, c, 256, 256))
    assert big and "dimension 2 is 256" in big and "VAE tiles" in big
    odd = env["dit_decoder"]["hidden_states"].error("hidden_states", (1, c, 7, 7))
    assert odd and "not a multiple of 2" in odd
    # both sides at the longest side: more tokens than the area allows
    area = env["dit_decoder"]["hidden_states"].error("hidden_states", (2, c, 16, 16))
    assert area and "elements per row" in area
    assert env["dit_decoder"]["hidden_states"].error("hidden_states", (2, c, 16, 12)) is None
    pipe.close()


def test_the_server_refuses_component_calls_beyond_the_envelope(server) -> None:
    """Over gRPC: INVALID_ARGUMENT naming the input, the axis and the bound; config lists them."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.url)
    config = client.get_model_config("vae_decoder", as_json=True)["config"]["parameters"]
    most = json.loads(config["max_shape.latents"]["string_value"])
    assert most[2] > 0 and most[0] == -1
    cases = [("vae_decoder", "latents", (1, most[1], 2 * most[2], 2 * most[3]), "dimension 2"),
             ("dit_decoder", "hidden_states", (1, most[1], 7, 7), "multiple of")]
    for model, name, shape, said in cases:
        inputs = []
        for spec in client.get_model_metadata(model, as_json=True)["inputs"]:
            dims = shape if spec["name"] == name else [1 if int(d) == -1 else int(d) for d in spec["shape"]]
            t = grpcclient.InferInput(spec["name"], list(dims), spec["datatype"])
            t.set_data_from_numpy(np.zeros(dims, np.float32 if spec["datatype"] == "FP32" else
                                           bool if spec["datatype"] == "BOOL" else np.int64))
            inputs.append(t)
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
        assert name in info.value.message() and said in info.value.message()
    assert client.is_server_live() and client.is_model_ready("glm_image")
