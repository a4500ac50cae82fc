"""Memory of `dit_decoder` calls at real token counts: resident bytes above the loaded session.

Unpadded CFG rows one call at a time (the runtime's calls at large sizes, so the flash attention
path), each call's peak sampled every 10 ms in this process: total RSS and anonymous RSS
(`/proc/self/status` RssAnon), which leaves out weight pages that onnxruntime maps from external
data and touches during the first run.

    python benchmarks/bench_dit_memory.py PKG --size 2048 [--memory exact|pattern|arena] [--mem-reuse] [--calls 2]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import onnxruntime as ort
import psutil

from glm_image_onnx.runtime.package import Package
from glm_image_onnx.runtime.pipeline import MEMORY
from glm_image_onnx.runtime.providers import MEMORY_MODES, session_options

GiB = 1 << 30


def rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def feeds(package: Package, size: int, text_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One unpadded text-to-image row at size x size, shapes from the manifest."""
    cfg = package.graphs["dit_decoder"].config
    rng = np.random.default_rng(seed)
    side = size // package.pipeline.vae.scale_factor  # latent pixels
    n = (side // cfg.patch_size) ** 2  # image tokens
    empty = np.zeros((cfg.num_layers, 1, 0, cfg.num_heads, cfg.head_dim), np.float32)
    return {
        "hidden_states": rng.standard_normal((1, cfg.in_channels, side, side), np.float32),
        "encoder_hidden_states": rng.standard_normal((1, text_len, cfg.text_embed_dim), np.float32),
        "prior_token_id": rng.integers(0, cfg.prior_codebook_size, (1, n), dtype=np.int64),
        "prior_token_drop": np.zeros((1, n), bool),
        "timestep": np.array([500.0], np.float32),
        "target_size": np.array([[size, size]], np.float32),
        "crop_coords": np.zeros((1, 2), np.float32),
        "encoder_attention_mask": np.ones((1, text_len), np.int64),
        "condition_keys": empty,
        "condition_values": empty,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", help="a cpu package (its dit_decoder is run)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--text-len", type=int, default=64, help="glyph tokens")
    parser.add_argument("--memory", choices=MEMORY_MODES, default=MEMORY["dit_decoder"],
                        help="providers.MEMORY_MODES (default: the runtime's for the DiT)")
    parser.add_argument("--mem-reuse", action="store_true",
                        help="onnxruntime's buffer-reuse planner on (the runtime turns it off)")
    parser.add_argument("--calls", type=int, default=2, help="calls in a row (a CFG step at large sizes: 2)")
    args = parser.parse_args()

    options = session_options("cpu", memory=args.memory)  # the runtime's, with the switches compared here
    options.enable_mem_reuse = args.mem_reuse
    package = Package.open(args.package, verify_files="off")
    session = ort.InferenceSession(str(package.graph_path("dit_decoder")), options,
                                   providers=["CPUExecutionProvider"])
    feed = feeds(package, args.size, args.text_len)
    proc = psutil.Process()
    base, base_anon = proc.memory_info().rss, rss_anon()
    peak, peak_anon, done = base, base_anon, False

    def sample() -> None:
        nonlocal peak, peak_anon
        while not done:
            peak, peak_anon = max(peak, proc.memory_info().rss), max(peak_anon, rss_anon())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    calls = []
    for _ in range(args.calls):  # the first call also records onnxruntime's memory pattern
        peak, peak_anon = proc.memory_info().rss, rss_anon()
        t0 = time.perf_counter()
        session.run(None, feed)
        calls.append({"seconds": round(time.perf_counter() - t0, 2), "above_gib": round((peak - base) / GiB, 3),
                      "anon_above_gib": round((peak_anon - base_anon) / GiB, 3)})
    done = True
    sampler.join()
    print(json.dumps({"tokens": feed["prior_token_id"].shape[1] + args.text_len, "memory": args.memory,
                      "mem_reuse": args.mem_reuse,
                      "weights_gib": round(base / GiB, 3), "calls": calls}))


if __name__ == "__main__":
    main()
