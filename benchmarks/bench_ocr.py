"""OCR oracle for the demo model: does each package, recipe and server draw the words it is asked for?

Renders `demo_scene.benchmark_set` (held-out words, every phrasing, seeded colours) at 256x256 and
reads each image back with tesseract: exact-word accuracy, character accuracy (1 - edit distance /
length) and whether the sign and letter colours came out as named. The synthetic ground-truth
renders are read first, to show the OCR itself is not the limit. Every variant after the fp32
package also gets the image PSNR against fp32 at fixed AR tokens and initial latents (the fp32
package's tokens; what quantisation or a target's precision costs the DiT and VAE alone).

    python benchmarks/bench_ocr.py --checkpoint models/demo --work out/ocr-bench [--variants ...]

Variants: `cpu-fp32` (the reference, exported with --verify), the quantisation recipes
(`int8-dynamic`, `int8-static`, `int4-weight`, `fp16`: `glm-image-onnx quantize` on cpu-fp32), the
target packages the CPU EP can run (`cuda-fp16`, `cann-fp16`, `cann-fp32`), and the servers on
cpu-fp32 (`grpc`: tritonclient; `openai-http`: the openai SDK), whose images must also equal the
runtime's for the same seed. Missing packages are built under --work; existing ones are reused.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from glm_image_onnx.models import demo_scene as scene

SIZE = dict(height=scene.SIZE, width=scene.SIZE)
RECIPES = ("int8-dynamic", "int8-static", "int4-weight", "fp16")
TARGETS = {"cuda-fp16": ("cuda", "fp16"), "cann-fp16": ("cann", "fp16"), "cann-fp32": ("cann", "fp32")}
SERVERS = ("grpc", "openai-http")
ALL = ("cpu-fp32", *RECIPES, *TARGETS, *SERVERS)


def latents_for(i: int, channels: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).standard_normal((1, channels, scene.SIZE // 8, scene.SIZE // 8)
                                                            ).astype(np.float32)


def build(name: str, checkpoint: Path, work: Path) -> Path:
    """The package of variant `name` under `work`, built with the CLI when missing."""
    out = work / name
    if out.exists():
        return out
    cli = [sys.executable, "-m", "glm_image_onnx.cli"]
    if name == "cpu-fp32":
        cmd = [*cli, "export", str(checkpoint), str(out), "--verify"]
    elif name in RECIPES:
        cmd = [*cli, "quantize", str(build("cpu-fp32", checkpoint, work)), str(out), "--recipe", name]
    else:
        target, dtype = TARGETS[name]
        cmd = [*cli, "export", str(checkpoint), str(out), "--target", target, "--dtype", dtype]
    print("building", name, ":", " ".join(cmd[2:]), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


class Reference:
    """The fp32 package's images, AR prior tokens and initial latents, per benchmark prompt."""

    def __init__(self, package: Path, prompts: list[str], steps: int) -> None:
        from glm_image_onnx.runtime import GlmImageOnnxPipeline

        self.pipe = GlmImageOnnxPipeline.from_package(package)
        self.steps = steps
        self.latents = [latents_for(i, self.pipe.latent_channels) for i in range(len(prompts))]
        self.outputs = [self.pipe(p, seed=i, latents=lat, num_inference_steps=steps, **SIZE)
                        for i, (p, lat) in enumerate(zip(prompts, self.latents))]
        self.reference_fixed: list[np.ndarray] | None = None  # its own fixed-token images, made once

    def fixed(self, pipe: Any, prompts: list[str]) -> list[np.ndarray]:
        """`pipe`'s images from the reference's AR tokens and latents (DiT, glyph encoder, VAE alone)."""
        from glm_image_onnx.quantize.quality import image_fixed

        return [image_fixed(pipe, p, o.prior_token_ids, lat, scene.SIZE, scene.SIZE, self.steps,
                            self.pipe.defaults.guidance_scale) for p, lat, o in zip(prompts, self.latents, self.outputs)]

    def psnr_fixed(self, package: Path, prompts: list[str]) -> list[float]:
        from glm_image_onnx.quantize.quality import psnr
        from glm_image_onnx.runtime import GlmImageOnnxPipeline

        if self.reference_fixed is None:
            self.reference_fixed = self.fixed(self.pipe, prompts)
        pipe = GlmImageOnnxPipeline.from_package(package)
        try:
            return [psnr(a, b) for a, b in zip(self.reference_fixed, self.fixed(pipe, prompts))]
        finally:
            pipe.close()


def run_package(package: Path, prompts: list[str], steps: int, channels: int) -> list[Image.Image]:
    from glm_image_onnx.runtime import GlmImageOnnxPipeline

    pipe = GlmImageOnnxPipeline.from_package(package)
    try:
        return [pipe(p, seed=i, latents=latents_for(i, channels), num_inference_steps=steps, **SIZE).images[0]
                for i, p in enumerate(prompts)]
    finally:
        pipe.close()


def run_server(kind: str, package: Path, prompts: list[str], steps: int) -> list[Image.Image]:
    """Each prompt through the real server on loopback (seed i), with the stock client."""
    from glm_image_onnx.server.app import ServerConfig, ServerThread

    srv = ServerThread(ServerConfig(package=package, host="127.0.0.1", port=0, http_port=0)).start()
    try:
        request = _grpc_request if kind == "grpc" else _openai_request
        return [request(srv, p, seed=i, steps=steps) for i, p in enumerate(prompts)]
    finally:
        srv.stop()


def _grpc_request(srv: Any, prompt: str, *, seed: int, steps: int) -> Image.Image:
    import tritonclient.grpc as grpcclient

    from glm_image_onnx.server.client import build_inputs

    with grpcclient.InferenceServerClient(srv.url) as client:
        result = client.infer("glm_image", build_inputs(prompt, seed=seed, steps=steps, **SIZE),
                              outputs=[grpcclient.InferRequestedOutput("image")])
    return Image.fromarray(result.as_numpy("image").reshape(scene.SIZE, scene.SIZE, 3))


def _openai_request(srv: Any, prompt: str, *, seed: int, steps: int) -> Image.Image:
    import openai

    client = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="unused", max_retries=0)
    response = client.images.generate(model="glm_image", prompt=prompt, size=f"{scene.SIZE}x{scene.SIZE}",
                                      extra_body={"seed": seed, "steps": steps})
    return Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    return fn(), time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("models/demo"))
    ap.add_argument("--work", type=Path, default=Path("out/ocr-bench"), help="packages are built / reused here")
    ap.add_argument("--variants", nargs="+", choices=ALL, default=list(ALL))
    ap.add_argument("--prompts", type=int, default=54, help="how many of the benchmark prompts (>= 50 for the table)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write every number (and each reading) here too")
    args = ap.parse_args()
    bench = scene.benchmark_set(args.prompts)
    prompts, signs = [p for p, _ in bench], [s for _, s in bench]
    rows = [{"variant": "ground truth (synthetic renders)", **scene.score([s.render() for s in signs], signs)}]
    ref_pkg = build("cpu-fp32", args.checkpoint, args.work)
    ref, seconds = _timed(lambda: Reference(ref_pkg, prompts, args.steps))
    channels = ref.pipe.latent_channels
    rows.append({"variant": "cpu-fp32", **scene.score([o.images[0] for o in ref.outputs], signs),
                 "s_per_image": seconds / len(prompts)})
    for name in [v for v in args.variants if v != "cpu-fp32"]:
        print("variant", name, file=sys.stderr)
        if name in SERVERS:
            images, seconds = _timed(lambda: run_server(name, ref_pkg, prompts, args.steps))
            same = [ref.pipe(p, seed=i, num_inference_steps=args.steps, **SIZE).images[0] for i, p in enumerate(prompts)]
            equal = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, same)]
            rows.append({"variant": f"{name} (server, cpu-fp32)", **scene.score(images, signs),
                         "equal_to_runtime_pct": 100 * np.mean(equal), "s_per_image": seconds / len(prompts)})
            continue
        package = build(name, args.checkpoint, args.work)
        images, seconds = _timed(lambda: run_package(package, prompts, args.steps, channels))
        psnrs = ref.psnr_fixed(package, prompts)
        rows.append({"variant": name, **scene.score(images, signs), "s_per_image": seconds / len(prompts),
                     "psnr_fixed_median_db": statistics.median(psnrs), "psnr_fixed_min_db": min(psnrs)})
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"prompts": prompts, "words": [s.word for s in signs], "rows": rows},
                                        indent=1, default=float))
    return 0


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def f(row: dict[str, Any], key: str, fmt: str = ".1f") -> str:
        return format(row[key], fmt) if key in row else "-"

    print(f"\n{args.prompts} prompts, held-out words, 256x256, {args.steps} steps, CFG 1.5, sampled AR (seed = prompt index)\n")
    print("| variant | exact word % | characters % | colours % | PSNR vs fp32, fixed tokens: median / min (dB) | s / image |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        psnr = f"{f(r, 'psnr_fixed_median_db')} / {f(r, 'psnr_fixed_min_db')}" if "psnr_fixed_min_db" in r else (
            f"image = runtime's: {f(r, 'equal_to_runtime_pct', '.0f')}%" if "equal_to_runtime_pct" in r else "-")
        print(f"| {r['variant']} | {f(r, 'exact_pct')} | {f(r, 'char_pct')} | {f(r, 'colours_pct')} | {psnr} | "
              f"{f(r, 's_per_image', '.2f')} |")


if __name__ == "__main__":
    sys.exit(main())
