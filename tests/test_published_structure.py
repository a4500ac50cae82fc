"""The published structure at toy widths (`tiny-published`): the real token-id layout, VAE flags,
scheduler and processor configs, exported and compared with diffusers at 512x512; and the server's
limits coming from the package's processor config (512..2048 px)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import build_checkpoint, build_package, greedy_reference
from glm_image_onnx.models.presets import FULL, TINY_PUBLISHED
from glm_image_onnx.runtime import GlmImageOnnxPipeline


@pytest.fixture(scope="module")
def published_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(TINY_PUBLISHED, tmp_path_factory, "tiny-published")


@pytest.fixture(scope="module")
def published_package(published_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # No per-graph --verify (the tiny package's tests have it): the 512x512 comparison with diffusers
    # checks every graph this structure changes, end to end.
    return build_package(published_checkpoint, tmp_path_factory, "tiny-published-onnx")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_checkpoint_has_the_published_structure(published_checkpoint: Path) -> None:
    ar = _json(published_checkpoint / "vision_language_encoder" / "config.json")
    assert (ar["image_start_token_id"], ar["image_end_token_id"], ar["image_token_id"]) == (16384, 16385, 167855)
    text = ar["text_config"]
    assert (text["vocab_size"], text["vision_vocab_size"], text["eos_token_id"], text["pad_token_id"]) == \
        (168064, 16512, 16385, 167841)
    assert ar["vision_config"]["attention_bias"] is True
    vae = _json(published_checkpoint / "vae" / "config.json")
    assert (vae["layers_per_block"], vae["use_quant_conv"], vae["use_post_quant_conv"],
            vae["mid_block_add_attention"], vae["latent_channels"], vae["sample_size"]) == \
        (3, False, False, False, 16, 1024)
    sched = _json(published_checkpoint / "scheduler" / "scheduler_config.json")
    assert (sched["use_dynamic_shifting"], sched["base_shift"], sched["max_shift"], sched["base_image_seq_len"],
            sched["max_image_seq_len"], sched["time_shift_type"]) == (True, 0.25, 0.75, 256, 4096, "linear")
    proc = _json(published_checkpoint / "processor" / "processor_config.json")["image_processor"]
    assert (proc["size"], proc["image_mean"], proc["image_std"], proc["patch_size"]) == \
        ({"longest_edge": 4194304, "shortest_edge": 262144}, [0.5] * 3, [0.5] * 3, 16)
    gen = _json(published_checkpoint / "vision_language_encoder" / "generation_config.json")
    assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (0.9, 0.75, 16512)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(published_checkpoint / "processor")
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<sop>", "<eop>", "<|image|>", "<|video|>"])
    assert ids == [167841, 167845, 167846, 167855, 167856] and len(tok) == 168064
    # The published chat template adds no role tokens.
    text = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False)
    assert text == "a cat"


def test_full_preset_is_the_published_configuration() -> None:
    assert (FULL.vae.block_out_channels, FULL.vae.layers_per_block, FULL.vae.quant_convs,
            FULL.vae.mid_attention) == ((128, 512, 1024, 1024), 3, False, False)
    few = FULL.with_layers(2)
    assert (few.ar.num_layers, few.ar.vision_depth, few.glyph.num_layers, few.dit.num_layers) == (2, 2, 2, 2)
    assert few.ar.hidden_size == 4096 and few.dit.head_dim == 128 and few.name == "full-2l"


def test_512_text_to_image_matches_diffusers(published_checkpoint: Path, published_package: Path) -> None:
    """Greedy AR and the same latents at the processor's smallest size: 513 AR tokens, 1024 DiT tokens."""
    ref_pipe = greedy_reference(published_checkpoint)
    latents = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    prompt = "a poster that says 'GLM 2026'"
    with torch.no_grad():
        ref = ref_pipe(prompt=prompt, height=512, width=512, num_inference_steps=2, guidance_scale=1.5,
                       latents=latents.clone(), output_type="np").images[0]
    ours = GlmImageOnnxPipeline.from_package(published_package)(
        prompt, height=512, width=512, num_inference_steps=2, guidance_scale=1.5, latents=latents.numpy(),
        do_sample=False)
    assert len(ours.tokens) == 256 + 256 and np.array_equal(ours.tokens, ref_pipe.generated[0].numpy()[: len(ours.tokens)])
    got = np.asarray(ours.images[0], dtype=np.float32) / 255.0
    assert got.shape == ref.shape == (512, 512, 3)
    assert np.abs(got - (ref * 255).round() / 255.0).max() <= 1 / 255 + 1e-6


def test_server_limits_come_from_the_package(published_package: Path) -> None:
    """512..2048 px from the package's processor config, through the real server: a 2048x2048 request
    is accepted and runs (its first progress response arrives; then it is cancelled), 256x256 is
    refused with a message that names the field."""
    import queue

    from _server_helpers import glm_inputs, start_server, tritonclient_grpc

    srv = start_server(published_package)
    try:
        with tritonclient_grpc.InferenceServerClient(srv.url) as client:
            params = client.get_model_config("glm_image", as_json=True)["config"]["parameters"]
            assert (params["max_side"]["string_value"], params["max_pixels"]["string_value"],
                    params["min_pixels"]["string_value"]) == ("2048", "4194304", "262144")
            with pytest.raises(tritonclient_grpc.InferenceServerException) as info:
                client.infer("glm_image", glm_inputs(prompt="small", height=256, width=256, steps=1))
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "height x width = 256x256" in info.value.message() and "262144" in info.value.message()
            progress: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: progress.put((result, error)))
            client.async_stream_infer("glm_image", glm_inputs(prompt="big", height=2048, width=2048, steps=1))
            result, error = progress.get(timeout=60)
            assert error is None, error
            client.stop_stream(cancel_requests=True)
    finally:
        srv.stop()
