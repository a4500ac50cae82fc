"""The device half of scripts/check_cuda.sh (in .venv-gpu, onnxruntime-gpu) and scripts/check_cann.sh
(in .venv-cann, onnxruntime-cann on an Ascend host): see there. `--provider cpu` is a dry run here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from glm_image_onnx.export.placement import observe
from glm_image_onnx.quantize import quality  # numpy only: PSNR and SSIM
from glm_image_onnx.runtime import GlmImageOnnxPipeline

PROMPT = "a shop sign that says 'OPEN'"
H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e; other GPUs: --bandwidth


def placement(package: Path, provider: str) -> None:
    """onnxruntime's own node assignment per graph (its verbose session log)."""
    manifest = json.loads((package / "manifest.json").read_text())
    for name, graph in manifest["graphs"].items():
        seen = observe(package / graph["file"], provider)
        cpu_ops = sorted(set(seen.pop("CPUExecutionProvider ops", [])))
        print(f"  placement {name}: {seen}" + (f"; on CPU: {', '.join(cpu_ops)}" if cpu_ops else ""))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--packages", type=Path, nargs="+", required=True)
    ap.add_argument("--quick", action="store_true", help="512x512 timings only")
    ap.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="device memory bytes/s (cuda)")
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cann", "cpu"],
                    help="cpu: a dry run of this script without a device (fp16 / fp32 packages)")
    args = ap.parse_args()
    ref = GlmImageOnnxPipeline.from_package(args.reference, provider="cpu", verify_files=False)
    prior = ref(PROMPT, height=512, width=512, num_inference_steps=2, seed=0, do_sample=False).prior_token_ids
    for package in args.packages:
        print(f"== {package}")
        placement(package, args.provider)
        pipe = GlmImageOnnxPipeline.from_package(package, provider=args.provider, strict=args.provider != "cpu",
                                                 verify_files=False)
        print(f"  sessions on: {sorted({p for s in pipe.sessions.values() for p in s.get_providers()})}; "
              f"AR cache buffers on {pipe.io_device('ar_planner')}, dtype {pipe.ar.cache_dtype}")
        e2e = quality.end_to_end(ref, pipe, [PROMPT], [prior], 512, 512, 8, seed=0, free_running=False)
        fixed = e2e["fixed_tokens"]
        print(f"  vs cpu fp32 at fixed tokens and latents (512x512, 8 steps): PSNR {fixed['psnr_db_min']:.2f} dB, "
              f"SSIM {fixed['ssim_min']:.4f}, non-finite {fixed['nonfinite']}")
        size = 512 if args.quick else 1024
        # Warm-up: cuDNN picks its algorithms; CANN graph mode compiles once per input-shape set.
        t0 = time.perf_counter()
        pipe(PROMPT, height=size, width=size, num_inference_steps=2, seed=1)
        print(f"  first {size}x{size} generation (2 steps, with warm-up / graph compiles): {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        out = pipe(PROMPT + " in the rain", height=size, width=size, num_inference_steps=50, seed=1)
        total = time.perf_counter() - t0
        t = out.timings
        ar_bytes = sum((package / f).stat().st_size for f in
                       [pipe.package.graphs["ar_planner"].file, *pipe.package.graphs["ar_planner"].external_data])
        floor_ms = ar_bytes / args.bandwidth * 1e3
        floor = (f" (weight-bandwidth floor {floor_ms:.4f} ms, {t.ar_per_token_s * 1e3 / floor_ms:.1f}x)"
                 if args.provider == "cuda" else "")
        print(f"  {size}x{size}, 50 steps (a longer prompt: same buckets, no new compile): total {total:.2f} s; "
              f"AR {t.ar_tokens} tokens, {t.ar_per_token_s * 1e3:.3f} ms/token{floor}, "
              f"prefill {t.ar_prefill_s * 1e3:.1f} ms; DiT {t.dit_per_step_s * 1e3:.2f} ms/step; "
              f"VAE {t.vae_s * 1e3:.1f} ms")
        del pipe
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GLM_IMAGE_ONNX_SPIN_US", "100")
    sys.exit(main())
