"""Real scale: checkpoints of every published width with few layers, exported and run at 1024-2048 px.

For each `--layers N` (N layers in each stack: AR planner, vision encoder, glyph encoder, DiT) this
builds `init-checkpoint --preset full --layers N`, exports it per `--dtypes` (wall time and the peak
RSS of the whole export process tree, sampled), and per package measures its size, the load time
(`from_package`, full sha256 check and cached check) and, per `--sizes`, one text-to-image request
(`--steps`) in a fresh process: stage times and peak RSS against the bound
`package weights + KV cache + 4 GB`. Everything runs in fresh processes.

Each measured quantity q is fitted as q = a + b * N over the layer counts and extrapolated to the
published stacks (AR planner 40, vision encoder 40, glyph encoder 12, DiT 30 layers): per graph for
export time and size, per stage for generation time. The formulas are printed with the numbers.

    python benchmarks/bench_scale.py --layers 1 2 --sizes 1024 2048 --steps 1 --dtypes fp32 --work out/scale
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Published layer count of the stack each graph / stage scales with (real-configs.md); VAE: none.
FULL_LAYERS = {"ar_planner": 40, "vision_tokenizer": 40, "glyph_encoder": 12, "dit_decoder": 30,
               "dit_condition_write": 30, "ar_prefill_s": 40, "ar_decode_s": 40, "glyph_s": 12, "dit_s": 30}
STAGES = ("ar_prefill_s", "ar_decode_s", "glyph_s", "dit_s", "vae_s")
GiB = 1 << 30


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (export workers are processes)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(cmd: list[str], log: Path) -> dict[str, float]:
    """Run `cmd` (output to `log`); wall seconds and the sampled peak RSS of its process tree."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        peak = 0

        def sample() -> None:
            nonlocal peak
            while proc.poll() is None:
                peak = max(peak, tree_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        sampler.join()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss": peak}


def child_generate(package: str, size: int, steps: int) -> dict[str, Any]:
    import resource

    import psutil

    from glm_image_onnx.runtime import GlmImageOnnxPipeline

    t = time.perf_counter()
    pipe = GlmImageOnnxPipeline.from_package(package, verify_files=False)
    load_s = time.perf_counter() - t
    # Peak RSS per stage: a sampler thread charges each sample to the stage the progress callback
    # last announced (the AR planner until its last token, then glyph + DiT until the last step,
    # then the VAE), so the report says which stage sets the peak.
    me = psutil.Process()
    stage = ["ar"]
    peaks = {"load": me.memory_info().rss}
    running = True

    def progress(kind: str, done: int, total: int) -> None:
        if done == total:
            stage[0] = {"ar": "dit", "denoise": "vae"}.get(kind, stage[0])

    def sample() -> None:
        while running:
            peaks[stage[0]] = max(peaks.get(stage[0], 0), me.memory_info().rss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = pipe("a shop sign that says 'OPEN 24 HOURS'", height=size, width=size, num_inference_steps=steps,
               seed=0, progress=progress)
    running = False
    sampler.join()
    return {"load_s": load_s, "timings": out.timings.as_dict(), "peak_rss_by_stage": peaks,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def child_load(package: str, verify: str) -> dict[str, Any]:
    from glm_image_onnx.runtime import GlmImageOnnxPipeline

    t = time.perf_counter()
    GlmImageOnnxPipeline.from_package(package, verify_files=verify)
    return {"load_s": time.perf_counter() - t}


def child(kind: str, *args: str) -> None:
    result = child_generate(args[0], int(args[1]), int(args[2])) if kind == "generate" else child_load(*args)
    print(json.dumps(result))


def _child_json(cmd: list[str], log: Path) -> tuple[dict[str, Any], dict[str, float]]:
    measured = run_measured(cmd, log)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]), measured


def kv_cache_bytes(manifest: dict[str, Any], tokens: int) -> int:
    """The AR planner's cache for `tokens` positions, in the package's cache dtype."""
    cfg = manifest["graphs"]["ar_planner"]["config"]
    width = {"fp32": 4, "fp16": 2, "bf16": 2}[manifest["graphs"]["ar_planner"].get("kv_cache", {}).get("dtype", "fp32")]
    return 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * tokens * width


def weights_by_component(manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes per graph as the manifest lists them: a weights file two graphs share (the AR planner and
    vision tokenizer: the component's file; the DiT's decoder and condition write) counts in each, so
    the largest is the largest component's weights (the export bound's measure)."""
    return {name: int(g["bytes"]) for name, g in manifest["graphs"].items()}


def own_bytes(package: Path, manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes per graph with every stored tensor counted once, for the first graph that reads it:
    these add up to the package's weights (the extrapolation's measure)."""
    import onnx

    from glm_image_onnx.export.onnx_info import all_initializers, tensor_nbytes

    seen: set[tuple[str, str]] = set()
    out: dict[str, int] = {}
    for name, entry in manifest["graphs"].items():
        model = onnx.load(str(package / entry["file"]), load_external_data=False)
        total = 0
        for t in all_initializers(model.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                key = (info["location"], info.get("offset", "0"))
                if key in seen:
                    continue
                seen.add(key)
                total += int(info["length"])
            else:
                total += tensor_nbytes(t)
        out[name] = total
    return out


def fit(points: dict[int, float]) -> tuple[float, float]:
    """Least squares q = a + b * n."""
    ns = sorted(points)
    if len(ns) == 1:
        return points[ns[0]], 0.0
    mean_n = sum(ns) / len(ns)
    mean_q = sum(points[n] for n in ns) / len(ns)
    b = sum((n - mean_n) * (points[n] - mean_q) for n in ns) / sum((n - mean_n) ** 2 for n in ns)
    return mean_q - b * mean_n, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="full", help="widths to keep (default: full; tiny-published for a dry run)")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048], help="none: export and load only")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["fp32"])
    ap.add_argument("--checkpoint-dtype", default="bf16", help="the saved weights' dtype (published: bf16)")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--export-arg", action="append", default=[], help="extra argument for `export` (repeatable)")
    ap.add_argument("--work", default="out/scale")
    ap.add_argument("--report", action="store_true", help="print the table of the saved results; run nothing")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "glm_image_onnx.cli"]
    me = [sys.executable, os.path.abspath(__file__), "--child"]
    # Runs accumulate: a later invocation (another dtype, size or layer count) adds to the table.
    saved = work / "results.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    if args.report:
        for r in results.values():  # fields added since a result was saved, from its package
            pkg = work / f"{args.preset}-{r['layers']}l-{r.get('target', 'cpu')}-{r['dtype']}"
            if "graph_own_bytes" not in r and (pkg / "manifest.json").exists():
                r["graph_own_bytes"] = own_bytes(pkg, json.loads((pkg / "manifest.json").read_text()))
        saved.write_text(json.dumps(results, indent=2))
        report(results, args)
        return 0
    for n in args.layers:
        ck = work / f"{args.preset}-{n}l"
        if not ck.exists():
            m = run_measured([*cli, "init-checkpoint", "--preset", args.preset, "--layers", str(n),
                              "--dtype", args.checkpoint_dtype, str(ck)],
                             work / f"init-{n}.log")
            print(f"[{n} layers] checkpoint: {m['wall_s']:.0f}s, peak {m['peak_rss'] / GiB:.1f} GiB", file=sys.stderr)
        ck_bytes = sum(p.stat().st_size for p in ck.rglob("*.safetensors"))
        for dtype in args.dtypes:
            key = f"{n}:{args.target}:{dtype}"
            pkg = work / f"{args.preset}-{n}l-{args.target}-{dtype}"
            r: dict[str, Any] = {**results.get(key, {}), "layers": n, "dtype": dtype, "target": args.target,
                                 "checkpoint_bytes": ck_bytes}
            if not pkg.exists():
                m = run_measured([*cli, "export", str(ck), str(pkg), "--target", args.target, "--dtype", dtype,
                                  *args.export_arg], work / f"export-{n}-{dtype}.log")
                r["export"] = m
                print(f"[{n} layers {dtype}] export: {m['wall_s']:.0f}s, peak {m['peak_rss'] / GiB:.2f} GiB",
                      file=sys.stderr)
            manifest = json.loads((pkg / "manifest.json").read_text())
            r["graph_bytes"] = weights_by_component(manifest)
            r["graph_own_bytes"] = own_bytes(pkg, manifest)
            r["package_bytes"] = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
            # Load and generation run here on the CPU: another target's package is measured for its
            # export only (its graphs are built for that provider's kernels).
            for verify in ("full", "cached") if args.target == "cpu" else ():
                out, _ = _child_json([*me, "load", str(pkg), verify], work / f"load-{n}-{dtype}-{verify}.log")
                r[f"load_{verify}_s"] = out["load_s"]
            for size in args.sizes if args.target == "cpu" else ():
                out, _ = _child_json([*me, "generate", str(pkg), str(size), str(args.steps)],
                                     work / f"generate-{n}-{dtype}-{size}.log")
                tokens = out["timings"].get("ar_tokens", 0) + 1024  # prompt + generated, rounded up
                out["bound"] = r["package_bytes"] + kv_cache_bytes(manifest, int(tokens)) + 4 * GiB
                r[f"generate_{size}"] = out
                print(f"[{n} layers {dtype}] {size}px: {out['timings']['total_s']:.0f}s, "
                      f"peak {out['peak_rss'] / GiB:.2f} GiB (bound {out['bound'] / GiB:.2f}; by stage "
                      + ", ".join(f"{k} {v / GiB:.2f}" for k, v in out["peak_rss_by_stage"].items()) + ")",
                      file=sys.stderr)
            results[key] = r
            saved.write_text(json.dumps(results, indent=2))
    report(results, args)
    return 0


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    sizes = sorted({int(k.split("_")[1]) for r in results.values() for k in r if k.startswith("generate_")})
    print(f"# bench_scale: {args.preset} widths, steps {args.steps}; bounds: export 1.25 x largest component "
          "+ 2 GiB, runtime package + KV cache + 4 GiB\n")
    print("| layers | target | dtype | export s | export peak GiB | largest component GiB | bound GiB | package GiB "
          "| load full s | load cached s | " + " | ".join(f"{s}px s / peak GiB (bound)" for s in sizes) + " |")
    print("|---" * (10 + len(sizes)) + "|")
    for r in sorted(results.values(), key=lambda r: (r["layers"], r.get("target", ""), r["dtype"])):
        largest = max(r["graph_bytes"].values())
        exp = r.get("export", {})
        cells = [str(r["layers"]), r.get("target", args.target), r["dtype"], f"{exp.get('wall_s', float('nan')):.0f}",
                 f"{exp.get('peak_rss', float('nan')) / GiB:.2f}", f"{largest / GiB:.2f}",
                 f"{(1.25 * largest + 2 * GiB) / GiB:.2f}", f"{r['package_bytes'] / GiB:.2f}",
                 f"{r['load_full_s']:.1f}" if "load_full_s" in r else "-",
                 f"{r['load_cached_s']:.2f}" if "load_cached_s" in r else "-"]
        for s in sizes:
            g = r.get(f"generate_{s}")
            cells.append(f"{g['timings']['total_s']:.0f} / {g['peak_rss'] / GiB:.2f} ({g['bound'] / GiB:.2f})"
                         if g else "-")
        print("| " + " | ".join(cells) + " |")
    for target, dtype in sorted({(r.get("target", args.target), r["dtype"]) for r in results.values()}):
        rows = {r["layers"]: r for r in results.values() if (r.get("target", args.target), r["dtype"]) == (target, dtype)}
        if len(rows) < 2:
            continue
        print(f"\nExtrapolation to the published layers ({target} {dtype}): q(N) = a + b*N fitted per graph / stage")
        total_bytes, largest = 0.0, 0.0
        for g in next(iter(rows.values()))["graph_own_bytes"]:
            a, b = fit({n: r["graph_own_bytes"][g] for n, r in rows.items()})
            full = a + b * FULL_LAYERS.get(g, 0)
            total_bytes += full
            print(f"- {g}: bytes = {a / 1e9:.3f} + {b / 1e9:.3f}*N GB -> {full / 1e9:.2f} GB at N={FULL_LAYERS.get(g, 0)}")
            ca, cb = fit({n: r["graph_bytes"][g] for n, r in rows.items()})  # its whole component
            largest = max(largest, ca + cb * FULL_LAYERS.get(g, 0))
        print(f"- package: {total_bytes / 1e9:.1f} GB; largest component {largest / 1e9:.1f} GB, "
              f"export bound 1.25x + 2 GiB = {(1.25 * largest + 2 * GiB) / 1e9:.1f} GB")
        timed = {n: r["export"] for n, r in rows.items() if "export" in r}
        if len(timed) >= 2:
            for q, unit, scale in (("wall_s", "s", 1), ("peak_rss", "GB", 1e9)):
                a, b = fit({n: e[q] / scale for n, e in timed.items()})
                print(f"- export {q} = {a:.2f} + {b:.2f}*N {unit} (N: layers per stack) -> {a + 40 * b:.2f} {unit} at N=40")
        for s in sizes:
            ran = {n: r[f"generate_{s}"] for n, r in rows.items() if f"generate_{s}" in r}
            if len(ran) < 2:
                continue
            for stage in STAGES:
                a, b = fit({n: g["timings"].get(stage, 0.0) for n, g in ran.items()})
                print(f"- {s}px {stage} = {a:.1f} + {b:.1f}*N s -> {a + b * FULL_LAYERS.get(stage, 0):.0f} s")

if __name__ == "__main__":
    sys.exit(main())
