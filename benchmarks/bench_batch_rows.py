"""What a row costs: one graph call at several batch sizes, per row (a script, not a test).

    python benchmarks/bench_batch_rows.py [--package PKG] [--json out.json]

The numbers behind what the server batches across requests: an AR planner decode step at 1..16
rows (weight-bound at batch 1, so rows are nearly free: batched), the DiT at 2 / 4 / 8 rows (one
to four text-to-image requests with their CFG pair) and the VAE decoder at 1 / 2 / 4 images, at
the bench preset's 256x256 (compute-bound on a CPU: not batched where a row costs as much as
alone). Each size runs in its own process (fresh allocations), the median of --calls calls after
two warm-ups; --processes such processes per point, the table shows the median over them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_server import BENCH_CACHE, ensure_bench_package

POINTS = [("ar_planner", n) for n in (1, 2, 4, 8, 16)] + [("dit_decoder", n) for n in (2, 4, 8)] + \
         [("vae_decoder", n) for n in (1, 2, 4)]


def child(package: Path, graph: str, rows: int, calls: int) -> float:
    """Median seconds of one call of `graph` at `rows` rows."""
    from glm_image_onnx.runtime import Package, ProviderRequest
    from glm_image_onnx.runtime.ar import ArPlanner
    from glm_image_onnx.runtime.pipeline import MEMORY, _DitCall
    from glm_image_onnx.runtime.providers import create_session

    pkg = Package.open(package, verify_files=False)
    session = create_session(pkg.graph_path(graph), ProviderRequest("cpu", {}, False), None, MEMORY.get(graph, "pattern"))
    latent = 256 // pkg.pipeline.vae.scale_factor
    channels = pkg.pipeline.vae.latent_channels
    if graph == "ar_planner":
        ar = ArPlanner(session, pkg.graphs[graph].config)
        cache = ar.new_cache(rows, 512)
        lengths = ar.length_inputs(rows, 1)
        ar.set_lengths(lengths, np.full(rows, 300), 1)  # a decode step at position 300 of each row
        feeds = {"input_ids": np.zeros((rows, 1), np.int64), "position_ids": np.zeros((3, rows, 1), np.int64),
                 **lengths}
        binding = ar.bind(cache, 0, rows, feeds, np.empty((rows, 1, ar.vocab), np.float32))
        call = lambda: ar.run(binding)  # noqa: E731
    elif graph == "dit_decoder":
        cfg = pkg.graphs[graph].config
        empty = np.zeros((cfg.num_layers, 1, 0, cfg.num_heads, cfg.head_dim), np.float32)
        text_dim = next(i.shape[2] for i in session.get_inputs() if i.name == "encoder_hidden_states")
        rng = np.random.default_rng(0)
        tokens = (latent // cfg.patch_size) ** 2
        dit = _DitCall(session, ("cpu", 0), (1, channels, latent, latent),
                       rng.standard_normal((rows, 20, text_dim), dtype=np.float32), np.ones((rows, 20), np.int64),
                       np.zeros((1, tokens), np.int64), [False, True] * (rows // 2), 256, 256, empty, empty)
        x = rng.standard_normal((1, channels, latent, latent), dtype=np.float32)
        call = lambda: dit(x, 500.0)  # noqa: E731
    else:
        z = np.random.default_rng(0).standard_normal((rows, channels, latent, latent), dtype=np.float32)
        call = lambda: session.run(None, {"latents": z})  # noqa: E731
    for _ in range(2):
        call()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, default=BENCH_CACHE / "package")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("GRAPH", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.package, args.child[0], int(args.child[1]), args.calls)))
        return 0
    package = ensure_bench_package(args.package)
    results: dict[str, list[float]] = {}
    for _ in range(args.processes):  # rounds over every point: a slow minute hits them all
        for graph, rows in POINTS:
            out = subprocess.run([sys.executable, __file__, "--package", str(package), "--calls", str(args.calls),
                                  "--child", graph, str(rows)], capture_output=True, text=True, check=True)
            results.setdefault(f"{graph}:{rows}", []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"bench preset, 256x256, CPU; median over {args.processes} processes of {args.calls} calls each")
    print(f"{'graph':<14}{'rows':>6}{'ms/call':>10}{'ms/unit':>10}{'vs fewest':>11}   unit")
    base: dict[str, float] = {}
    table = []
    for graph, rows in POINTS:
        ms = statistics.median(results[f"{graph}:{rows}"]) * 1e3
        unit, per = ("token", rows) if graph == "ar_planner" else ("image", rows // 2) if graph == "dit_decoder" \
            else ("image", rows)
        per_unit = ms / per
        base.setdefault(graph, per_unit)
        table.append({"graph": graph, "rows": rows, "ms_per_call": ms, "ms_per_unit": per_unit,
                      "vs_fewest": per_unit / base[graph]})
        print(f"{graph:<14}{rows:>6}{ms:>10.1f}{per_unit:>10.2f}{per_unit / base[graph]:>11.2f}   {unit}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
