"""gRPC server benchmark on the tiny preset (a script, not a test).

    python benchmarks/bench_server.py [--package PKG] [--json results.json]

Starts `glm-image-onnx serve` in a subprocess on a free loopback port and measures, with the stock
tritonclient:
1. gRPC overhead over an in-process `session.run` for a component model (glyph_encoder, 16 bytes:
   almost no compute): target p50 < 2 ms, p99 < 10 ms of added latency;
2. throughput (requests/s) at 1, 4 and 16 concurrent clients, for a component model whose compute
   dominates (glyph_encoder, 256 bytes) and for glm_image (64x64, 2 steps);
3. dynamic batching: that component model's throughput with --max-batch-size 8 against 1.
Without --package, the tiny preset is built and exported first (needs the export extra, ~1 min).
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

        self.port = _free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "glm_image_onnx", "serve", str(package), "--port",
                                      str(self.port), "--no-verify", "--quiet", *args],
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


def overhead(package: Path, url: str, n: int) -> dict:
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    from glm_image_onnx.runtime import Package
    from glm_image_onnx.runtime.providers import session_options

    feeds, inputs = _glyph_inputs()
    session = ort.InferenceSession(str(Package.open(package, verify_files=False).graph_path("glyph_encoder")),
                                   session_options("cpu"), providers=["CPUExecutionProvider"])
    local, remote = [], []
    for i in range(n + 50):  # one path at a time: the session's spinning threads would slow the other
        t = time.perf_counter()
        session.run(None, feeds)
        if i >= 50:
            local.append(time.perf_counter() - t)
    del session
    time.sleep(0.5)
    with grpcclient.InferenceServerClient(url) as client:
        for i in range(n + 50):
            t = time.perf_counter()
            client.infer("glyph_encoder", inputs)
            if i >= 50:
                remote.append(time.perf_counter() - t)
    base = statistics.median(local)
    added = [r - base for r in remote]
    result = {"model": "glyph_encoder", "requests": n,
              "in_process_p50_ms": base * 1e3, "in_process_p99_ms": _percentile(local, 99) * 1e3,
              "grpc_p50_ms": statistics.median(remote) * 1e3, "grpc_p99_ms": _percentile(remote, 99) * 1e3,
              "overhead_p50_ms": statistics.median(added) * 1e3, "overhead_p99_ms": _percentile(added, 99) * 1e3}
    result["meets_target"] = result["overhead_p50_ms"] < 2 and result["overhead_p99_ms"] < 10
    return result


def throughput(url: str, model: str, make_inputs, clients: int, total: int) -> dict:
    """`total` requests shared by `clients` closed-loop clients (each sends its next request when the
    previous one returns); throughput = total / wall time."""
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
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"model": model, "clients": clients, "requests": len(latencies), "errors": len(errors),
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
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or build_tiny_package(Path(tmp))
        results: dict = {"machine": {"cpus": os.cpu_count()}}
        glyph = lambda: _glyph_inputs(256)  # noqa: E731
        glm = lambda: (None, _glm_inputs())  # noqa: E731

        server = Server(package, "--max-concurrency", "2", "--max-batch-size", "8")
        try:
            results["overhead"] = overhead(package, server.url, args.requests)
            o = results["overhead"]
            print(f"gRPC overhead ({o['model']}): p50 {o['overhead_p50_ms']:.2f} ms, p99 {o['overhead_p99_ms']:.2f} ms "
                  f"(in-process p50 {o['in_process_p50_ms']:.2f} ms, gRPC p50 {o['grpc_p50_ms']:.2f} ms) "
                  f"target p50<2 p99<10: {'met' if o['meets_target'] else 'MISSED'}")
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
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
