"""gRPC server benchmark on the tiny preset (a script, not a test).

    python benchmarks/bench_server.py [--package PKG] [--json results.json]

Starts `glm-image-onnx serve` in a subprocess on a free loopback port and measures, with the stock
tritonclient:
1. gRPC and HTTP overhead over an in-process `session.run` for a component model (glyph_encoder,
   16 bytes: almost no compute; tritonclient.grpc and tritonclient.http, binary tensors, one run):
   targets: gRPC p50 < 2 ms and p99 < 10 ms, HTTP p50 < 3 ms of added latency;
2. throughput (requests/s) at 1, 4 and 16 concurrent clients, for a component model whose compute
   dominates (glyph_encoder, 256 bytes) and for glm_image (64x64, 2 steps);
3. dynamic batching: that component model's throughput with --max-batch-size 8 against 1;
4. AR batching (`--ar-package`, the bench preset by default: 256x256, 8 steps): glm_image at 1, 4
   and 16 concurrent clients, each point on a fresh server with AR batching on and one with it off
   (--no-ar-batching): images/s, latency, and the AR planner's tokens per busy second (the
   server's glm_image_ar_tokens_total / glm_image_ar_busy_seconds_total). Targets on a 2-core CPU:
   at 16 clients AR tokens/s >= 6x and images/s >= 1.7x the unbatched server; at 1 client the
   latency within 5%.
Without --package, the tiny preset is built and exported first (needs the export extra, ~1 min).
`--only ar-batching` runs section 4 alone (~10 min on a 2-core CPU), `--only overhead` section 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def build_tiny_package(work: Path) -> Path:
    from glm_image_onnx.export.package import ExportOptions, export_package
    from glm_image_onnx.models.checkpoint import write_checkpoint
    from glm_image_onnx.models.presets import TINY

    print("building the tiny preset package ...", file=sys.stderr)
    ckpt = write_checkpoint(TINY, work / "ckpt", seed=0)
    out = work / "pkg"
    export_package(ckpt, out, ExportOptions(), log=lambda _: None)
    return out


class Server:
    def __init__(self, package: Path, *args: str):
        import tritonclient.grpc as grpcclient

        self.port, http_port = _free_port(), _free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.http_url = f"127.0.0.1:{http_port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "glm_image_onnx", "serve", str(package), "--port",
                                      str(self.port), "--http-port", str(http_port), "--no-verify", "--quiet", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        with grpcclient.InferenceServerClient(self.url) as client:
            while True:
                try:
                    if client.is_server_ready():
                        return
                except Exception:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {self.proc.stderr.read()[-2000:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _glyph_inputs(length: int = 16):
    import tritonclient.grpc as grpcclient

    ids = np.random.default_rng(0).integers(0, 250, (1, length)).astype(np.int64)
    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask}
    inputs = []
    for name, array in feeds.items():
        t = grpcclient.InferInput(name, list(array.shape), "INT64")
        t.set_data_from_numpy(array)
        inputs.append(t)
    return feeds, inputs


def _glm_inputs():
    from glm_image_onnx.server.client import build_inputs

    return build_inputs("a lighthouse at dusk", height=64, width=64, steps=2, seed=1)


BENCH_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glm-image-onnx" / "bench"
AR_REQUEST = dict(height=256, width=256, steps=8, guidance=1.5)


def ensure_bench_package(package: Path) -> Path:
    """The bench preset's package (bench_runtime.py's), built where missing."""
    if not (package / "manifest.json").exists():
        cli = [sys.executable, "-m", "glm_image_onnx"]
        checkpoint = package.parent / "checkpoint"
        if not (checkpoint / "model_index.json").exists():
            subprocess.run(cli + ["init-checkpoint", "--preset", "bench", "--seed", "0", str(checkpoint)], check=True)
        print(f"exporting the bench preset to {package} (about 2 minutes) ...", file=sys.stderr)
        subprocess.run(cli + ["export", str(checkpoint), str(package)], check=True)
    return package


AR_COUNTERS = ("glm_image_ar_tokens_total", "glm_image_ar_busy_seconds_total", "glm_image_ar_step_rows_sum",
               "glm_image_ar_step_rows_count")


def _ar_counters(metrics_url: str) -> np.ndarray:
    """AR_COUNTERS from the server's Prometheus text (the step histogram is empty when AR batching is off)."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(AR_COUNTERS)}
    return np.array([values.get(name, 0.0) for name in AR_COUNTERS])


def ar_batching(package: Path, clients: tuple[int, ...], requests_per_client: int) -> list[dict]:
    """glm_image at each client count, AR batching on and off, each point on a fresh server."""
    from glm_image_onnx.server.client import build_inputs

    def inputs():
        return None, build_inputs("a sign that says 'OPEN' above a bakery door", seed=1, **AR_REQUEST)

    rows = []
    for c in clients:
        for mode, flags in (("on", ()), ("off", ("--no-ar-batching",))):
            metrics_port = _free_port()
            server = Server(package, "--max-queue", "64", "--metrics-port", str(metrics_port), "--no-components",
                            *flags)
            try:
                metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                # each client warms up with one request outside the timed part (throughput does)
                # at least 6 timed requests: one client's latency median needs a few
                r = throughput(server.url, "glm_image", inputs, c, max(c * requests_per_client, 6),
                               before_timed=lambda: _ar_counters(metrics_url))
                tokens, busy, rows_sum, steps = _ar_counters(metrics_url) - r.pop("before")
                r.update(mode=mode, images_per_s=r["throughput_rps"], ar_tokens_per_s=tokens / max(busy, 1e-9),
                         ar_rows_per_step=rows_sum / steps if steps else 1.0)
            finally:
                server.stop()
            rows.append(r)
            print(f"  {mode:<4} {c:>3} clients: {r['images_per_s']:.3f} images/s, p50 {r['p50_ms'] / 1e3:.2f} s, "
                  f"AR {r['ar_tokens_per_s']:.0f} tokens/s, {r['ar_rows_per_step']:.1f} rows per decode step, "
                  f"errors {r['errors']}", file=sys.stderr, flush=True)
    return rows


def ar_batching_report(rows: list[dict]) -> dict:
    by = {(r["mode"], r["clients"]): r for r in rows}
    clients = sorted({r["clients"] for r in rows})
    print(f"\nglm_image, bench preset {AR_REQUEST['height']}x{AR_REQUEST['width']}, {AR_REQUEST['steps']} steps: "
          "AR batching on vs off (--no-ar-batching)")
    print(f"{'clients':>8}{'on img/s':>10}{'off img/s':>11}{'ratio':>7}{'on p50 s':>10}{'off p50 s':>11}{'ratio':>7}"
          f"{'on AR tok/s':>13}{'off AR tok/s':>14}{'ratio':>7}")
    summary = {}
    for c in clients:
        on, off = by[("on", c)], by[("off", c)]
        img, lat, tok = (on["images_per_s"] / off["images_per_s"], on["p50_ms"] / off["p50_ms"],
                         on["ar_tokens_per_s"] / off["ar_tokens_per_s"])
        summary[c] = {"images_ratio": img, "latency_ratio": lat, "ar_tokens_ratio": tok}
        print(f"{c:>8}{on['images_per_s']:>10.3f}{off['images_per_s']:>11.3f}{img:>7.2f}{on['p50_ms'] / 1e3:>10.2f}"
              f"{off['p50_ms'] / 1e3:>11.2f}{lat:>7.2f}{on['ar_tokens_per_s']:>13.0f}{off['ar_tokens_per_s']:>14.0f}"
              f"{tok:>7.2f}")
    hi, lo = max(clients), min(clients)
    targets = {f"latency_{lo}_clients<=1.05x": summary[lo]["latency_ratio"] <= 1.05}
    if hi > lo:
        targets.update({f"ar_tokens_{hi}_clients>=6x": summary[hi]["ar_tokens_ratio"] >= 6,
                        f"images_{hi}_clients>=1.7x": summary[hi]["images_ratio"] >= 1.7})
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    return {"points": rows, "ratios": summary, "targets": targets}


def overhead(package: Path, server: "Server", n: int) -> dict:
    """Added latency of one glyph_encoder round trip over gRPC and over HTTP (tritonclient.grpc /
    tritonclient.http, binary tensors), against session.run in this process; the three paths
    alternate in rounds of 50 so that the machine's drift hits them alike."""
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from glm_image_onnx.runtime import Package
    from glm_image_onnx.runtime.providers import session_options

    feeds, grpc_inputs = _glyph_inputs()
    http_inputs = []
    for name, array in feeds.items():
        t = httpclient.InferInput(name, list(array.shape), "INT64")
        t.set_data_from_numpy(array)
        http_inputs.append(t)
    session = ort.InferenceSession(str(Package.open(package, verify_files=False).graph_path("glyph_encoder")),
                                   session_options("cpu"), providers=["CPUExecutionProvider"])
    grpc_client = grpcclient.InferenceServerClient(server.url)
    http_client = httpclient.InferenceServerClient(server.http_url)
    calls = {"in_process": lambda: session.run(None, feeds),
             "grpc": lambda: grpc_client.infer("glyph_encoder", grpc_inputs),
             "http": lambda: http_client.infer("glyph_encoder", http_inputs)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for round_ in range(n // 50 + 1):  # one path at a time: the session's spinning threads would slow another
        for name, call in calls.items():
            for i in range(50):
                t = time.perf_counter()
                call()
                if round_ > 0:  # the first round warms every path up
                    times[name].append(time.perf_counter() - t)
    grpc_client.close()
    http_client.close()
    base = statistics.median(times["in_process"])
    result: dict = {"model": "glyph_encoder", "requests": len(times["grpc"]),
                    "in_process_p50_ms": base * 1e3, "in_process_p99_ms": _percentile(times["in_process"], 99) * 1e3}
    for proto in ("grpc", "http"):
        added = [r - base for r in times[proto]]
        result.update({f"{proto}_p50_ms": statistics.median(times[proto]) * 1e3,
                       f"{proto}_p99_ms": _percentile(times[proto], 99) * 1e3,
                       f"{proto}_overhead_p50_ms": statistics.median(added) * 1e3,
                       f"{proto}_overhead_p99_ms": _percentile(added, 99) * 1e3})
    result["grpc_meets_target"] = result["grpc_overhead_p50_ms"] < 2 and result["grpc_overhead_p99_ms"] < 10
    result["http_meets_target"] = result["http_overhead_p50_ms"] < 3
    return result


def overhead_report(o: dict) -> None:
    print(f"in-process session.run ({o['model']}): p50 {o['in_process_p50_ms']:.2f} ms, "
          f"p99 {o['in_process_p99_ms']:.2f} ms; {o['requests']} requests per protocol")
    for proto, target in (("grpc", "p50<2 p99<10"), ("http", "p50<3")):
        print(f"{proto:<5} overhead: p50 {o[f'{proto}_overhead_p50_ms']:.2f} ms, p99 {o[f'{proto}_overhead_p99_ms']:.2f} ms "
              f"(round trip p50 {o[f'{proto}_p50_ms']:.2f} ms) target {target}: "
              f"{'met' if o[f'{proto}_meets_target'] else 'MISSED'}")


def throughput(url: str, model: str, make_inputs, clients: int, total: int, before_timed=None) -> dict:
    """`total` requests shared by `clients` closed-loop clients (each sends its next request when the
    previous one returns); throughput = total / wall time. `before_timed()`'s value, taken after
    the warm-up, is returned as "before"."""
    import tritonclient.grpc as grpcclient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    remaining = [total]
    start_barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        _, inputs = make_inputs()
        with grpcclient.InferenceServerClient(url) as client:
            client.infer(model, inputs)  # connect and warm up outside the timed part
            start_barrier.wait()
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                t = time.perf_counter()
                try:
                    client.infer(model, inputs)
                except Exception as e:  # counted, the run goes on
                    with lock:
                        errors.append(str(e)[:200])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    start_barrier.wait()
    before = before_timed() if before_timed else None
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"model": model, "clients": clients, "requests": len(latencies), "errors": len(errors), "before": before,
            "throughput_rps": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1e3 if latencies else None,
            "p99_ms": _percentile(latencies, 99) * 1e3 if latencies else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, help="exported package (default: build the tiny preset)")
    parser.add_argument("--requests", type=int, default=1000, help="requests for the overhead measurement")
    parser.add_argument("--component-requests", type=int, default=800, help="requests per component point")
    parser.add_argument("--glm-requests", type=int, default=48, help="requests per glm_image point")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--ar-package", type=Path, default=BENCH_CACHE / "package",
                        help="package for the AR batching section (default: the bench preset's, built if missing)")
    parser.add_argument("--ar-clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--ar-requests", type=int, default=2, help="timed glm_image requests per client and point")
    parser.add_argument("--only", choices=["ar-batching", "overhead"], help="run one section")
    args = parser.parse_args(argv)
    if args.only == "overhead":
        with tempfile.TemporaryDirectory() as tmp:
            package = args.package or build_tiny_package(Path(tmp))
            server = Server(package)
            try:
                results = {"overhead": overhead(package, server, args.requests)}
            finally:
                server.stop()
        overhead_report(results["overhead"])
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return 0
    if args.only == "ar-batching":
        report = ar_batching_report(ar_batching(ensure_bench_package(args.ar_package), tuple(args.ar_clients),
                                                args.ar_requests))
        if args.json:
            args.json.write_text(json.dumps({"ar_batching": report}, indent=2))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or build_tiny_package(Path(tmp))
        results: dict = {"machine": {"cpus": os.cpu_count()}}
        glyph = lambda: _glyph_inputs(256)  # noqa: E731
        glm = lambda: (None, _glm_inputs())  # noqa: E731

        server = Server(package, "--max-concurrency", "2", "--max-batch-size", "8")
        try:
            results["overhead"] = overhead(package, server, args.requests)
            overhead_report(results["overhead"])
            results["batched"] = [throughput(server.url, "glyph_encoder", glyph, c, args.component_requests)
                                  for c in (1, 4, 16)]
            results["glm_image"] = [throughput(server.url, "glm_image", glm, c, args.glm_requests) for c in (1, 4, 16)]
        finally:
            server.stop()
        server = Server(package, "--max-concurrency", "2", "--max-batch-size", "1")
        try:
            results["unbatched"] = [throughput(server.url, "glyph_encoder", glyph, c, args.component_requests)
                                    for c in (1, 4, 16)]
        finally:
            server.stop()

    print(f"\n{'model':<14}{'batching':<10}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for label, rows in (("max 8", results["batched"]), ("off", results["unbatched"]), ("-", results["glm_image"])):
        for r in rows:
            print(f"{r['model']:<14}{label:<10}{r['clients']:>8}{r['throughput_rps']:>10.1f}{r['p50_ms']:>9.2f}"
                  f"{r['p99_ms']:>9.2f}{r['errors']:>8}")
    gain = results["batched"][-1]["throughput_rps"] / results["unbatched"][-1]["throughput_rps"]
    results["batching_gain_16_clients"] = gain
    print(f"\ndynamic batching at 16 clients: {gain:.2f}x the unbatched throughput")
    results["ar_batching"] = ar_batching_report(ar_batching(ensure_bench_package(args.ar_package),
                                                            tuple(args.ar_clients), args.ar_requests))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
