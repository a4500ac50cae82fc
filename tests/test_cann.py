"""The cann target: graphs of basic ai.onnx ops on CANN graph mode's whitelist, shapes that stay put.

No NPU here: the placement check reads onnxruntime-cann's whitelist (export/kernels/cann.json), the
packages run under the CPU EP (parity with diffusers for fp32 is in test_runtime_parity.py), and the
input shapes each graph receives are counted from the bindings the runtime hands onnxruntime.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
import numpy as np
import onnx
import pytest
import torch

from conftest import manifest_of

from glm_image_onnx.cli import main
from glm_image_onnx.export.package import ExportOptions, export_package
from glm_image_onnx.export.placement import check_package
from glm_image_onnx.runtime import GlmImageOnnxPipeline
from glm_image_onnx.runtime.shapes import ShapeBuckets, record_shapes
from glm_image_onnx.manifest import Target
from glm_image_onnx.targets import SHAPE_BUCKETS


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cann_package_is_basic_ops_with_buckets_and_a_scattered_cache(cann_packages: dict[str, Path], dtype: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    path = cann_packages[dtype]
    m = manifest_of(path)
    assert m["target"] == {"name": "cann", "dtype": dtype, "shape_buckets": SHAPE_BUCKETS}
    kv = m["graphs"]["ar_planner"]["config"]["kv_cache"]
    assert kv["capacity"].startswith("capacity bucket") and kv["dtype"] == {"fp32": "float32", "fp16": "float16"}[dtype]
    assert [i["name"] for i in m["graphs"]["ar_planner"]["inputs"]][:3] == ["input_ids", "position_ids", "cache_position"]
    for name, graph in m["graphs"].items():
        model = onnx.load(str(path / graph["file"]))
        domains = {n.domain or "ai.onnx" for n in model.graph.node}
        assert domains == {"ai.onnx"}, (name, domains)
        assert not {"LayerNormalization", "GridSample", "Einsum"} & {n.op_type for n in model.graph.node}, name
        assert graph["verify"]["passed"], name  # each rewrite checked against PyTorch at export
    ar = onnx.load(str(path / "ar_planner.onnx"))
    producers = {o: n for n in ar.graph.node for o in n.output}
    assert all(producers[o.name].op_type == "ScatterND" for o in ar.graph.output if o.name.startswith("present."))
    assert main(["check", str(path), "--provider", "cann"]) == 0
    assert capsys.readouterr().out.count("run on CANNExecutionProvider") == 7


def test_check_cann_lists_the_contrib_ops_of_a_cpu_package(tiny_package: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(tiny_package), "--provider", "cann"]) == 1
    out = capsys.readouterr().out
    for op in ("GroupQueryAttention", "RotaryEmbedding", "MultiHeadAttention", "FastGelu", "LayerNormalization"):
        assert op in out, op


def test_a_held_out_config_exports_for_cann_with_no_fallback(tmp_path: Path) -> None:
    """Sizes no other test uses: grouped heads 6:1, full rotary, odd DiT heads, 3 VAE layers per block."""
    from glm_image_onnx.models.checkpoint import write_checkpoint
    from glm_image_onnx.models.presets import TINY

    preset = TINY.with_changes(
        name="held-out",
        ar=replace(TINY.ar, hidden_size=96, num_heads=6, num_kv_heads=1, mrope_section=(4, 2, 2),
                   partial_rotary_factor=1.0, vision_hidden=48, vision_heads=3),
        dit=replace(TINY.dit, num_heads=3, head_dim=8),
        vae=replace(TINY.vae, block_out_channels=(8, 8, 16, 16), norm_num_groups=2, layers_per_block=3),
    )
    ckpt = write_checkpoint(preset, tmp_path / "ckpt", seed=7)
    out = tmp_path / "held-out-cann"
    export_package(ckpt, out, ExportOptions(verify=True, target="cann", dtype="fp16"), log=lambda _: None)
    reports = check_package(out, "cann")
    assert len(reports) == 7 and all(not r.problems for r in reports), [r.summary() for r in reports]
    image = GlmImageOnnxPipeline.from_package(out)("a 'sign'", height=64, width=64, num_inference_steps=1, seed=0)
    assert np.asarray(image.images[0]).std() > 0


def test_fp16_cann_package_keeps_quality_at_fixed_tokens(cann_packages: dict[str, Path], tiny_package: Path) -> None:
    from glm_image_onnx.quantize import quality

    ref = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False)
    got = GlmImageOnnxPipeline.from_package(cann_packages["fp16"], verify_files=False)
    prompts = ["a poster that says 'HELLO'", "a red cat"]
    ar, priors = quality.ar_agreement(ref, got, prompts, 128, 128)
    # The bench preset gives >= 97% (benchmarks/bench_targets.py); tiny's near-tied random logits
    # flip a few more.
    assert ar["top1_agreement"] >= 0.95, ar
    report = quality.end_to_end(ref, got, prompts, priors, 128, 128, 3, seed=0, free_running=False)
    assert report["fixed_tokens"]["nonfinite"] == 0
    assert report["fixed_tokens"]["psnr_db_min"] >= 35.0, report


# ------------------------------------------------------------------------------- shape sets
def test_a_1024px_generation_gives_each_graph_a_few_shape_sets(cann_packages: dict[str, Path]) -> None:
    pipe = GlmImageOnnxPipeline.from_package(cann_packages["fp32"], verify_files=False)
    seen = record_shapes(pipe)
    for prompt in ("a 'GLM' sign", "a much longer prompt about a shop front whose sign says 'OPEN 24 HOURS'"):
        out = pipe(prompt, height=1024, width=1024, num_inference_steps=2, seed=0)
        assert out.images[0].size == (1024, 1024)
    calls = [dict(s) for s in seen["ar_planner"]]
    prefill = [c for c in calls if c["input_ids"][1] > 1]
    decode = [tuple(sorted(c.items())) for c in calls if c["input_ids"][1] == 1]
    assert len(prefill) == 2 and len(decode) == 2 * 1279  # 1280 tokens each: the last needs no call
    assert len(set(decode)) == 1  # every step of both generations: one shape set
    assert all(c["input_ids"][1] in SHAPE_BUCKETS["prompt"] for c in prefill)
    assert dict(decode[0])["past_key_values.0.key"][2] in SHAPE_BUCKETS["capacity"]
    assert len(set(seen["dit_decoder"])) == 1 and len(seen["dit_decoder"]) == 4  # one set for the resolution
    assert len(set(seen["vae_decoder"])) == 1
    assert len(set(seen["glyph_encoder"])) == 1  # one text each and the empty negative, one bucket
    # Without buckets (a cpu package) the prefill follows the prompt length.
    cpu_like = ShapeBuckets()
    assert cpu_like.pad("prompt", 77) == 77 and not cpu_like.static


def test_bucket_errors_name_the_length_and_the_fix() -> None:
    buckets = ShapeBuckets.from_manifest(Target("cann", "fp16", SHAPE_BUCKETS))
    assert buckets.pad("prompt", 65) == 128 and buckets.pad("capacity", 1281 + 128) == 2048
    assert buckets.prefill(65) == (128, 128) and buckets.prefill(4100) == (4608, 512)  # chunks past 512
    with pytest.raises(ValueError, match="capacity length 70000 exceeds .* largest capacity bucket .65536.; re-export"):
        buckets.pad("capacity", 70000)
    with pytest.raises(ValueError, match="shape_buckets.glyph must be an ascending list"):
        ShapeBuckets.from_manifest(Target("cann", "fp16", {**SHAPE_BUCKETS, "glyph": [64, 16]}))
    with pytest.raises(ValueError, match="must list prompt, capacity, glyph, dit_text"):
        ShapeBuckets.from_manifest(Target("cann", "fp16", {"prompt": [64]}))


def test_a_prompt_past_the_largest_bucket_is_prefilled_in_chunks(cann_packages: dict[str, Path],
                                                                  tiny_package: Path) -> None:
    from glm_image_onnx.manifest import Generation
    from glm_image_onnx.runtime.sampling import TokenSampler

    def greedy(p: GlmImageOnnxPipeline) -> TokenSampler:
        return TokenSampler(Generation(do_sample=False), p.codebook_size, seed=0)

    ref = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False)
    pipe = GlmImageOnnxPipeline.from_package(cann_packages["fp32"], verify_files=False)
    pipe.ar.buckets = ShapeBuckets({**pipe.buckets.buckets, "prompt": (8, 16)})  # tiny's prompts: ~3 chunks
    seen = record_shapes(pipe)
    prompt = "a shop sign that says 'OPEN 24h'"
    want = ref.generate_prior_tokens(prompt, height=64, width=96, sampler=greedy(ref))[0]
    got = pipe.generate_prior_tokens(prompt, height=64, width=96, sampler=greedy(pipe))[0]
    assert np.array_equal(want, got)
    prefill = [dict(c) for c in seen["ar_planner"] if dict(c)["input_ids"][1] > 1]
    assert len(prefill) >= 2 and all(c["input_ids"] == (1, 16) for c in prefill)


# ----------------------------------------------------------------- the rewrites, in PyTorch
def test_static_cache_decoder_matches_the_gqa_wrapper_through_prefill_and_decode(tiny_checkpoint: Path) -> None:
    """`StaticCacheDecoder` (ScatterND, masked MatMul attention, basic rotary) against `ArPlannerDecoder`
    (whose contrib-op references test_export_ar.py checks against transformers), with a padded prompt."""
    from transformers import GlmImageForConditionalGeneration

    from glm_image_onnx.models.ar_wrappers import ArPlannerDecoder, StaticCacheDecoder

    model = GlmImageForConditionalGeneration.from_pretrained(tiny_checkpoint / "vision_language_encoder").eval()
    gqa, static = ArPlannerDecoder(model), StaticCacheDecoder(model)
    tc = model.config.text_config
    layers, kvh = tc.num_hidden_layers, tc.num_key_value_heads
    head = tc.hidden_size // tc.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    prompt, pad, steps, capacity = 7, 5, 4, 32
    ids = torch.randint(0, tc.vocab_size, (1, prompt + steps), generator=gen)
    pos = torch.arange(prompt + steps).view(1, 1, -1).repeat(3, 1, 1)
    pos[1:, :, 3:] += 2  # distinct mRoPE axes
    cache_g = [torch.zeros(1, kvh, prompt + steps, head) for _ in range(2 * layers)]
    cache_s = [torch.full((1, kvh, capacity, head), 0.0) for _ in range(2 * layers)]
    with torch.no_grad():
        out_g = gqa(ids[:, :prompt], pos[:, :, :prompt], torch.tensor([prompt - 1], dtype=torch.int32),
                    torch.tensor(prompt, dtype=torch.int32), *cache_g)
        padded_ids = torch.cat([ids[:, :prompt], ids[:, prompt - 1:prompt].repeat(1, pad)], dim=1)
        padded_pos = torch.cat([pos[:, :, :prompt], pos[:, :, prompt - 1:prompt].repeat(1, 1, pad)], dim=2)
        out_s = static(padded_ids, padded_pos, torch.arange(prompt + pad).view(1, -1), *cache_s)
        assert torch.allclose(out_g[0], out_s[0][:, :prompt], atol=1e-5)
        cache_g, cache_s = list(out_g[1:]), list(out_s[1:])
        for step in range(steps):
            at = prompt + step
            out_g = gqa(ids[:, at:at + 1], pos[:, :, at:at + 1], torch.tensor([at], dtype=torch.int32),
                        torch.tensor(at + 1, dtype=torch.int32), *cache_g)
            out_s = static(ids[:, at:at + 1], pos[:, :, at:at + 1], torch.tensor([[at]]), *cache_s)
            assert torch.allclose(out_g[0], out_s[0], atol=1e-5), step
            cache_g, cache_s = list(out_g[1:]), list(out_s[1:])


def test_basic_vision_tokenizer_gives_the_models_ids(tiny_checkpoint: Path) -> None:
    from transformers import GlmImageForConditionalGeneration

    from glm_image_onnx.export.vision_tokenizer import random_inputs, vision_sizes
    from glm_image_onnx.models.ar_wrappers import BasicVisionTokenizer, VisionTokenizer

    model = GlmImageForConditionalGeneration.from_pretrained(tiny_checkpoint / "vision_language_encoder").eval()
    sizes = vision_sizes(model)
    gen = torch.Generator().manual_seed(3)
    for h, w in ((4, 6), (9, 3), (1, 1)):  # smaller and larger than the position table, one patch
        inputs = random_inputs(sizes, h, w, gen)
        with torch.no_grad():
            assert torch.equal(VisionTokenizer(model)(*inputs.values()), BasicVisionTokenizer(model)(*inputs.values()))


def test_quantize_refuses_a_cann_package(cann_packages: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", str(cann_packages["fp32"]), str(tmp_path / "q"), "--recipe", "int4-weight"]) != 0
    err = capsys.readouterr().err
    assert "recipe int4-weight does not run on target cann: the CANN EP has no quantisation kernels" in err
    assert not (tmp_path / "q").exists()


def test_the_server_serves_a_cann_package_like_the_in_process_pipeline(cann_packages: dict[str, Path]) -> None:
    from _server_helpers import glm_inputs, outputs, start_server, tritonclient_grpc

    package = cann_packages["fp16"]
    srv = start_server(package)
    try:
        with tritonclient_grpc.InferenceServerClient(srv.url) as client:
            config = client.get_model_config("glm_image", as_json=True)["config"]
            assert config["parameters"]["target"]["string_value"].startswith("cann")
            result = client.infer("glm_image", glm_inputs(prompt="a 'sign'", height=64, width=96, steps=2, seed=5),
                                  outputs=outputs("image"), client_timeout=60)
            ar = client.get_model_metadata("ar_planner", as_json=True)
            assert "cache_position" in [i["name"] for i in ar["inputs"]]
    finally:
        srv.stop()
    local = GlmImageOnnxPipeline.from_package(package, verify_files=False)("a 'sign'", height=64, width=96,
                                                                           num_inference_steps=2, seed=5)
    assert np.array_equal(result.as_numpy("image"), np.asarray(local.images[0]))
