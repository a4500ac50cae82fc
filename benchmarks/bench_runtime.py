"""diffusers-PyTorch vs the torch-free onnxruntime pipeline on the `bench` preset, with roofline floors.

One run prints a table: end-to-end and per-stage medians (AR prefill, AR per token, glyph encoder,
DiT per step, VAE), the peak RSS of each measuring process, each stage's floor on this machine, and
the ratios runtime/diffusers and runtime/floor; it also checks that both produce the same image.

How it measures (the machine is shared and noisy, so nothing is compared across runs):
- every configuration runs in its own fresh subprocess, interleaved: diffusers, runtime, floor,
  diffusers, runtime, floor, ... (`--processes` of each); each process does one warm-up call and
  `--runs` measured calls and reports its medians; the table shows the median over processes.
- "floor" processes measure the machine: read bandwidth (a large numpy sum on `--threads` threads)
  and the fp32 GEMM rate (the best of numpy's BLAS and an onnxruntime MatMul, 1024..2048 square).
  A stage's floor is max(FLOPs / GEMM rate, weight bytes read / bandwidth): the AR decode is the
  weight term (every weight but the embedding table is read once per token), the DiT step is the
  FLOP term (the CFG batch of 2 included).
- FLOPs and weight bytes are counted once, from the graphs themselves: one profiled runtime call
  with graph optimisations off lists every MatMul/Gemm/Conv with its real shapes (2*M*N*K each).
- greedy AR (diffusers: `generation_config.top_k = 1`) and the same initial latents on both sides;
  the AR tokens must match and the max abs pixel difference is printed.

Run `python benchmarks/bench_runtime.py --help`; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

PROMPT = "a red cat holding a sign that says 'HELLO GLM'"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glm-image-onnx" / "bench"
CONFIGS = ("diffusers", "runtime", "floor")
# stage key, label, unit scale (seconds -> shown unit), unit
STAGES = [
    ("ar_prefill_s", "AR prefill", 1e3, "ms"),
    ("ar_per_token_s", "AR per token", 1e3, "ms"),
    ("ar_decode_s", "AR decode (all tokens)", 1.0, "s"),
    ("glyph_s", "glyph encoder", 1e3, "ms"),
    ("dit_per_step_s", "DiT per step (CFG batch)", 1e3, "ms"),
    ("dit_s", "DiT (all steps)", 1.0, "s"),
    ("vae_s", "VAE decode", 1e3, "ms"),
    ("total_s", "end to end", 1.0, "s"),
]


# ------------------------------------------------------------------------------------------ helpers
def _physical_cores() -> int:
    from glm_image_onnx.runtime.providers import physical_cores  # torch-free, like the runtime

    return physical_cores()


def _busy_cpu_s() -> float:
    """CPU seconds spent by the whole machine (all processes), from /proc/stat; 0 where unavailable."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _others_cores(since: tuple[float, float, float]) -> float:
    """Cores other processes kept busy on average since `since` = (_busy_cpu_s(), process_time(),
    perf_counter()) was taken: the machine's busy CPU time minus this process's, per wall second."""
    b0, c0, w0 = since
    return max(0.0, (_busy_cpu_s() - b0) - (time.process_time() - c0)) / (time.perf_counter() - w0)


def _now() -> tuple[float, float, float]:
    return _busy_cpu_s(), time.process_time(), time.perf_counter()


def wait_idle(limit_s: float, idle: float = 0.9) -> float:
    """Wait (at most limit_s) until the machine is >= `idle` idle over 2 s; returns the seconds waited."""
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    while time.perf_counter() - t0 < limit_s:
        b0, w0 = _busy_cpu_s(), time.perf_counter()
        time.sleep(2)
        if (_busy_cpu_s() - b0) / ((time.perf_counter() - w0) * cores) <= 1 - idle:
            break
    return time.perf_counter() - t0


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _call_medians(calls: list[dict[str, float]]) -> dict[str, float]:
    keys = calls[0].keys()
    return {k: _median([c[k] for c in calls]) for k in keys}


def _measure(call: Callable[[], dict[str, float]], runs: int) -> list[dict[str, float]]:
    """One warm-up call (first-call allocations, lazy initialisation, page faults on the weights),
    then `runs` measured calls, each with `others_cores`: how many cores other processes kept busy
    meanwhile (the machine is shared; a reader can tell a quiet run from a contended one)."""
    call()
    calls = []
    for _ in range(runs):
        since = _now()
        result = call()
        result["others_cores"] = _others_cores(since)
        calls.append(result)
    return calls


# ------------------------------------------------------------------------------- child: diffusers
def child_diffusers(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from diffusers import GlmImagePipeline

    pipe = GlmImagePipeline.from_pretrained(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    ar = pipe.vision_language_encoder
    ar.generation_config.top_k = 1  # the pipeline always samples; top_k = 1 makes it greedy
    latents = torch.from_numpy(np.load(work / "latents.npy"))

    # Stage clocks from module hooks: AR forwards (the first of a generate call is the prefill),
    # glyph encoder forwards, DiT step ends (callback), VAE decode.
    ev: dict[str, list] = {}

    def reset() -> None:
        ev.clear()
        ev.update(ar_start=[], ar_end=[], glyph=[], dit_first=[], step_end=[], vae=[], tokens=[])

    def hook_pair(module: Any, start: str, end: str) -> None:
        module.register_forward_pre_hook(lambda *_: ev[start].append(time.perf_counter()))
        module.register_forward_hook(lambda *_: ev[end].append(time.perf_counter()))

    hook_pair(ar, "ar_start", "ar_end")
    t_glyph: list[float] = []
    pipe.text_encoder.register_forward_pre_hook(lambda *_: t_glyph.append(time.perf_counter()))
    pipe.text_encoder.register_forward_hook(lambda *_: ev["glyph"].append(time.perf_counter() - t_glyph.pop()))
    pipe.transformer.register_forward_pre_hook(
        lambda *_: ev["dit_first"].append(time.perf_counter()) if not ev["dit_first"] else None)
    generate, vae_decode = ar.generate, pipe.vae.decode

    def recording_generate(*a: Any, **kw: Any) -> Any:
        out = generate(*a, **kw)
        ev["tokens"].append(out[0, kw["input_ids"].shape[1]:].numpy().copy())
        return out

    def timed_decode(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = vae_decode(*a, **kw)
        ev["vae"].append(time.perf_counter() - t)
        return out

    ar.generate, pipe.vae.decode = recording_generate, timed_decode

    def on_step_end(_pipe: Any, _i: int, _t: Any, kwargs: dict) -> dict:
        ev["step_end"].append(time.perf_counter())
        return kwargs

    image: list[Any] = []

    def call() -> dict[str, float]:
        reset()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(prompt=args.prompt, height=args.height, width=args.width,
                       num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents.clone(),
                       callback_on_step_end=on_step_end)
        total = time.perf_counter() - t0
        image[:] = [np.asarray(out.images[0])]
        ends = ev["ar_end"]
        steps = np.diff([ev["dit_first"][0]] + ev["step_end"])
        return {
            "ar_prefill_s": ends[0] - ev["ar_start"][0],
            "ar_per_token_s": float(np.median(np.diff(ends))),
            "ar_decode_s": ends[-1] - ends[0],
            "glyph_s": sum(ev["glyph"]),
            "dit_per_step_s": float(np.median(steps)),
            "dit_s": float(np.sum(steps)),
            "vae_s": sum(ev["vae"]),
            "total_s": total,
        }

    calls = _measure(call, args.runs)
    np.save(work / "image.npy", image[0])
    np.save(work / "tokens.npy", ev["tokens"][0])
    return {"calls": calls, "peak_rss_mb": _peak_rss_mb(), "ar_forwards": len(ev["ar_end"])}


# --------------------------------------------------------------------------------- child: runtime
def child_runtime(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import numpy as np

    from glm_image_onnx.runtime import GlmImageOnnxPipeline

    pipe = GlmImageOnnxPipeline.from_package(args.package, threads=args.threads)
    latents = np.load(work / "latents.npy")
    last: list[Any] = []

    def call() -> dict[str, float]:
        t0 = time.perf_counter()
        out = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, latents=latents, do_sample=False)
        total = time.perf_counter() - t0
        last[:] = [out]
        return {**{k: getattr(out.timings, k) for k, *_ in STAGES if k != "total_s"}, "total_s": total}

    calls = _measure(call, args.runs)
    np.save(work / "image.npy", np.asarray(last[0].images[0]))
    np.save(work / "tokens.npy", last[0].tokens)
    assert "torch" not in sys.modules, "the runtime imported torch"
    return {"calls": calls, "peak_rss_mb": _peak_rss_mb(), "providers": pipe.providers}


# ----------------------------------------------------------------------------------- child: floor
def _onnx_matmul_session(n: int, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def child_floor(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Best-of-k machine rates: read bandwidth (GB/s) and fp32 GEMM (GFLOP/s)."""
    import threading

    import numpy as np

    reps = 7
    since = _now()
    # Read bandwidth: sum a 512 MB array (16x the L3 cache) split over `threads` threads (numpy
    # releases the GIL inside reductions); the AR weights are read, never written, per token.
    data = np.ones(128 * 1024 * 1024, np.float32)
    chunks = np.array_split(data, args.threads)
    bandwidth = 0.0
    for _ in range(reps):
        workers = [threading.Thread(target=np.sum, args=(c,)) for c in chunks]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        bandwidth = max(bandwidth, data.nbytes / (time.perf_counter() - t) / 1e9)
    del data, chunks

    rates: dict[str, float] = {}
    rng = np.random.default_rng(0)
    for n in (1024, 2048):
        a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
        session = _onnx_matmul_session(n, args.threads)
        for name, fn in (("numpy", lambda: a @ b), ("onnxruntime", lambda: session.run(None, {"A": a, "B": b}))):
            fn()
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                rates[name] = max(rates.get(name, 0.0), 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return {"bandwidth_gbs": bandwidth, "gemm_gflops": max(rates.values()), "others_cores": _others_cores(since),
            **{f"gemm_{k}_gflops": v for k, v in rates.items()}, "peak_rss_mb": _peak_rss_mb()}


# ---------------------------------------------------------------------------- child: work counts
def _weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of every initializer, bytes of those only gathered from: embedding tables)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    return sum(sizes.values()), sum(v for k, v in sizes.items() if k in gathered)


def _node_flops(event: dict, nodes: dict[str, Any], shapes: dict[str, list[int]]) -> float:
    """2*M*N*K of a MatMul/Gemm, 2*out*Cin/g*kh*kw of a Conv, from the profiled shapes."""
    import math

    args = event["args"]
    op = args["op_name"]
    if op not in ("MatMul", "Gemm", "Conv", "FusedMatMul"):
        return 0.0
    out = list(args["output_type_shape"][0].values())[0]
    node = nodes.get(event["name"][: -len("_kernel_time")])
    ins = [list(s.values())[0] for s in args["input_type_shape"]]
    a = ins[0] if ins else shapes.get(node.input[0], [])
    attrs = {x.name: x.i for x in node.attribute} if node is not None else {}
    if op == "Conv":
        w = shapes.get(node.input[1]) or (ins[1] if len(ins) > 1 else None)
        return 2.0 * math.prod(out) * math.prod(w[1:])
    k = a[-2] if (op == "Gemm" and attrs.get("transA")) else a[-1]
    return 2.0 * math.prod(out) * k


def child_work(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """FLOPs per stage call and weight bytes per graph, from one profiled, unoptimised runtime call."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from glm_image_onnx.manifest import T2I_GRAPHS
    from glm_image_onnx.runtime import GlmImageOnnxPipeline

    graphs = T2I_GRAPHS
    prof_dir = Path(tempfile.mkdtemp(prefix="prof-", dir=work))

    def profiled(so: ort.SessionOptions) -> None:
        # Unfused graphs: every MatMul/Gemm/Conv is its own node with its real shapes.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.enable_profiling = True
        so.profile_file_prefix = str(prof_dir / "p")

    pipe = GlmImageOnnxPipeline.from_package(args.package, threads=args.threads, configure_session=profiled)
    latents = np.load(work / "latents.npy")
    pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=1,
         guidance_scale=args.guidance, latents=latents, do_sample=False)

    result: dict[str, Any] = {}
    for g in graphs:
        path = pipe.package.graph_path(g)
        model = onnx.load(str(path), load_external_data=False)
        nodes = {n.name: n for n in model.graph.node}
        shapes = {t.name: list(t.dims) for t in model.graph.initializer}
        events = json.loads(Path(pipe.sessions[g].end_profiling()).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
        per_run = [0.0] * len(runs)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                i = next(j for j, r in enumerate(runs) if r["ts"] <= e["ts"] <= r["ts"] + r["dur"])
                per_run[i] += _node_flops(e, nodes, shapes)
        total, gathered = _weight_bytes(path)
        result[g] = {"flops_per_run": per_run, "weight_bytes": total, "gathered_bytes": gathered}
    ar = pipe.package.graphs["ar_planner"].config
    result["kv_bytes_per_position"] = 2 * ar.num_layers * ar.num_kv_heads * ar.head_dim * 4
    return result


CHILDREN = {"diffusers": child_diffusers, "runtime": child_runtime, "floor": child_floor, "work": child_work}


# ------------------------------------------------------------------------------------------ parent
def ensure_models(args: argparse.Namespace) -> None:
    """Build the bench checkpoint and its ONNX package where they are missing."""
    cli = [sys.executable, "-m", "glm_image_onnx"]
    if not (Path(args.checkpoint) / "model_index.json").exists():
        print(f"building the bench checkpoint in {args.checkpoint} ...", file=sys.stderr)
        Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(cli + ["init-checkpoint", "--preset", "bench", "--seed", "0", str(args.checkpoint)], check=True)
    if not (Path(args.package) / "manifest.json").exists():
        print(f"exporting it to {args.package} (about 2 minutes) ...", file=sys.stderr)
        Path(args.package).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(cli + ["export", str(args.checkpoint), str(args.package)], check=True)


def run_child(kind: str, args: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    out_dir = work / tag
    out_dir.mkdir()
    (out_dir / "latents.npy").symlink_to(work / "latents.npy")
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(out_dir),
           "--checkpoint", str(args.checkpoint), "--package", str(args.package), "--threads", str(args.threads),
           "--runs", str(args.runs), "--height", str(args.height), "--width", str(args.width),
           "--steps", str(args.steps), "--guidance", str(args.guidance), "--prompt", args.prompt]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} process failed:\n{proc.stderr[-4000:]}")
    result = json.loads((out_dir / "result.json").read_text())
    result["dir"] = str(out_dir)
    return result


def floors(work: dict[str, Any], machine: dict[str, float], ar_tokens: int, steps: int) -> dict[str, float]:
    """Per-stage floors in seconds: max(FLOPs / GEMM rate, weight bytes read / bandwidth)."""
    gemm, bw = machine["gemm_gflops"] * 1e9, machine["bandwidth_gbs"] * 1e9

    def roof(flops: float, graph: str) -> float:
        g = work[graph]
        return max(flops / gemm, (g["weight_bytes"] - g["gathered_bytes"]) / bw)

    ar_runs = work["ar_planner"]["flops_per_run"]
    decode_flops = _median(ar_runs[1:]) if len(ar_runs) > 1 else 0.0
    f = {
        "ar_prefill_s": roof(ar_runs[0], "ar_planner"),
        "ar_per_token_s": roof(decode_flops, "ar_planner"),
        "glyph_s": sum(roof(x, "glyph_encoder") for x in work["glyph_encoder"]["flops_per_run"]),
        "dit_per_step_s": roof(work["dit_decoder"]["flops_per_run"][0], "dit_decoder"),
        "vae_s": roof(work["vae_decoder"]["flops_per_run"][0], "vae_decoder"),
    }
    f["ar_decode_s"] = f["ar_per_token_s"] * (ar_tokens - 1)
    f["dit_s"] = f["dit_per_step_s"] * steps
    f["total_s"] = f["ar_prefill_s"] + f["ar_decode_s"] + f["glyph_s"] + f["dit_s"] + f["vae_s"]
    return f


def _fmt(x: float) -> str:
    if x != x:  # nan
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def report(args: argparse.Namespace, results: dict[str, list[dict]], work: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    med = {k: _call_medians([_call_medians(r["calls"]) for r in results[k]]) for k in ("diffusers", "runtime")}
    spread = {k: {s: (min(_call_medians(r["calls"])[s] for r in results[k]),
                      max(_call_medians(r["calls"])[s] for r in results[k])) for s, *_ in STAGES}
              for k in ("diffusers", "runtime")}
    machine = {k: _median([r[k] for r in results["floor"]]) for k in results["floor"][0] if k != "dir"}
    tokens_rt = np.load(Path(results["runtime"][0]["dir"]) / "tokens.npy")
    floor = floors(work, machine, len(tokens_rt), args.steps)
    rss = {k: _median([r["peak_rss_mb"] for r in results[k]]) for k in ("diffusers", "runtime")}

    # Same image: every runtime process against every diffusers process.
    diffs, tokens_equal = [], True
    for d in results["diffusers"]:
        ref_img, ref_tok = np.load(Path(d["dir"]) / "image.npy"), np.load(Path(d["dir"]) / "tokens.npy")
        for r in results["runtime"]:
            img, tok = np.load(Path(r["dir"]) / "image.npy"), np.load(Path(r["dir"]) / "tokens.npy")
            tokens_equal &= bool(np.array_equal(tok, ref_tok[: len(tok)]))
            diffs.append(float(np.abs(img.astype(np.int16) - ref_img.astype(np.int16)).max()))
    max_diff = max(diffs)

    n = args.processes
    lines = [
        f"GLM-Image {Path(args.package).name}, {args.height}x{args.width}, {args.steps} steps, CFG {args.guidance}, greedy AR "
        f"({len(tokens_rt)} tokens), same latents; {args.threads} threads",
        f"{n} processes per configuration, interleaved, {args.runs} measured call(s) each after a warm-up; "
        f"medians over processes [min..max of the process medians]",
        f"machine: read bandwidth {machine['bandwidth_gbs']:.1f} GB/s, fp32 GEMM {machine['gemm_gflops']:.0f} GFLOP/s "
        f"(numpy {machine['gemm_numpy_gflops']:.0f}, onnxruntime MatMul {machine['gemm_onnxruntime_gflops']:.0f})",
        "",
        f"{'stage':30s} {'diffusers':>22s} {'runtime':>22s} {'floor':>8s} {'rt/diff':>8s} {'rt/floor':>8s}",
    ]
    for key, label, scale, unit in STAGES:
        d, r, f = med["diffusers"][key] * scale, med["runtime"][key] * scale, floor[key] * scale
        ds = f"{_fmt(d)} [{_fmt(spread['diffusers'][key][0] * scale)}..{_fmt(spread['diffusers'][key][1] * scale)}]"
        rs = f"{_fmt(r)} [{_fmt(spread['runtime'][key][0] * scale)}..{_fmt(spread['runtime'][key][1] * scale)}]"
        lines.append(f"{label + ' (' + unit + ')':30s} {ds:>22s} {rs:>22s} {_fmt(f):>8s} {r / d:8.2f} {r / f:8.2f}")
    lines.append(f"{'peak RSS (MB)':30s} {rss['diffusers']:>22.0f} {rss['runtime']:>22.0f} {'':>8s} "
                 f"{rss['runtime'] / rss['diffusers']:8.2f}")
    lines.append(f"{'speed-up (end to end)':30s} {'':>22s} {med['diffusers']['total_s'] / med['runtime']['total_s']:>21.2f}x")
    ar, dit = work["ar_planner"], work["dit_decoder"]
    lines += [
        "",
        f"floors: AR token = {(ar['weight_bytes'] - ar['gathered_bytes']) / 1e6:.1f} MB of weights (embedding "
        f"table excluded) / bandwidth [the KV cache adds {work['kv_bytes_per_position'] / 1e3:.1f} kB per past "
        f"position, not counted]; DiT step = {dit['flops_per_run'][0] / 1e9:.2f} GFLOP (CFG batch 2) / GEMM rate; "
        f"prefill, glyph, VAE = max(FLOPs/GEMM, weights/bandwidth)",
        f"same image: AR tokens {'identical' if tokens_equal else 'DIFFERENT'}, max abs pixel diff "
        f"{max_diff:.0f}/255 = {max_diff / 255:.4f} over {len(diffs)} diffusers x runtime pairs",
        f"contention: other processes kept a median of {med['diffusers']['others_cores']:.2f} cores busy during the "
        f"diffusers calls, {med['runtime']['others_cores']:.2f} during the runtime calls, "
        f"{machine['others_cores']:.2f} during the floor measurements (of {os.cpu_count()})",
        f"providers: {', '.join(results['runtime'][0]['providers'])}",
    ]
    print("\n".join(lines))
    return {"medians": med, "spread": spread, "floors": floor, "machine": machine, "peak_rss_mb": rss,
            "tokens_equal": tokens_equal, "max_abs_pixel_diff": max_diff / 255, "work": work,
            "processes": {k: [{kk: vv for kk, vv in r.items() if kk != "dir"} for r in v] for k, v in results.items()},
            "args": {k: v for k, v in vars(args).items() if k not in ("child", "work")}, "table": "\n".join(lines)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=CACHE / "checkpoint",
                   help="bench checkpoint folder (built here if missing)")
    p.add_argument("--package", type=Path, default=CACHE / "package", help="its ONNX package (exported if missing)")
    p.add_argument("--processes", type=int, default=6, help="fresh processes per configuration")
    p.add_argument("--runs", type=int, default=2, help="measured calls per process (after one warm-up)")
    p.add_argument("--quick", action="store_true", help="2 processes of 1 measured call each")
    p.add_argument("--threads", type=int, default=_physical_cores(), help="threads for torch and onnxruntime")
    p.add_argument("--json", type=Path, help="write every number to this JSON file")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each process, wait up to S seconds for the machine to be 90%% idle")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.processes, args.runs = 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = CHILDREN[args.child](args, args.work)
        (args.work / "result.json").write_text(json.dumps(result))
        return 0

    import numpy as np

    ensure_models(args)
    with tempfile.TemporaryDirectory(prefix="glm-bench-") as tmp:
        work = Path(tmp)
        channels = json.loads((Path(args.package) / "manifest.json").read_text())["pipeline"]["vae"]["latent_channels"]
        latents = np.random.default_rng(0).standard_normal((1, channels, args.height // 8, args.width // 8),
                                                          dtype=np.float32)
        np.save(work / "latents.npy", latents)
        print("counting FLOPs and weight bytes (one profiled call) ...", file=sys.stderr)
        counts = run_child("work", args, work, "work")
        results: dict[str, list[dict]] = {k: [] for k in CONFIGS}
        for i in range(args.processes):
            for kind in CONFIGS:
                if args.wait_idle > 0:
                    wait_idle(args.wait_idle)
                t = time.perf_counter()
                results[kind].append(run_child(kind, args, work, f"{kind}-{i}"))
                print(f"[{i + 1}/{args.processes}] {kind}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
        summary = report(args, results, {k: v for k, v in counts.items() if k != "dir"})
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
