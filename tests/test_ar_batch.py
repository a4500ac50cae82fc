"""The AR batch engine (runtime.ar_batch): generations that join and leave a running batch get
exactly the tokens they get alone; the pipeline's batch API goes through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from glm_image_onnx.manifest import Generation
from glm_image_onnx.runtime import ArBatching, GlmImageOnnxPipeline
from glm_image_onnx.runtime.ar_batch import ArBatchEngine
from glm_image_onnx.runtime.sampling import TokenSampler


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def pipe(tiny_package: Path) -> GlmImageOnnxPipeline:
    return GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False, ar_batching=ArBatching(enabled=False))


# (prompt, height, width, sampling, seed): different sizes (so different token counts and cache
# positions) and sampling settings
JOBS = [
    ("a sign that says 'OPEN'", 64, 64, Generation(temperature=0.8, top_p=0.9), 1),
    ("a red cat", 96, 64, Generation(temperature=1.2, top_p=1.0, top_k=7), 2),
    ("a lighthouse", 64, 128, Generation(do_sample=False), 3),
    ("a blue door", 128, 128, Generation(temperature=1.0, top_p=0.5), 4),
]


def _sampler(pipe: GlmImageOnnxPipeline, job: tuple) -> TokenSampler:
    return TokenSampler(job[3], pipe.codebook_size, job[4])


def test_rows_join_and_leave_a_running_batch_and_keep_their_tokens(pipe: GlmImageOnnxPipeline) -> None:
    inputs = [pipe.ar_inputs(p, height=h, width=w) for p, h, w, _, _ in JOBS]
    alone = [pipe.ar.generate(a.input_ids, a.prefill_positions, a.decode_positions, a.num_tokens,
                              _sampler(pipe, job)).tokens for a, job in zip(inputs, JOBS)]
    # A cache of 3 rows for 4 generations: the last one waits for a row to come free.
    engine = ArBatchEngine(pipe.ar, ArBatching(max_rows=3))
    futures: dict[int, object] = {}
    seen: dict[int, int] = {}

    def submit(i: int) -> None:
        a = inputs[i]
        futures[i] = engine.submit(a.input_ids, a.prefill_positions, a.decode_positions, a.num_tokens,
                                   _sampler(pipe, JOBS[i]), progress=lambda stage, done, total, i=i: on_token(i, done))

    def on_token(i: int, done: int) -> None:
        # Runs on the engine thread between steps: the joins below happen in the middle of a batch.
        seen[i] = done
        if i == 0 and done == 10:
            submit(1)
            submit(2)
        if i == 0 and done == 40:
            submit(3)  # no free row until one leaves
        if i == 2 and done == 30:
            raise Stop("cancelled half-way")  # generation 2 leaves; the others go on

    submit(0)
    futures[0].result(timeout=120)  # by its end it has submitted the others
    results = {i: futures[i].result(timeout=120) for i in (0, 1, 3)}
    with pytest.raises(Stop):
        futures[2].result(timeout=120)
    engine.close()
    assert seen[2] == 30
    for i, result in results.items():
        np.testing.assert_array_equal(result.tokens, alone[i], err_msg=f"generation {i}")
    assert results[0].batch_rows == 3 and results[1].batch_rows == 3  # they shared steps
    assert len(results[3].tokens) == inputs[3].num_tokens


def test_a_generation_needing_a_larger_cache_waits_for_the_rows_to_leave(pipe: GlmImageOnnxPipeline) -> None:
    small, large = pipe.ar_inputs("x", height=64, width=64), pipe.ar_inputs("y", height=512, width=512)
    engine = ArBatchEngine(pipe.ar, ArBatching(max_rows=4))
    sampler = TokenSampler(Generation(), pipe.codebook_size, 0)
    first = engine.submit(small.input_ids, small.prefill_positions, small.decode_positions, small.num_tokens, sampler)
    first.result(timeout=60)
    capacity = engine._cache.capacity
    # larger than the cache: reallocated once nothing runs, and the tokens are still the solo ones
    big = engine.generate(large.input_ids, large.prefill_positions, large.decode_positions, large.num_tokens,
                          TokenSampler(Generation(), pipe.codebook_size, 5))
    assert engine._cache.capacity > capacity
    solo = pipe.ar.generate(large.input_ids, large.prefill_positions, large.decode_positions, large.num_tokens,
                            TokenSampler(Generation(), pipe.codebook_size, 5))
    np.testing.assert_array_equal(big.tokens, solo.tokens)
    engine.close()
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(small.input_ids, small.prefill_positions, small.decode_positions, small.num_tokens, sampler)


def test_batch_calls_share_the_engine_and_equal_single_calls(tiny_package: Path, pipe: GlmImageOnnxPipeline) -> None:
    batched = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False)
    try:
        out = batched(["a red cat", "a sign that says 'OPEN'"], height=64, width=64, num_inference_steps=2, seed=11,
                      num_images_per_prompt=2)
        assert len(out.images) == 4 and out.seeds == [11, 12, 13, 14] and out.tokens.shape[0] == 4
        # diffusers' order: each prompt's images together; image i = the single call with seed 11 + i
        for i, prompt in enumerate(["a red cat"] * 2 + ["a sign that says 'OPEN'"] * 2):
            one = pipe(prompt, height=64, width=64, num_inference_steps=2, seed=11 + i)
            np.testing.assert_array_equal(out.tokens[i], one.tokens)
            np.testing.assert_array_equal(np.asarray(out.images[i]), np.asarray(one.images[0]))
        with pytest.raises(ValueError, match="seed: 3 seeds for 2 images"):
            batched(["a", "b"], height=64, width=64, seed=[1, 2, 3])
        with pytest.raises(ValueError, match="num_images_per_prompt"):
            batched("a", num_images_per_prompt=0)
    finally:
        batched.close()


def test_a_static_shapes_package_shares_steps_too(cann_packages: dict[str, Path]) -> None:
    """cann: every row writes by its own `cache_position` into a bucketed capacity."""
    pipe = GlmImageOnnxPipeline.from_package(cann_packages["fp32"], verify_files=False,
                                             ar_batching=ArBatching(enabled=False))
    jobs = JOBS[:2]
    inputs = [pipe.ar_inputs(p, height=h, width=w) for p, h, w, _, _ in jobs]
    alone = [pipe.ar.generate(a.input_ids, a.prefill_positions, a.decode_positions, a.num_tokens,
                              _sampler(pipe, job)).tokens for a, job in zip(inputs, jobs)]
    engine = ArBatchEngine(pipe.ar, ArBatching(max_rows=2))
    second = []

    def on_token(stage: str, done: int, total: int) -> None:
        if done == 5:  # joins the running row
            a = inputs[1]
            second.append(engine.submit(a.input_ids, a.prefill_positions, a.decode_positions, a.num_tokens,
                                        _sampler(pipe, jobs[1])))

    a = inputs[0]
    first = engine.generate(a.input_ids, a.prefill_positions, a.decode_positions, a.num_tokens,
                            _sampler(pipe, jobs[0]), on_token)
    result = second[0].result(timeout=120)
    engine.close()
    np.testing.assert_array_equal(first.tokens, alone[0])
    np.testing.assert_array_equal(result.tokens, alone[1])
    assert first.batch_rows == 2


def test_a_failing_decode_step_fails_its_rows_and_the_engine_goes_on(pipe: GlmImageOnnxPipeline) -> None:
    a = pipe.ar_inputs("x", height=64, width=64)
    engine = ArBatchEngine(pipe.ar, ArBatching(max_rows=2))

    def broken(logits: np.ndarray) -> np.ndarray:
        if broken.calls == 3:  # the prefill's token, then two decode steps
            raise RuntimeError("sampler broke")
        broken.calls += 1
        return np.zeros(len(logits), np.int64)

    broken.calls = 0
    with pytest.raises(RuntimeError, match="sampler broke"):
        engine.generate(a.input_ids, a.prefill_positions, a.decode_positions, a.num_tokens, broken)
    assert engine.active_rows == 0
    sampler = lambda: TokenSampler(Generation(), pipe.codebook_size, 9)  # noqa: E731
    again = engine.generate(a.input_ids, a.prefill_positions, a.decode_positions, a.num_tokens, sampler())
    solo = pipe.ar.generate(a.input_ids, a.prefill_positions, a.decode_positions, a.num_tokens, sampler())
    np.testing.assert_array_equal(again.tokens, solo.tokens)
    engine.close()


@pytest.mark.parametrize("batching", [False, True], ids=["alone", "engine"])
def test_the_feed_observer_sees_every_call_as_it_is_fed(tiny_package: Path, batching: bool) -> None:
    """observe_feeds: each graph call, the AR steps through either path included, with its inputs
    as the session gets them (the decode steps' input_ids are the tokens sampled before them)."""
    pipe = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False,
                                             ar_batching=ArBatching(enabled=batching))
    seen: dict[str, list[dict[str, np.ndarray]]] = {}

    def observer(graph: str, feeds) -> None:
        feed = feeds()
        seen.setdefault(graph, []).append({k: np.array(v, copy=True) for k, v in feed.items()})

    pipe.observe_feeds(observer)
    try:
        out = pipe("a sign that says 'OPEN'", height=64, width=64, num_inference_steps=3, seed=5)
    finally:
        pipe.close()
    assert {g: len(v) for g, v in seen.items() if g != "ar_planner"} == \
        {"glyph_encoder": 2, "dit_decoder": 3, "vae_decoder": 1}
    ar = seen["ar_planner"]
    inputs = {i.name for i in pipe.sessions["ar_planner"].get_inputs()}
    assert all(set(f) == inputs for f in ar)
    decodes = [f for f in ar if f["input_ids"].shape == (1, 1)]
    assert len(decodes) == len(out.tokens) - 1  # the last token needs no forward pass
    np.testing.assert_array_equal([int(f["input_ids"][0, 0]) for f in decodes], out.tokens[:-1])
    past = pipe.ar.past_names[0]
    assert ar[0][past].shape[0] == 1 and ar[0][past].shape[2] >= ar[0]["input_ids"].shape[1]
    dit = seen["dit_decoder"]
    assert [float(f["timestep"][0]) for f in dit] == sorted((float(f["timestep"][0]) for f in dit), reverse=True)
