"""The runtime's torch-free pre/post-processing against the real diffusers / transformers code.

Everything here is compared for exact equality (the runtime mirrors the reference's float ops),
which is stricter than the 1e-6 / 1e-5 the runtime needs.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from glm_image_onnx.manifest import Layout  # noqa: E402
from glm_image_onnx.runtime import glyphs, images, prompt, scheduler  # noqa: E402


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from transformers import GlmImageProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # target_h/target_w as kwargs warn on every call
    return GlmImageProcessor.from_pretrained(tiny_checkpoint / "processor")


def _rand_image(rs, h, w, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = (rs.rand(h, w, channels) * 255).astype(np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a)


# ------------------------------------------------------------------------------------ scheduler
def _diffusers_schedule(cfg, steps, seq_len):
    """The pipeline's own lines (GlmImagePipeline.__call__, 'Prepare timesteps')."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ts = np.linspace(sched.config.num_train_timesteps, 1.0, steps + 1)[:-1]
    ts = ts.astype(np.int64).astype(np.float32)
    sigmas = ts / sched.config.num_train_timesteps
    mu = calculate_shift(seq_len, sched.config.get("base_image_seq_len", 256),
                         sched.config.get("base_shift", 0.25), sched.config.get("max_shift", 0.75))
    timesteps, _ = retrieve_timesteps(sched, steps, "cpu", ts, sigmas, mu=mu)
    return sched, timesteps


SCHEDULER_VARIANTS = [{}, {"time_shift_type": "exponential"}, {"use_dynamic_shifting": False, "shift": 3.0},
                      {"shift_terminal": 0.1}, {"invert_sigmas": True}, {"use_karras_sigmas": True},
                      {"use_exponential_sigmas": True}]


@pytest.mark.parametrize("variant", SCHEDULER_VARIANTS, ids=lambda v: ",".join(v) or "checkpoint")
def test_scheduler_matches_diffusers(tiny_checkpoint, variant):
    cfg = {**json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text()), **variant}
    vae_scale = 2 ** (len(json.loads((tiny_checkpoint / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    patch = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())["patch_size"]
    ours = scheduler.FlowMatchSchedule.from_config(cfg)
    for height, width in [(32, 32), (64, 96), (1024, 768), (2048, 2048)]:
        seq_len = scheduler.image_seq_len(height, width, vae_scale, patch)
        for steps in (1, 2, 7, 50, 1000):
            if steps == 1 and "shift_terminal" in variant:
                continue  # one step: diffusers divides 0 by 0 (nan) too
            ref, ref_ts = _diffusers_schedule(cfg, steps, seq_len)
            ts, sigmas = ours.timesteps(steps, seq_len)
            assert ts.dtype == np.float32 and sigmas.dtype == np.float32 and len(sigmas) == steps + 1
            np.testing.assert_array_equal(ts, ref_ts.numpy())
            np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
            if steps > 50:
                continue
            g = torch.Generator().manual_seed(steps)
            x = torch.randn(1, 4, height // 32, width // 32, generator=g)
            y = x.numpy().copy()
            for i, t in enumerate(ref_ts):
                noise_pred = torch.randn(x.shape, generator=g)
                x = ref.step(noise_pred, t, x, return_dict=False)[0]
                y = ours.step(noise_pred.numpy(), i, y, sigmas=sigmas)
                assert y.dtype == np.float32
                np.testing.assert_array_equal(y, x.numpy())


def test_scheduler_guidance_and_errors():
    cond, uncond = (torch.randn(1, 4, 3, 3) for _ in range(2))
    ref = uncond + 1.5 * (cond - uncond)
    np.testing.assert_array_equal(scheduler.guidance(cond.numpy(), uncond.numpy(), 1.5), ref.numpy())
    with pytest.raises(ValueError, match="beta"):
        scheduler.FlowMatchSchedule.from_config({"use_beta_sigmas": True})
    with pytest.raises(ValueError, match="time_shift_type"):
        scheduler.FlowMatchSchedule.from_config({"time_shift_type": "cosine"})
    with pytest.raises(ValueError, match="not supported"):
        scheduler.FlowMatchSchedule.from_config({"_class_name": "DDIMScheduler"})
    s = scheduler.FlowMatchSchedule.from_config({"stochastic_sampling": True})
    _, sigmas = s.timesteps(4, 256)
    with pytest.raises(ValueError, match="noise"):
        s.step(np.zeros(3, np.float32), 0, np.zeros(3, np.float32), sigmas=sigmas)


# --------------------------------------------------------------------------------------- glyphs
GLYPH_PROMPTS = [
    "a cat on a mat", "", "a 'sign' here", 'say "hello world"', "\u201ccurly\u201d text", "「中文」 sign",
    "'a' \"b\" \u201cc\u201d 「d」 'e' and 'f'", "'one' 'two'", "'Ünïcödé ☃ 😀'", "it's 'quoted' isn't it",
    "'x </s> y' 'p<pad>q' ' <unk> ' '<extra_id_5>z' 'end</s>'", "'\t  </s>\n '",
    "'<extra_id_1><extra_id_10>' '</s>'", "'" + "long" * 700 + "'", "'" + "é" * 1500 + "' 'b'",
]


def _pipeline_glyph_inputs(tokenizer, prompt_text, max_length):
    """`get_glyph_texts` + the tokenisation half of `_get_glyph_embeds`, verbatim."""
    from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline

    texts = GlmImagePipeline.get_glyph_texts(None, prompt_text)[0]
    glyph_texts = texts or [""]
    input_ids = tokenizer(glyph_texts, max_length=max_length, truncation=True).input_ids
    input_ids = [[tokenizer.pad_token_id] * ((len(input_ids) + 1) % 2) + ids for ids in input_ids]
    longest = max(len(ids) for ids in input_ids)
    mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in input_ids])
    ids = torch.tensor([ids + [tokenizer.pad_token_id] * (longest - len(ids)) for ids in input_ids])
    return texts, ids.numpy(), mask.numpy()


@pytest.mark.parametrize("max_length", [2048, 7])
def test_glyph_batch_matches_byt5(tiny_checkpoint, max_length):
    from transformers import ByT5Tokenizer

    reference = ByT5Tokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    ours = glyphs.ByteTokenizer.from_dir(tiny_checkpoint / "tokenizer")
    assert (ours.pad_id, ours.eos_id) == (reference.pad_token_id, reference.eos_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "This sequence already has </s>"
        for text in GLYPH_PROMPTS:
            texts, ids, mask = _pipeline_glyph_inputs(reference, text, max_length)
            assert glyphs.glyph_texts(text) == texts
            for tok in (ours, None):  # from the folder, and ByT5's defaults
                got_ids, got_mask = glyphs.glyph_batch(glyphs.glyph_texts(text), max_length, tok)
                assert got_ids.dtype == np.int64 and got_mask.dtype == np.int64
                np.testing.assert_array_equal(got_ids, ids, err_msg=text)
                np.testing.assert_array_equal(got_mask, mask, err_msg=text)


def test_gather_rows():
    rs = np.random.RandomState(0)
    for texts in (["ab", "c"], [""], ["abc", "de", "f"]):
        ids, mask = glyphs.glyph_batch(texts)
        hidden = rs.randn(*ids.shape, 8).astype(np.float32)
        ref = torch.from_numpy(hidden)[torch.from_numpy(mask).bool()].unsqueeze(0)
        np.testing.assert_array_equal(glyphs.gather_rows(hidden, mask), ref.numpy())


# --------------------------------------------------------------------------------------- prompt
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (32, 32), (1024, 768), (96, 1024), (1152, 768), (100, 70)])
def test_prompt_text_to_image(tiny_checkpoint, processor, size):
    height, width = size
    builder = prompt.PromptBuilder.from_package(tiny_checkpoint)
    for text in ["A cat holding a sign 'hello'", "", "中文 “curly” <sop>1 2<eop>", "  spaced\n\nlines  "]:
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        ref = processor.apply_chat_template(messages, tokenize=True, target_h=height, target_w=width,
                                            return_dict=True, return_tensors="np")
        got = builder.build(text, height, width)
        np.testing.assert_array_equal(got.input_ids, ref["input_ids"])
        np.testing.assert_array_equal(got.image_grid_thw, ref["image_grid_thw"])
        assert got.input_ids.dtype == np.int64 and got.image_grid_thw.dtype == np.int64
        (th, tw), (ph, pw) = got.target_grid, got.preview_grid
        assert (th, tw) == (height // 32, width // 32)
        assert got.max_new_tokens == th * tw + ph * pw + 1 and got.target_offset == ph * pw


@pytest.mark.parametrize("count", [1, 2, 3])
def test_prompt_and_pixels_image_to_image(tiny_checkpoint, processor, count):
    rs = np.random.RandomState(count)
    sources = [_rand_image(rs, 50, 70), _rand_image(rs, 90, 40, "RGBA"), _rand_image(rs, 300, 200)][:count]
    text = "make it 'blue'"
    messages = [{"role": "user", "content": [{"type": "image", "image": im} for im in sources]
                 + [{"type": "text", "text": text}]}]
    # return_tensors="pt" as the pipeline uses: with "np" transformers 5.23 crashes here (torch.cat
    # of the PIL backend's numpy grids).
    ref = processor.apply_chat_template(messages, tokenize=True, target_h=128, target_w=64,
                                        return_dict=True, return_tensors="pt")
    pixels = images.ImageProcessor.from_file(tiny_checkpoint / Layout().image_processor)(sources)
    if processor.image_processor.backend == "pil":  # the fallback without torchvision: bit-identical
        np.testing.assert_array_equal(pixels["pixel_values"], ref["pixel_values"].numpy())
    np.testing.assert_array_equal(pixels["image_grid_thw"], ref["image_grid_thw"][:count].numpy())
    got = prompt.PromptBuilder.from_package(tiny_checkpoint).build(
        text, 128, 64, [tuple(g[1:]) for g in pixels["image_grid_thw"].tolist()])
    np.testing.assert_array_equal(got.input_ids, ref["input_ids"].numpy())
    np.testing.assert_array_equal(got.image_grid_thw, ref["image_grid_thw"].numpy())
    assert got.preview_grid is None and got.max_new_tokens == 4 * 2 + 1 and got.target_offset == 0


def test_prompt_rejects_image_placeholder_in_text(tiny_checkpoint):
    with pytest.raises(ValueError, match="placeholder"):
        prompt.PromptBuilder.from_package(tiny_checkpoint).build("a <|image|> b", 64, 64)


# --------------------------------------------------------------------------------------- images
def test_image_processor_matches_transformers(tiny_checkpoint, processor):
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    # The runtime mirrors the PIL backend, which transformers falls back to without torchvision (as
    # here); the torchvision backend resizes differently, so compare with the PIL class explicitly.
    rs = np.random.RandomState(0)
    sources = [_rand_image(rs, 50, 70), _rand_image(rs, 90, 40), _rand_image(rs, 300, 200),
               _rand_image(rs, 33, 33, "RGBA"), _rand_image(rs, 64, 64, "L"), _rand_image(rs, 1000, 700),
               _rand_image(rs, 17, 60)]
    for ref_proc, ours, batch in [
            (GlmImageImageProcessorPil.from_pretrained(tiny_checkpoint / "processor"),
             images.ImageProcessor.from_file(tiny_checkpoint / Layout().image_processor), sources),
            (GlmImageImageProcessorPil(), images.ImageProcessor(), sources[:-1])]:  # merge 2, temporal 2
        ref = ref_proc(batch, return_tensors="np")
        got = ours(batch)
        assert got["pixel_values"].dtype == np.float32 and got["image_grid_thw"].dtype == np.int64
        np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
        np.testing.assert_array_equal(got["pixel_values"], ref["pixel_values"])
        for im, (_, gh, gw) in zip(batch, got["image_grid_thw"]):
            assert ours.grid(im.height, im.width) == (gh, gw)
    # too small for the 28-pixel factor: both refuse
    with pytest.raises(ValueError, match="factor"):
        GlmImageImageProcessorPil()(sources[-1:])
    with pytest.raises(ValueError, match="factor"):
        images.ImageProcessor()(sources[-1:])


def test_vae_image_processor_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    rs = np.random.RandomState(0)
    vae_proc = VaeImageProcessor(vae_scale_factor=8)  # as GlmImagePipeline builds it
    for im, (h, w) in [(_rand_image(rs, 50, 70), (48, 64)), (_rand_image(rs, 300, 200), (304, 200)),
                       (_rand_image(rs, 33, 33, "RGBA"), (32, 32)), (_rand_image(rs, 64, 64, "L"), (64, 64)),
                       (_rand_image(rs, 1000, 700), (1000, 700))]:
        ref = vae_proc.preprocess(im, height=h, width=w).numpy()
        got = images.vae_preprocess(im, h, w, vae_scale_factor=8)
        assert got.dtype == ref.dtype == np.float32
        np.testing.assert_array_equal(got, ref)
    assert images.condition_size(_rand_image(rs, 50, 70)) == (48, 64)
    for channels in (3, 1):
        decoded = torch.randn(2, channels, 16, 24) * 1.3
        ref_np = vae_proc.postprocess(decoded, output_type="np")
        ref_pil = vae_proc.postprocess(decoded, output_type="pil")
        got_np = images.vae_postprocess(decoded.numpy())
        np.testing.assert_array_equal(got_np, ref_np)
        for a, b in zip(images.to_pil(got_np), ref_pil):
            assert a.mode == b.mode and a.size == b.size
            np.testing.assert_array_equal(np.array(a), np.array(b))


def test_upsample_prior_ids():
    from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline

    for h, w in [(1, 1), (6, 5), (32, 24)]:
        ids = torch.randint(0, 16512, (h * w,))
        got = images.upsample_prior_ids(ids.numpy(), h, w, 2)
        assert got.dtype == np.int64 and got.shape == (1, 4 * h * w)
        np.testing.assert_array_equal(got, GlmImagePipeline._upsample_token_ids(ids, h, w).numpy())


# ------------------------------------------------------------------------------------ tiled VAE
# Tiles far below the real 1024 px so that a 16x24 latent (128x192 px) tiles in both directions:
# decode starts tiles every 6 latent rows / cols (3 x 4 tiles), encode every 48 px (3 x 4 tiles).
_TILE_SAMPLE, _TILE_LATENT = 64, 8


@pytest.fixture(scope="module")
def tiled_vae(tiny_checkpoint):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_checkpoint / "vae").eval()
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = _TILE_SAMPLE, _TILE_LATENT
    return vae


@pytest.fixture(scope="module")
def tiled_pipe(tiny_package):
    from glm_image_onnx.runtime import GlmImageOnnxPipeline

    default = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False)
    assert default.config.vae.sample_size == 1024  # recorded by the export from the VAE config
    assert (default.vae_tile_sample, default.vae_tile_latent) == (512, 64)  # the CPU's cap
    pipe = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False, vae_tiling="auto",
                                             vae_tile_size=_TILE_SAMPLE)
    assert (pipe.vae_tile_sample, pipe.vae_tile_latent) == (_TILE_SAMPLE, _TILE_LATENT)
    return pipe


def test_tiled_vae_decode_matches_diffusers(tiled_vae, tiled_pipe):
    latents = np.random.RandomState(0).randn(1, 4, 16, 24).astype(np.float32)
    z = latents * tiled_pipe.latents_std + tiled_pipe.latents_mean  # what the pipeline hands the VAE
    with torch.no_grad():
        ref = tiled_vae.decode(torch.from_numpy(z)).sample.numpy()  # 24 > 8: diffusers' tiled_decode
        tiled_vae.disable_tiling()
        plain = tiled_vae.decode(torch.from_numpy(z)).sample.numpy()
        tiled_vae.enable_tiling()
    assert np.abs(ref - plain).max() > 1e-3  # tiling really changes the image, so the test can fail

    session = tiled_pipe.sessions["vae_decoder"]
    got = images.tiled_decode(lambda t: session.run(None, {"latents": t})[0], z, _TILE_LATENT, _TILE_SAMPLE)
    assert got.dtype == np.float32 and got.shape == ref.shape == (1, 3, 128, 192)
    # 1e-5 relative to the image's scale (measured: 8.2e-6 abs on a sample range of 4.04, i.e. 2.0e-6;
    # seeds 1-3: up to 1.0e-5 abs, 2.2e-6 relative): the ONNX decoder's own error, since the tiling
    # loop itself is exact (test_tiling_loop_is_diffusers_tiling_exactly).
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # through the pipeline ("auto": 24 > 8 tiles), and "off" decodes the whole latent at once: images
    # in [0, 1], within 1e-5 (measured 3.3e-6 and 3.8e-6)
    assert np.abs(tiled_pipe.decode(latents) - images.vae_postprocess(ref)).max() < 1e-5
    tiled_pipe.vae_tiling = "off"
    try:
        assert np.abs(tiled_pipe.decode(latents) - images.vae_postprocess(plain)).max() < 1e-5
    finally:
        tiled_pipe.vae_tiling = "auto"


def test_tiling_loop_is_diffusers_tiling_exactly(tiled_vae):
    """images.tiled_decode / tiled_encode around diffusers' own VAE run per tile (no ONNX): the same
    tiles, blends and crops as AutoencoderKL.tiled_decode / _tiled_encode, to the bit."""
    latents = np.random.RandomState(0).randn(1, 4, 16, 24).astype(np.float32)
    pixels = (np.random.RandomState(1).rand(1, 3, 128, 192) * 2 - 1).astype(np.float32)
    with torch.no_grad():
        ref_decoded = tiled_vae.decode(torch.from_numpy(latents)).sample.numpy()
        ref_moments = tiled_vae._tiled_encode(torch.from_numpy(pixels)).numpy()
        tiled_vae.disable_tiling()
        try:
            decoded = images.tiled_decode(lambda t: tiled_vae.decode(torch.from_numpy(t)).sample.numpy(),
                                          latents, _TILE_LATENT, _TILE_SAMPLE)
            moments = images.tiled_encode(lambda t: tiled_vae._encode(torch.from_numpy(t)).numpy(),
                                          pixels, _TILE_SAMPLE, _TILE_LATENT)
        finally:
            tiled_vae.enable_tiling()
    assert decoded.shape == ref_decoded.shape and moments.shape == ref_moments.shape
    np.testing.assert_array_equal(decoded, ref_decoded)
    np.testing.assert_array_equal(moments, ref_moments)


def test_tiled_vae_encode_matches_diffusers(tiled_vae, tiled_pipe):
    pixels = (np.random.RandomState(1).rand(1, 3, 128, 192) * 2 - 1).astype(np.float32)
    mean, std = tiled_pipe.latents_mean, tiled_pipe.latents_std
    with torch.no_grad():
        # 192 > 64: diffusers' _tiled_encode tiles the moments; the pipeline takes their mode
        ref = (tiled_vae.encode(torch.from_numpy(pixels)).latent_dist.mode().numpy() - mean) / std
        tiled_vae.disable_tiling()
        plain = (tiled_vae.encode(torch.from_numpy(pixels)).latent_dist.mode().numpy() - mean) / std
        tiled_vae.enable_tiling()
    assert np.abs(ref - plain).max() > 1e-3
    got = tiled_pipe.encode(pixels)
    assert got.dtype == np.float32 and got.shape == ref.shape == (1, 4, 16, 24)
    assert np.abs(got - ref).max() < 1e-5  # measured 1.0e-6 (latents of scale ~1)


def test_vae_tiling_option(tiny_package):
    from glm_image_onnx.runtime import GlmImageOnnxPipeline

    with pytest.raises(ValueError, match="vae_tiling"):
        GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False, vae_tiling="bogus")
    with pytest.raises(ValueError, match="vae_tile_size"):
        GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False, vae_tile_size=100)
