"""DiT decoder, VAE and glyph encoder graphs: export + verify on two configurations, and ONNX-only
text-to-image / image-to-image paths against diffusers' own modules and pipeline."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import assert_verify_numbers
from glm_image_onnx.export import dit_decoder, glyph_encoder, graph, vae
from glm_image_onnx.models import components
from glm_image_onnx.models.dit_wrappers import DitConditionWrite, DitDecoder
from glm_image_onnx.models.presets import TINY

GRAPHS = ("dit_decoder", "dit_condition_write", "vae_decoder", "vae_encoder", "glyph_encoder")
EXPORTERS = {"transformer": dit_decoder, "vae": vae, "text_encoder": glyph_encoder}

# A second tiny configuration: other layer/head counts, patch size 1, 8 latent channels, a VAE
# with scale factor 4 and two layers per block, a wider glyph encoder and a smaller codebook.
ALT = TINY.with_changes(
    name="tiny-alt",
    ar=replace(TINY.ar, codebook_size=64, vision_vocab_size=72),
    dit=replace(TINY.dit, num_layers=3, num_heads=4, head_dim=8, time_embed_dim=24, condition_dim=12,
                patch_size=1),
    glyph=replace(TINY.glyph, d_model=48, num_layers=3, num_heads=3, d_kv=16, d_ff=96),
    vae=replace(TINY.vae, block_out_channels=(8, 16, 16), latent_channels=8, layers_per_block=2),
)


def _export_all(models: dict[str, Any], out: Path) -> dict[str, tuple[graph.GraphSpec, Path]]:
    result = {}
    for folder, module in EXPORTERS.items():
        for spec in module.graph_specs(models[folder], out):
            path = out / f"{spec.name}.onnx"
            fusions = graph.export_onnx(spec, path)
            assert bool(fusions) == spec.ort_fusions, (spec.name, fusions)
            result[spec.name] = (spec, path)
    return result


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rel(ref: np.ndarray | torch.Tensor, got: np.ndarray | torch.Tensor) -> float:
    """Max abs error relative to the reference's scale (as graph.verify measures it)."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    assert ref.shape == got.shape
    return float(np.abs(ref - got).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoint: Path) -> dict[str, Any]:
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import T5EncoderModel

    return {
        "transformer": GlmImageTransformer2DModel.from_pretrained(tiny_checkpoint / "transformer").eval(),
        "vae": AutoencoderKL.from_pretrained(tiny_checkpoint / "vae").eval(),
        "text_encoder": T5EncoderModel.from_pretrained(tiny_checkpoint / "text_encoder",
                                                       attn_implementation="eager").eval(),
    }


@pytest.fixture(scope="module")
def alt_models() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "transformer": components.build_dit_decoder(ALT),
        "vae": components.build_vae(ALT),
        # default (sdpa) attention: graph_specs must switch it to eager by itself
        "text_encoder": components.build_glyph_encoder(ALT),
    }


@pytest.fixture(scope="module")
def tiny_graphs(tiny_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    return _export_all(tiny_models, tmp_path_factory.mktemp("dvg-tiny"))


@pytest.fixture(scope="module")
def alt_graphs(alt_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    return _export_all(alt_models, tmp_path_factory.mktemp("dvg-alt"))


def _check_verified(spec: graph.GraphSpec, path: Path) -> None:
    result = graph.verify(spec, path)
    assert result["passed"] and result["max_rel"] < graph.MAX_RELATIVE_ERROR, result
    assert_verify_numbers(spec, path, result)  # its numbers are the ones measured here
    shapes = {json.dumps(s, sort_keys=True) for s in result["input_shapes"]}
    example = json.dumps({k: list(v.shape) for k, v in spec.example_inputs.items()}, sort_keys=True)
    assert len(shapes) >= 3 and example not in shapes


@pytest.mark.parametrize("name", GRAPHS)
def test_tiny_graph_exports_and_verifies(tiny_graphs, name: str) -> None:
    _check_verified(*tiny_graphs[name])


@pytest.mark.parametrize("name", GRAPHS)
def test_alt_config_graph_exports_and_verifies(alt_graphs, name: str) -> None:
    _check_verified(*alt_graphs[name])


def test_dit_graphs_get_onnxruntime_fusions(tiny_graphs, alt_graphs) -> None:
    """The DiT's tanh-GELUs and attentions are single onnxruntime nodes (verified above like any graph)."""
    for graphs in (tiny_graphs, alt_graphs):
        for name in ("dit_decoder", "dit_condition_write"):
            ops = [n.op_type for n in onnx.load(str(graphs[name][1]), load_external_data=False).graph.node]
            assert "FastGelu" in ops and "MultiHeadAttention" in ops, (name, sorted(set(ops)))
            assert "Tanh" not in ops and "Softmax" not in ops


def test_signatures_and_config(tiny_graphs, tiny_models) -> None:
    sig = {name: graph.signature(path) for name, (_, path) in tiny_graphs.items()}
    names = {name: ([i["name"] for i in s["inputs"]], [o["name"] for o in s["outputs"]]) for name, s in sig.items()}
    step = ["hidden_states", "encoder_hidden_states", "prior_token_id", "prior_token_drop", "timestep",
            "target_size", "crop_coords", "encoder_attention_mask"]
    assert names["dit_decoder"] == (step + ["condition_keys", "condition_values"], ["noise_pred"])
    assert names["dit_condition_write"] == (["hidden_states", "prior_token_id", "target_size"],
                                            ["condition_keys", "condition_values"])
    assert names["vae_decoder"] == (["latents"], ["sample"])
    assert names["vae_encoder"] == (["sample"], ["latent"])
    assert names["glyph_encoder"] == (["input_ids", "attention_mask"], ["last_hidden_state"])
    dtypes = {i["name"]: i["dtype"] for i in sig["dit_decoder"]["inputs"]}
    assert dtypes["prior_token_id"] == "int64" and dtypes["prior_token_drop"] == "bool"
    assert dtypes["encoder_attention_mask"] == "int64" and dtypes["timestep"] == "float32"
    # batch, latent height and width are symbolic, and height and width are separate symbols
    hs = sig["dit_decoder"]["inputs"][0]["shape"]
    assert all(isinstance(d, str) for d in (hs[0], hs[2], hs[3])) and hs[2] != hs[3]
    t = tiny_models["transformer"].config
    kv = sig["dit_condition_write"]["outputs"][0]["shape"]
    assert kv[0] == t.num_layers and kv[1] == 1 and kv[3:] == [t.num_attention_heads, t.attention_head_dim]
    cfg = tiny_graphs["dit_decoder"][0].config
    assert (cfg["num_layers"], cfg["num_heads"], cfg["head_dim"], cfg["patch_size"]) == (
        t.num_layers, t.num_attention_heads, t.attention_head_dim, t.patch_size)
    vcfg = tiny_graphs["vae_decoder"][0].config
    assert vcfg["scale_factor"] == 8 and len(vcfg["latents_std"]) == vcfg["latent_channels"]


def test_wrappers_equal_diffusers_alt_config(alt_models) -> None:
    """Torch-level: the wrappers compute exactly what the diffusers model (and its KV cache) does."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    m = alt_models["transformer"]
    c = m.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, c.in_channels, 5, 7, generator=g)
    n = 35 // c.patch_size ** 2
    text = torch.randn(2, 6, c.text_embed_dim, generator=g)
    pid = torch.randint(0, c.prior_vq_quantizer_codebook_size, (2, n), generator=g)
    drop = torch.rand(2, n, generator=g) < 0.5
    t, size, crop = torch.tensor([999.0, 10.0]), torch.tensor([[40.0, 56.0]] * 2), torch.zeros(2, 2)
    ones = torch.ones(2, 6, dtype=torch.int64)
    cond = torch.randn(1, c.in_channels, 3, 4, generator=g)
    cond_ids = torch.randint(0, c.prior_vq_quantizer_codebook_size, (1, 12), generator=g)
    empty = torch.zeros(c.num_layers, 1, 0, c.num_attention_heads, c.attention_head_dim)
    with torch.no_grad():
        # no condition images (cond_len 0) is diffusers' call without a cache
        assert torch.equal(DitDecoder(m)(x, text, pid, drop, t, size, crop, ones, empty, empty),
                           m(x, text, pid, drop, t, size, crop, return_dict=False)[0])
        cache = GlmImageKVCache(c.num_layers)
        cache.set_mode("write")
        m(cond, text[:1, :0], cond_ids, torch.zeros_like(cond_ids, dtype=torch.bool), torch.zeros(1),
          torch.tensor([[24, 32]]), torch.zeros(1, 2), kv_caches=cache)
        keys, values = DitConditionWrite(m)(cond, cond_ids, torch.tensor([[24.0, 32.0]]))
        for i in range(c.num_layers):
            assert torch.equal(keys[i], cache[i].k_caches[0]) and torch.equal(values[i], cache[i].v_caches[0])
        cache.set_mode("read")
        assert torch.equal(DitDecoder(m)(x, text, pid, drop, t, size, crop, ones, keys, values),
                           m(x, text, pid, drop, t, size, crop, return_dict=False, kv_caches=cache)[0])


# ---- text-to-image: ONNX only (numpy + onnxruntime) against diffusers' GlmImagePipeline ----------

def _glyph_inputs(pipe: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids + mask exactly as GlmImagePipeline._get_glyph_embeds builds them (host logic)."""
    ids = pipe.tokenizer(texts or [""], max_length=2048, truncation=True).input_ids
    pad = pipe.tokenizer.pad_token_id
    ids = [[pad] * ((len(ids) + 1) % 2) + row for row in ids]
    width = max(len(row) for row in ids)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in ids], dtype=np.int64)
    ids = np.array([r + [pad] * (width - len(r)) for r in ids], dtype=np.int64)
    return ids, mask


def _glyph_embeds(session: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    hidden = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return hidden[mask.astype(bool)][None]  # [1, total real tokens, d_model]


def _schedule(checkpoint: Path, steps: int, image_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and sigmas from diffusers' scheduler, computed as the pipeline does."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint / "scheduler")
    ts = np.linspace(sched.config.num_train_timesteps, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    mu = calculate_shift(image_seq_len, sched.config.base_image_seq_len, sched.config.base_shift,
                         sched.config.max_shift)
    timesteps, _ = retrieve_timesteps(sched, steps, "cpu", ts, ts / sched.config.num_train_timesteps, mu=mu)
    return timesteps.numpy().astype(np.float32), sched.sigmas.numpy().astype(np.float32)


def _onnx_t2i(graphs, latents: np.ndarray, cond: np.ndarray, uncond: np.ndarray, prior: np.ndarray,
              timesteps: np.ndarray, sigmas: np.ndarray, guidance: float, size: tuple[int, int],
              batched_cfg: bool) -> np.ndarray:
    """The pipeline's denoising loop + decode on dit_decoder and vae_decoder; returns [3, H, W] in [-1, 1]."""
    dit = _session(graphs["dit_decoder"][1])
    decoder = _session(graphs["vae_decoder"][1])
    vcfg = graphs["vae_decoder"][0].config
    n = prior.shape[1]
    target, crop = np.array([size], np.float32), np.zeros((1, 2), np.float32)
    c = graphs["dit_decoder"][0].config
    empty = np.zeros((c["num_layers"], 1, 0, c["num_heads"], c["head_dim"]), np.float32)  # no condition

    def predict(x: np.ndarray, text: np.ndarray, mask: np.ndarray, drop: np.ndarray, t: float) -> np.ndarray:
        rows = text.shape[0]
        return dit.run(None, {
            "hidden_states": np.repeat(x, rows, 0), "encoder_hidden_states": text,
            "prior_token_id": np.repeat(prior, rows, 0), "prior_token_drop": drop,
            "timestep": np.full((rows,), t - 1, np.float32),  # the pipeline feeds t - 1
            "target_size": np.repeat(target, rows, 0), "crop_coords": np.repeat(crop, rows, 0),
            "encoder_attention_mask": mask, "condition_keys": empty, "condition_values": empty})[0]

    if batched_cfg:
        # Both CFG branches in one batch: right-pad the shorter glyph sequence and mask it out.
        width = max(cond.shape[1], uncond.shape[1])
        text = np.zeros((2, width, cond.shape[2]), np.float32)
        mask = np.zeros((2, width), np.int64)
        for row, emb in enumerate((cond, uncond)):
            text[row, :emb.shape[1]] = emb[0]
            mask[row, :emb.shape[1]] = 1
        drop = np.array([[False] * n, [True] * n])
    x = latents.astype(np.float32)
    for i, t in enumerate(timesteps):
        if batched_cfg:
            pred_c, pred_u = np.split(predict(x, text, mask, drop, t), 2)
        else:
            pred_c = predict(x, cond, np.ones(cond.shape[:2], np.int64), np.zeros((1, n), bool), t)
            pred_u = predict(x, uncond, np.ones(uncond.shape[:2], np.int64), np.ones((1, n), bool), t)
        noise = pred_u + guidance * (pred_c - pred_u)
        x = (x + (sigmas[i + 1] - sigmas[i]) * noise).astype(np.float32)  # flow-match Euler step
    mean = np.array(vcfg["latents_mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(vcfg["latents_std"], np.float32).reshape(1, -1, 1, 1)
    return decoder.run(None, {"latents": x * std + mean})[0][0]


@pytest.mark.parametrize("batched_cfg", [False, True], ids=["two-calls", "batched-cfg-masked"])
def test_t2i_onnx_loop_equals_diffusers_pipeline(tiny_checkpoint: Path, tiny_graphs, batched_cfg: bool) -> None:
    from diffusers import GlmImagePipeline

    pipe = GlmImagePipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    prompt, height, width, steps, guidance = "a sign that says 'OPEN' and \"GLM\"", 64, 96, 4, 1.5
    f, p = pipe.vae_scale_factor, pipe.transformer.config.patch_size
    n = (height // f // p) * (width // f // p)
    g = torch.Generator().manual_seed(7)
    prior = torch.randint(0, pipe.transformer.config.prior_vq_quantizer_codebook_size, (1, n), generator=g)
    latents = torch.randn(1, pipe.transformer.config.in_channels, height // f, width // f, generator=g)
    with torch.no_grad():
        ref = pipe(prompt=prompt, prior_token_ids=prior, latents=latents.clone(), height=height, width=width,
                   num_inference_steps=steps, guidance_scale=guidance, output_type="np").images[0]

    glyph = _session(tiny_graphs["glyph_encoder"][1])
    cond = _glyph_embeds(glyph, *_glyph_inputs(pipe, pipe.get_glyph_texts(prompt)[0]))
    uncond = _glyph_embeds(glyph, *_glyph_inputs(pipe, []))
    assert cond.shape[1] > uncond.shape[1]  # the CFG branches really differ in length
    timesteps, sigmas = _schedule(tiny_checkpoint, steps, n)
    image = _onnx_t2i(tiny_graphs, latents.numpy(), cond, uncond, prior.numpy(), timesteps, sigmas,
                      guidance, (height, width), batched_cfg)
    image = np.clip(image / 2 + 0.5, 0, 1).transpose(1, 2, 0)  # the pipeline's postprocess
    assert image.shape == ref.shape == (height, width, 3)
    assert np.abs(image - ref).max() < 1e-4


# ---- image-to-image: condition write -> read against GlmImageKVCache ------------------------------

def test_i2i_write_read_equals_kv_cache(tiny_models, tiny_graphs) -> None:
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    m, v = tiny_models["transformer"], tiny_models["vae"]
    c = m.config
    f = 2 ** (len(v.config.block_out_channels) - 1)
    mean = torch.tensor(v.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(v.config.latents_std).view(1, -1, 1, 1)
    encoder = _session(tiny_graphs["vae_encoder"][1])
    write = _session(tiny_graphs["dit_condition_write"][1])
    dit = _session(tiny_graphs["dit_decoder"][1])
    g = torch.Generator().manual_seed(11)

    # Two condition images of different sizes for one sample (the host concatenates their K/V).
    cache = GlmImageKVCache(c.num_layers)
    cache.set_mode("write")
    keys, values = [], []
    for hh, ww in ((64, 96), (96, 32)):
        image = torch.rand(1, 3, hh, ww, generator=g) * 2 - 1
        with torch.no_grad():
            mode = v.encode(image).latent_dist.mode()
        got = encoder.run(None, {"sample": image.numpy()})[0]
        assert _rel(mode, got) < 1e-4
        latent = (torch.from_numpy(got) - mean) / std
        n = (hh // f // c.patch_size) * (ww // f // c.patch_size)
        ids = torch.randint(0, c.prior_vq_quantizer_codebook_size, (1, n), generator=g)
        with torch.no_grad():
            m(latent, torch.zeros(1, 0, c.text_embed_dim), ids, torch.zeros_like(ids, dtype=torch.bool),
              torch.zeros(1), torch.tensor([[hh, ww]]), torch.zeros(1, 2), kv_caches=cache)
        k, val = write.run(None, {"hidden_states": latent.numpy(), "prior_token_id": ids.numpy(),
                                  "target_size": np.array([[hh, ww]], np.float32)})
        keys.append(k)
        values.append(val)
    cache.next_sample()
    keys, values = np.concatenate(keys, axis=2), np.concatenate(values, axis=2)
    for i in range(c.num_layers):
        assert _rel(cache[i].k_caches[0], keys[i]) < 1e-4 and _rel(cache[i].v_caches[0], values[i]) < 1e-4

    # Target step, batch 2 sharing the one cached sample (cond batch 1 -> expanded).
    hh, ww = 64, 64
    lat = torch.randn(2, c.in_channels, hh // f, ww // f, generator=g)
    n = (hh // f // c.patch_size) * (ww // f // c.patch_size)
    text = torch.randn(2, 5, c.text_embed_dim, generator=g)
    ids = torch.randint(0, c.prior_vq_quantizer_codebook_size, (2, n), generator=g)
    t, size, crop = torch.tensor([700.0, 700.0]), torch.tensor([[hh, ww]] * 2).float(), torch.zeros(2, 2)
    feed = {"hidden_states": lat.numpy(), "encoder_hidden_states": text.numpy(), "prior_token_id": ids.numpy(),
            "timestep": t.numpy(), "target_size": size.numpy(), "crop_coords": crop.numpy(),
            "encoder_attention_mask": np.ones((2, 5), np.int64)}
    drop_c, drop_u = torch.zeros(2, n, dtype=torch.bool), torch.ones(2, n, dtype=torch.bool)
    with torch.no_grad():
        cache.set_mode("read")
        ref_cond = m(lat, text, ids, drop_c, t, size, crop, return_dict=False, kv_caches=cache)[0]
        cache.set_mode("skip")
        ref_uncond = m(lat, text, ids, drop_u, t, size, crop, return_dict=False, kv_caches=cache)[0]
    got_cond = dit.run(None, {**feed, "prior_token_drop": drop_c.numpy(),
                               "condition_keys": keys, "condition_values": values})[0]
    empty = np.zeros((c.num_layers, 1, 0, c.num_attention_heads, c.attention_head_dim), np.float32)
    got_uncond = dit.run(None, {**feed, "prior_token_drop": drop_u.numpy(),
                                "condition_keys": empty, "condition_values": empty})[0]
    assert _rel(ref_cond, got_cond) < 1e-4
    assert _rel(ref_uncond, got_uncond) < 1e-4
    # the condition really changes the prediction (the read pass is not a no-op)
    assert _rel(ref_cond, m(lat, text, ids, drop_c, t, size, crop, return_dict=False)[0].detach()) > 1e-3


def test_cpu_package_attention_takes_flash_when_unmasked(tiny_package: Path) -> None:
    """Each biased attention of a cpu package's DiT is an If (export.attention): unpadded text runs the
    flash branch, padded text the masked one, and both give the same step. The expanded
    [batch, 1, queries, keys] bias is built inside the masked branch only."""
    import json

    entry = json.loads((tiny_package / "manifest.json").read_text())["graphs"]["dit_decoder"]
    layers = entry["config"]["num_layers"]
    assert entry["ort_fusions"]["FlashWhenUnmasked"] == layers
    model = onnx.load(str(tiny_package / "dit_decoder.onnx"), load_external_data=False)
    branches = [n for n in model.graph.node if n.op_type == "If"]
    assert len(branches) == layers
    for node in branches:
        ops = {a.name: [n.op_type for n in a.g.node] for a in node.attribute}
        assert ops == {"then_branch": ["MultiHeadAttention"], "else_branch": ["Expand", "MultiHeadAttention"]}
    assert not [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    session = _session(tiny_package / "dit_decoder.onnx")
    cfg = entry["config"]
    feed = {k: v.numpy() for k, v in dit_decoder._step_inputs(cfg, 1, 3, 4, 5, torch.Generator().manual_seed(0)).items()}
    feed.update({k: v.numpy() for k, v in dit_decoder._condition(cfg, 1, 0, torch.Generator()).items()})
    padded = dict(feed)
    padded["encoder_hidden_states"] = np.concatenate(
        [feed["encoder_hidden_states"], np.ones_like(feed["encoder_hidden_states"][:, :3])], axis=1)
    padded["encoder_attention_mask"] = np.concatenate(
        [feed["encoder_attention_mask"], np.zeros_like(feed["encoder_attention_mask"][:, :3])], axis=1)
    flash, masked = session.run(None, feed)[0], session.run(None, padded)[0]
    assert _rel(masked, flash) < 1e-5
