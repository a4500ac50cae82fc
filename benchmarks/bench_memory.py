"""Memory and hostile-client stress (issue 30): a script, not a test.

    python benchmarks/bench_memory.py [--package PKG] [--max-memory 4G] [--json results.json]

Starts `glm-image-onnx serve PKG --max-memory 4G --http-port` in a subprocess and sends, all at once:
- each component model's worst case, over gRPC and KServe REST: its largest allowed shape (the
  model config's `max_shape.*`, from server.envelope), and twice that shape (400);
- glm_image at the largest size the package allows and at 1024x1024, over gRPC and the OpenAI API;
- three bodies of 200 MB, and slow clients: half-sent headers, stalled bodies;
- all along, normal requests (glm_image 64x64, 2 steps, over gRPC) one after another, which must
  keep completing.
Reports the server's peak resident memory (VmHWM, load included) against the budget, the answers
of each kind (every one must be 200 or a clean 4xx / 429) and the normal requests' latencies. Then
the estimate against the measured peak of glm_image alone at each size, on a fresh server per size.
Without --package, the demo model (models/demo) is exported first (~1 min).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_server import _free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, package: Path, *args: str):
        import tritonclient.grpc as grpcclient

        self.port, self.http_port = _free_port(), _free_port()
        self.url, self.http_url = f"127.0.0.1:{self.port}", f"http://127.0.0.1:{self.http_port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen([sys.executable, "-m", "glm_image_onnx", "serve", str(package), "--port",
                                      str(self.port), "--http-port", str(self.http_port), "--no-verify", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        with grpcclient.InferenceServerClient(self.url) as client:
            while not _ready(client):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {Path(self.log.name).read_text()[-2000:]}")
                time.sleep(0.2)

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise OSError("no VmHWM")

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=120)
        return Path(self.log.name).read_text()


def _ready(client: Any) -> bool:
    try:
        return client.is_server_ready()
    except Exception:
        return False


# ------------------------------------------------------------------------------- the requests
def _feeds(meta: dict, bounds: dict[str, list[int]], scale: int) -> dict[str, np.ndarray]:
    """Inputs of a component model at its largest allowed shape (`scale` times it), one row."""
    feeds = {}
    for spec in meta["inputs"]:
        shape = [int(d) for d in spec.get("shape", [])]
        most = bounds.get(spec["name"], shape)
        # fixed axes as declared, bounded ones at `scale` times their bound, others (the batch axis) 1
        dims = [d if d > 0 else m * scale if m > 0 else 1 for d, m in zip(shape, most)]
        dtype = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": bool}[spec["datatype"]]
        feeds[spec["name"]] = np.zeros(dims, dtype)
    if "seqlens_k" in feeds:  # the AR planner: a prefill of its longest prompt
        seq = feeds["input_ids"].shape[1]
        feeds["seqlens_k"][:] = seq - 1
        feeds["total_sequence_length"] = np.array(seq, np.int32)
        feeds["position_ids"][:] = np.arange(seq)
    if "image_grid_thw" in feeds:
        side = int(np.sqrt(feeds["pixel_values"].shape[0]))
        feeds["pixel_values"] = feeds["pixel_values"][: side * side]
        feeds["image_grid_thw"][:] = [1, side, side]
    return feeds


def component_calls(server: Server, scale: int) -> list[tuple[str, Callable[[], int]]]:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    calls = []
    with grpcclient.InferenceServerClient(server.url) as client:
        index = [m["name"] for m in client.get_model_repository_index(as_json=True)["models"]]
        for name in (n for n in index if n != "glm_image"):
            params = client.get_model_config(name, as_json=True)["config"].get("parameters", {})
            bounds = {k.removeprefix("max_shape."): json.loads(v["string_value"])
                      for k, v in params.items() if k.startswith("max_shape.")}
            feeds = _feeds(client.get_model_metadata(name, as_json=True), bounds, scale)

            def grpc_call(name: str = name, feeds: dict = feeds) -> int:
                inputs = []
                for k, v in feeds.items():
                    t = grpcclient.InferInput(k, list(v.shape), np_to_triton_dtype(v.dtype))
                    t.set_data_from_numpy(v)
                    inputs.append(t)
                with grpcclient.InferenceServerClient(server.url) as c:
                    try:
                        c.infer(name, inputs, client_timeout=600)
                        return 200
                    except InferenceServerException as e:
                        return {"StatusCode.INVALID_ARGUMENT": 400, "StatusCode.RESOURCE_EXHAUSTED": 429}.get(
                            e.status(), 500)

            def http_call(name: str = name, feeds: dict = feeds) -> int:
                inputs = []
                for k, v in feeds.items():
                    t = httpclient.InferInput(k, list(v.shape), np_to_triton_dtype(v.dtype))
                    t.set_data_from_numpy(v, binary_data=True)
                    inputs.append(t)
                with httpclient.InferenceServerClient(server.http_url.removeprefix("http://"),
                                                      network_timeout=600, connection_timeout=600) as c:
                    try:
                        c.infer(name, inputs)
                        return 200
                    except InferenceServerException as e:
                        return int(e.status() or 500)

            calls += [(f"{name} x{scale} grpc", grpc_call), (f"{name} x{scale} http", http_call)]
    return calls


def glm_calls(server: Server, sides: list[int]) -> list[tuple[str, Callable[[], int]]]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from glm_image_onnx.server.client import build_inputs

    def grpc_call(side: int) -> int:
        with grpcclient.InferenceServerClient(server.url) as c:
            try:
                c.infer("glm_image", build_inputs("a red sign that says 'OPEN'", height=side, width=side, steps=2,
                                                  seed=1), client_timeout=900)
                return 200
            except InferenceServerException as e:
                return 429 if e.status() == "StatusCode.RESOURCE_EXHAUSTED" else 500

    def openai_call(side: int) -> int:
        return _http("POST", server.http_url + "/v1/images/generations",
                     json.dumps({"prompt": "a red sign that says 'OPEN'", "size": f"{side}x{side}", "steps": 2}).encode())

    return [c for side in sides for c in ((f"glm_image {side} grpc", lambda s=side: grpc_call(s)),
                                         (f"glm_image {side} openai", lambda s=side: openai_call(s)))]


def _http(method: str, url: str, body: bytes, timeout: float = 900) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def hostile_calls(server: Server) -> list[tuple[str, Callable[[], int]]]:
    big = b'{"inputs": [{"name": "latents", "datatype": "FP32", "shape": [1], "data": [' + b"0," * (100 << 20)

    def body() -> int:
        try:
            return _http("POST", server.http_url + "/v2/models/vae_decoder/infer", big + b"0]}]}")
        except OSError:  # cut off mid-upload: the server refused it while it was being sent
            return 413

    def slow(sent: bytes) -> int:
        host, port = server.http_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=120) as sock:
            sock.sendall(sent)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return int(data[9:12]) if data.startswith(b"HTTP/1.1") else 408  # closed without an answer: cut off

    headers = b"POST /v2/models/vae_decoder/infer HTTP/1.1\r\nHost: x\r\nContent-Le"
    stalled = b"POST /v2/models/vae_decoder/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
    return ([(f"200 MB body {i}", body) for i in range(3)] + [(f"half headers {i}", lambda: slow(headers)) for i in range(10)]
            + [(f"stalled body {i}", lambda: slow(stalled)) for i in range(10)])


def normal_loop(server: Server, stop: threading.Event, latencies: list[float], answers: Counter) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from glm_image_onnx.server.client import build_inputs

    with grpcclient.InferenceServerClient(server.url) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                c.infer("glm_image", build_inputs("a lighthouse", height=64, width=64, steps=2, seed=1),
                        client_timeout=900)
                latencies.append(time.perf_counter() - t0)
                answers["200"] += 1
            except InferenceServerException as e:
                answers[e.status()] += 1
                time.sleep(0.5)


# ------------------------------------------------------------------------------------ phases
def stress(package: Path, budget: str, largest: int) -> dict:
    server = Server(package, "--max-memory", budget)
    calls = (component_calls(server, 1) + component_calls(server, 2) + glm_calls(server, [largest, 1024])
             + hostile_calls(server))
    answers: dict[str, int] = {}
    latencies: list[float] = []
    normal: Counter = Counter()
    stop = threading.Event()
    loop = threading.Thread(target=normal_loop, args=(server, stop, latencies, normal))
    loop.start()
    threads = [threading.Thread(target=lambda n=n, f=f: answers.__setitem__(n, f())) for n, f in calls]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    loop.join()
    peak = server.peak_rss()
    alive = _ready(__import__("tritonclient.grpc", fromlist=["x"]).InferenceServerClient(server.url))
    log = server.stop()
    return {"budget": budget, "peak_rss_mb": peak >> 20, "wall_s": round(wall, 1), "answers": answers,
            "normal": dict(normal), "normal_p50_s": round(statistics.median(latencies), 2) if latencies else None,
            "alive_after": alive, "tracebacks": log.count("Traceback"),
            "estimate_line": next((line for line in log.splitlines() if "memory budget:" in line), "")}


def estimates(package: Path, sides: list[int]) -> list[dict]:
    """glm_image alone at each size on a fresh server: its estimate against its measured peak above the
    server's resident memory before the request (VmHWM after less VmRSS before)."""
    import tritonclient.grpc as grpcclient

    from glm_image_onnx.server.client import build_inputs

    rows = []
    for side in sides:
        server = Server(package)
        before = int(next(line for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:")).split()[1]) * 1024
        Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # its peak so far (the load) forgotten
        with grpcclient.InferenceServerClient(server.url) as c:
            c.infer("glm_image", build_inputs("a red sign that says 'OPEN'", height=side, width=side, steps=2, seed=1),
                    client_timeout=900)
        peak = (server.peak_rss() - before) >> 20
        line = next(line for line in server.stop().splitlines() if "infer model=glm_image" in line)
        rows.append({"side": side, "measured_mb": peak, "estimate_mb": int(line.split("memory_mb=")[1].split()[0])})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--package", type=Path, help="exported package (default: the demo model, exported here)")
    p.add_argument("--max-memory", default="4G")
    p.add_argument("--largest", type=int, default=2048, help="the largest glm_image side to send")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    package = args.package
    if package is None:
        package = Path(tempfile.mkdtemp()) / "demo-onnx"
        subprocess.run([sys.executable, "-m", "glm_image_onnx", "export", str(ROOT / "models" / "demo"), str(package)],
                       check=True)
    result = {"stress": stress(package, args.max_memory, args.largest),
              "peaks": estimates(package, [256, 512, 1024, args.largest])}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    s = result["stress"]
    clean = all(code in (200, 400, 404, 408, 413, 429) for code in s["answers"].values())
    ok = clean and s["alive_after"] and s["normal"].get("200", 0) > 0 and not s["tracebacks"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
