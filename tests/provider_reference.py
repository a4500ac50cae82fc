"""Reference outputs of the CPU pipeline, written by one environment and compared in another.

scripts/test_providers.sh runs this with .venv (onnxruntime, numpy 2) and the accelerated-provider
tests compare their own runs (onnxruntime-cann with numpy<2, onnxruntime-gpu) with it: the same
seeds must give the same AR tokens and images within one 8-bit level.

    python tests/provider_reference.py PACKAGE OUT.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PROMPT = 'a shop sign that says "OPEN"'


def generate(pipe) -> dict[str, np.ndarray]:  # noqa: ANN001 - a GlmImageOnnxPipeline
    sampled = pipe(PROMPT, height=64, width=96, num_inference_steps=3, seed=7)
    greedy = pipe(PROMPT, height=64, width=96, num_inference_steps=3, seed=7, do_sample=False)
    out = {"sampled_tokens": sampled.tokens, "sampled_image": np.asarray(sampled.images[0]),
           "greedy_tokens": greedy.tokens, "greedy_image": np.asarray(greedy.images[0])}
    if pipe.supports_image_to_image:
        edit = pipe("make it 'blue'", image=sampled.images[0], height=64, width=64, num_inference_steps=2, seed=1)
        out.update(edit_tokens=edit.tokens, edit_image=np.asarray(edit.images[0]))
    return out


def main(package: str, out: str) -> None:
    import onnxruntime as ort

    from glm_image_onnx.runtime import GlmImageOnnxPipeline

    arrays = generate(GlmImageOnnxPipeline.from_package(package))
    np.savez(out, **arrays, versions=np.array([f"onnxruntime {ort.__version__}, numpy {np.__version__}"]))
    print(f"wrote {Path(out)} ({', '.join(arrays)})", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
