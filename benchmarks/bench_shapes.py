"""Input-shape sets per graph, and stage times, of packages generating the same requests (CPU EP).

CANN graph mode compiles once per input-shape set, so a cann package must keep the count small;
this counts the sets each graph receives over a few text-to-image requests of one resolution with
prompts of different lengths (`runtime.shapes.record_shapes`), next to the stage times of each
package under the CPU EP (what the static shapes and unfused ops cost where nothing compiles).
Each package runs in a fresh process, --runs times; times are medians.

    python benchmarks/bench_shapes.py --packages out/bench-onnx out/bench-cann-fp32 --size 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import median

PROMPTS = ("a 'GLM' sign", "a much longer prompt about a shop front whose sign says 'OPEN 24 HOURS' in red")


def one_run(package: str, size: int, steps: int) -> dict:
    from glm_image_onnx.runtime import GlmImageOnnxPipeline
    from glm_image_onnx.runtime.shapes import record_shapes

    pipe = GlmImageOnnxPipeline.from_package(package, verify_files=False)
    seen = record_shapes(pipe)
    timings = [pipe(p, height=size, width=size, num_inference_steps=steps, seed=0).timings.as_dict() for p in PROMPTS]
    return {"sets": {g: len(set(calls)) for g, calls in seen.items() if calls},
            "calls": {g: len(calls) for g, calls in seen.items() if calls},
            "timings": {k: median(t[k] for t in timings) for k in timings[0]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packages", nargs="+")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per package")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child, args.size, args.steps)))
        return 0
    if not args.packages:
        ap.error("--packages is required")
    rows = []
    for package in args.packages:
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "--child", package, "--size", str(args.size),
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.splitlines()[-1]))
        t = {k: median(r["timings"][k] for r in runs) for k in runs[0]["timings"]}
        rows.append((Path(package).name, runs[0]["sets"], runs[0]["calls"], t))
        print(f"{Path(package).name}: {runs[0]['sets']}", file=sys.stderr)
    graphs = sorted({g for _, sets, _, _ in rows for g in sets})
    print(f"{len(PROMPTS)} text-to-image requests at {args.size}x{args.size}, {args.steps} steps; "
          f"median of {args.runs} fresh processes")
    print("| package | " + " | ".join(f"{g} sets (calls)" for g in graphs)
          + " | AR ms/token | AR prefill ms | DiT s/step | VAE s |")
    print("|---|" + "---|" * (len(graphs) + 4))
    for name, sets, calls, t in rows:
        print(f"| {name} | " + " | ".join(f"{sets.get(g, 0)} ({calls.get(g, 0)})" for g in graphs)
              + f" | {t['ar_per_token_s'] * 1e3:.2f} | {t['ar_prefill_s'] * 1e3:.1f} | {t['dit_per_step_s']:.2f} "
              f"| {t['vae_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
