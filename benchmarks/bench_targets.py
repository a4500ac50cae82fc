"""What a target package gives against the fp32 CPU package of the same checkpoint, on this machine.

For each package: the placement check on its target's provider (nodes that would fall back), its
size, and the quality report of `glm-image-onnx quantize` (AR teacher-forced top-1 over greedy
decoding, image PSNR/SSIM at fixed AR tokens and latents, free-running PSNR) run under the CPU EP.
bf16 packages cannot run on the CPU (no bfloat16 kernels): they get the placement check and sizes
only; scripts/check_cuda.sh measures them on a GPU.

    python benchmarks/bench_targets.py --reference out/bench-onnx --packages out/bench-cuda-fp16 out/bench-cuda-bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from glm_image_onnx.export.placement import check_package
from glm_image_onnx.quantize.package import QuantizeOptions, evaluate
from glm_image_onnx.manifest import Manifest, to_json
from glm_image_onnx.targets import get_target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="the fp32 cpu package")
    ap.add_argument("--packages", type=Path, nargs="+", required=True)
    ap.add_argument("--eval-prompts", type=int, default=3)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    rows = []
    for path in args.packages:
        manifest = Manifest.read(path)
        target = manifest.target
        provider = get_target(target.name).provider
        falling = sum(len(r.problems) for r in check_package(path, provider))
        row = {"package": str(path), "target": to_json(target), "falls_back": falling,
               "mb": sum(f.bytes for f in manifest.files.values()) / 1e6}
        if target.dtype != "bf16":
            t0 = time.perf_counter()
            options = QuantizeOptions(eval_prompts=args.eval_prompts, height=args.height, width=args.width,
                                      steps=args.steps)
            report = evaluate(args.reference.resolve(), path.resolve(), list(manifest["graphs"]), options,
                              lambda m: print(m, file=sys.stderr))
            e2e, ar = report["end_to_end"], report.get("ar_planner", {})
            row.update({"psnr_fixed_db": e2e["fixed_tokens"]["psnr_db_min"], "ssim_fixed": e2e["fixed_tokens"]["ssim_min"],
                        "psnr_free_db": e2e["free_running"]["psnr_db_min"], "top1_pct": 100 * ar["top1_agreement"] if "top1_agreement" in ar else None,
                        "graph_rel_l2": {g: v.get("worst_rel_l2") for g, v in report["graphs"].items()},
                        "seconds": round(time.perf_counter() - t0, 1)})
        rows.append(row)
    print("| package | target | falls back on its provider | MB | PSNR fixed (dB) | SSIM fixed | PSNR free (dB) | AR top-1 % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        def f(key: str, fmt: str) -> str:
            return format(r[key], fmt) if r.get(key) is not None else "-"
        print(f"| {Path(r['package']).name} | {r['target']['name']} {r['target']['dtype']} | {r['falls_back']} | "
              f"{r['mb']:.1f} | {f('psnr_fixed_db', '.2f')} | {f('ssim_fixed', '.4f')} | {f('psnr_free_db', '.2f')} | "
              f"{f('top1_pct', '.1f')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
