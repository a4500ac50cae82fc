"""The shipped demo model (`models/demo/`) plans and paints the sign it is asked for, through the
runtime, an int8 package, both servers and diffusers' own pipeline on the checkpoint.

What is checked on each image, for two held-out words in two phrasings and four colours:
- the AR planner's target grid is the sign's layout exactly (the word spelt letter by letter in its
  cells, the band in the named colours);
- the oracle reads the named sign and letter colours;
- the letters drawn are nearer the asked-for word than 20 random words of its length
  (`demo_scene.letter_row_rank`), so a DiT that draws another word, or none, fails.
The demo model's letters are not yet reliably legible to OCR (benchmarks/README.md: bench_ocr), so
no test asserts an exact OCR reading of a generated image; the oracle itself is tested on renders.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import build_package
from glm_image_onnx.models import demo_scene as scene
from glm_image_onnx.runtime import GlmImageOnnxPipeline

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
STEPS = 20
CASES = scene.SMOKE_CASES
PREVIEW = 16 * 16


def assert_sign(image: Image.Image, sign: scene.Sign, tokens: np.ndarray | None = None) -> None:
    if tokens is not None:
        assert np.array_equal(np.asarray(tokens)[PREVIEW:PREVIEW + scene.GRID ** 2], sign.layout().ravel())
    assert scene.read_colours(image) == (sign.bg, sign.fg)
    assert scene.letter_row_rank(image, sign) == 0


@pytest.fixture(scope="module")
def demo_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_package(DEMO, tmp_path_factory, "demo-onnx")


def generate(package: Path, seed: int = 0) -> list[Any]:
    pipe = GlmImageOnnxPipeline.from_package(package)
    try:
        return [pipe(p, height=scene.SIZE, width=scene.SIZE, num_inference_steps=STEPS, seed=seed) for p, _ in CASES]
    finally:
        pipe.close()


def test_the_oracle_reads_ground_truth_and_tells_words_apart() -> None:
    for _, sign in CASES:
        image = sign.render()
        assert scene.read_word(image) == sign.word and scene.read_colours(image) == (sign.bg, sign.fg)
        assert scene.letter_row_rank(image, sign) == 0
    # Another word of the same length on the same sign is not taken for the asked-for one.
    sign = CASES[0][1]
    assert scene.letter_row_rank(scene.Sign("QUIZ", sign.bg, sign.fg).render(), sign) > 0


def test_runtime_draws_the_signs(demo_package: Path) -> None:
    for out, (_, sign) in zip(generate(demo_package), CASES):
        assert_sign(out.images[0], sign, out.tokens)


def test_int8_package_draws_the_signs(demo_package: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo-int8"
    subprocess.run([sys.executable, "-m", "glm_image_onnx.cli", "quantize", str(demo_package), str(out),
                    "--recipe", "int8-dynamic", "--eval-prompts", "1"], check=True, capture_output=True)
    for result, (_, sign) in zip(generate(out), CASES):
        assert_sign(result.images[0], sign, result.tokens)


def test_servers_draw_the_signs(demo_package: Path) -> None:
    """gRPC through tritonclient (image and tokens), HTTP through the openai SDK (the same image)."""
    import openai

    from _server_helpers import glm_inputs, outputs, start_server, tritonclient_grpc as grpcclient

    srv = start_server(demo_package)
    try:
        with grpcclient.InferenceServerClient(srv.url) as c:
            results = [c.infer("glm_image", glm_inputs(prompt=p, seed=0, steps=STEPS, height=scene.SIZE,
                                                       width=scene.SIZE), outputs=outputs("image", "tokens"))
                       for p, _ in CASES]
        client = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="unused", max_retries=0)
        answers = [client.images.generate(prompt=p, size=f"{scene.SIZE}x{scene.SIZE}",
                                          extra_body={"seed": 0, "steps": STEPS}) for p, _ in CASES]
    finally:
        srv.stop()
    for result, answer, (_, sign) in zip(results, answers, CASES):
        image = Image.fromarray(result.as_numpy("image").reshape(scene.SIZE, scene.SIZE, 3))
        assert_sign(image, sign, result.as_numpy("tokens").ravel())
        http_image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB")
        assert np.array_equal(np.asarray(http_image), np.asarray(image))


def test_runtime_matches_diffusers_on_the_demo_checkpoint(demo_package: Path) -> None:
    """Greedy AR and the same latents: identical tokens and the image within one 8-bit level, as on
    the random checkpoints."""
    from conftest import greedy_reference
    from test_runtime_parity import _compare

    pipe = GlmImageOnnxPipeline.from_package(demo_package)
    ours = _compare(greedy_reference(DEMO), pipe, CASES[0][0], scene.SIZE, scene.SIZE, steps=STEPS)
    assert_sign(ours.images[0], CASES[0][1], ours.tokens)


def test_diffusers_draws_the_signs() -> None:
    """diffusers' GlmImagePipeline on the shipped checkpoint (greedy AR, its own latents)."""
    import torch

    from conftest import greedy_reference

    pipe = greedy_reference(DEMO)
    for i, (prompt, sign) in enumerate(CASES):
        image = pipe(prompt, height=scene.SIZE, width=scene.SIZE, num_inference_steps=STEPS,
                     generator=torch.Generator().manual_seed(i)).images[0]
        assert_sign(image, sign, pipe.generated[-1].numpy())
