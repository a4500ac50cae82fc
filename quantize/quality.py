"""How much a quantised package differs from its fp32 source, measured three ways.

1. Per graph: outputs of the new graph vs the fp32 graph on inputs captured from fresh fp32 runs
   (prompts and seeds that calibration never saw): max absolute and relative L2 error.
2. AR planner: greedy decoding over N prompts. Teacher-forced top-1 agreement (both models fed the
   fp32 token sequence; does the quantised argmax match at each step?) and free-running agreement
   (prefix match length, share of equal tokens).
3. End to end: PSNR and SSIM of the final image vs the fp32 package, once with the fp32 AR tokens
   and the same initial latents (the runtime's step methods: glyph encoder, DiT, VAE errors only),
   once free-running (each package plans its own tokens from the same seed).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from glm_image_onnx.quantize.capture import Feed

# PSNR of identical images is infinite; the report caps it so that the manifest stays strict JSON.
PSNR_CAP = 100.0


# -------------------------------------------------------------------------------------- metrics
def psnr(ref: np.ndarray, got: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    if mse == 0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(data_range ** 2 / mse))


def _gaussian_filter(x: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """'valid' separable Gaussian filter over the first two axes of [H, W, C]."""
    k = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    k /= k.sum()
    windows = np.lib.stride_tricks.sliding_window_view
    h = windows(x, size, axis=0) @ k  # [H - size + 1, W, C]
    return windows(h, size, axis=1) @ k


def ssim(ref: np.ndarray, got: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of [H, W, C] images."""
    a, b = ref.astype(np.float64), got.astype(np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    size = min(11, a.shape[0], a.shape[1])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    f = lambda x: _gaussian_filter(x, size)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    var_a = f(a * a) - mu_a ** 2
    var_b = f(b * b) - mu_b ** 2
    cov = f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(np.mean(s))


# ----------------------------------------------------------------------------------- per graph
def _group(name: str) -> str:
    """`present.3.key` -> `present.*.key`: one row per family of per-layer outputs."""
    return re.sub(r"\.\d+\.", ".*.", name)


def graph_errors(ref_path: Path, got_path: Path, feeds: Sequence[Feed], threads: int | None = None
                 ) -> dict[str, Any]:
    """Worst max-abs and relative L2 error (over all feeds) of each output family."""
    from glm_image_onnx.runtime.providers import ProviderRequest, create_session, input_types

    cpu = ProviderRequest("cpu")
    ref = create_session(ref_path, cpu, threads)
    got = create_session(got_path, cpu, threads)
    got_types = input_types(got)  # a half-precision graph takes its cache in float16
    names = [o.name for o in ref.get_outputs()]
    acc: dict[str, list[float]] = {}
    integer: set[str] = set()
    for feed in feeds:
        a = ref.run(names, feed)
        b = got.run(names, {k: _as_input(v, got_types[k]) for k, v in feed.items()})
        for name, x, y in zip(names, a, b):
            if np.asarray(x).dtype.kind in "iub":
                # Ids (the vision tokenizer's codebook indices): the share of mismatches counts.
                e = acc.setdefault(_group(name), [0.0, 0.0, 0.0, 0.0])
                e[0] = max(e[0], float(np.max(np.asarray(x) != np.asarray(y), initial=0)))
                e[1] += float(np.count_nonzero(np.asarray(x) != np.asarray(y)))
                e[2] += float(np.size(x))
                integer.add(_group(name))
                continue
            x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
            finite = np.isfinite(y64)
            d = np.where(finite, x64 - y64, 0.0)
            e = acc.setdefault(_group(name), [0.0, 0.0, 0.0, 0.0])
            e[0] = max(e[0], float(np.max(np.abs(d), initial=0.0)))
            e[1] += float(np.sum(d * d))
            e[2] += float(np.sum(x64 * x64))
            e[3] += float(np.size(y64) - np.count_nonzero(finite))
    outputs = {k: ({"max_abs": v[0], "rel_l2": v[1] / max(v[2], 1.0), "nonfinite": 0, "metric": "mismatch share"}
                   if k in integer else
                   {"max_abs": v[0], "rel_l2": math.sqrt(v[1] / v[2]) if v[2] > 0 else math.sqrt(v[1]),
                    "nonfinite": int(v[3])}) for k, v in acc.items()}
    main = _group(names[0])
    return {"cases": len(feeds), "outputs": outputs, "main_output": main,
            "max_abs": outputs[main]["max_abs"] if outputs else 0.0,
            "rel_l2": outputs[main]["rel_l2"] if outputs else 0.0,
            "worst_rel_l2": max((o["rel_l2"] for o in outputs.values()), default=0.0),
            "nonfinite": sum(o["nonfinite"] for o in outputs.values())}


def _as_input(value: Any, dtype: Any) -> np.ndarray:
    """A captured float feed in the dtype the graph takes (only float widths ever differ)."""
    value = np.asarray(value)
    if value.dtype.kind == "f" and np.dtype(dtype).kind == "f" and value.dtype != dtype:
        return value.astype(dtype)
    return value


def subsample(feeds: Sequence[Feed], limit: int) -> list[Feed]:
    if len(feeds) <= limit:
        return list(feeds)
    idx = np.linspace(0, len(feeds) - 1, limit).round().astype(int)
    return [feeds[i] for i in sorted(set(idx))]


# ------------------------------------------------------------------------------------ AR planner
class _Greedy:
    """A sampler for `generate_prior_tokens`: greedy over the codebook, recording each argmax;
    with `forced`, it returns the given tokens instead (teacher forcing)."""

    def __init__(self, codebook_size: int, forced: np.ndarray | None = None):
        self.codebook_size, self.forced, self.argmax = codebook_size, forced, []

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        top = np.argmax(np.asarray(logits, np.float32)[:, : self.codebook_size], axis=-1).astype(np.int64)
        step = len(self.argmax)
        self.argmax.append(int(top[0]))
        if self.forced is not None:
            return np.full_like(top, int(self.forced[step]))
        return top


def ar_agreement(ref: Any, got: Any, prompts: Sequence[str], height: int, width: int, compare: bool = True
                 ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Greedy AR planning on both pipelines; returns the report ({} without `compare`: only the
    fp32 tokens are planned) and the fp32 prior ids per prompt."""
    per_prompt, priors = [], []
    buckets = np.zeros(10)
    bucket_n = np.zeros(10)
    for prompt in prompts:
        g_ref = _Greedy(ref.codebook_size)
        tokens_ref, prior_ref, _ = ref.generate_prior_tokens(prompt, height=height, width=width, sampler=g_ref)
        priors.append(prior_ref)
        if not compare:
            continue
        forced = _Greedy(got.codebook_size, forced=np.asarray(tokens_ref))
        got.generate_prior_tokens(prompt, height=height, width=width, sampler=forced)
        agree = np.asarray(forced.argmax) == np.asarray(tokens_ref)
        pos = (np.arange(agree.size) * 10 // max(agree.size, 1)).astype(int)
        np.add.at(buckets, pos, agree)
        np.add.at(bucket_n, pos, 1)
        tokens_got, _, _ = got.generate_prior_tokens(prompt, height=height, width=width,
                                                     sampler=_Greedy(got.codebook_size))
        equal = np.asarray(tokens_got) == np.asarray(tokens_ref)
        prefix = int(np.argmin(equal)) if not equal.all() else int(equal.size)
        per_prompt.append({"tokens": int(equal.size), "top1_agreement": float(agree.mean()),
                           "first_top1_disagreement": int(np.argmin(agree)) if not agree.all() else None,
                           "greedy_equal": float(equal.mean()), "greedy_prefix": prefix})
    if not compare:
        return {}, priors
    report = {
        "prompts": len(prompts),
        "tokens_per_prompt": per_prompt[0]["tokens"] if per_prompt else 0,
        "top1_agreement": float(np.mean([p["top1_agreement"] for p in per_prompt])),
        "top1_agreement_by_decile": [round(float(b / n), 4) if n else None for b, n in zip(buckets, bucket_n)],
        "greedy_equal": float(np.mean([p["greedy_equal"] for p in per_prompt])),
        "greedy_prefix_mean": float(np.mean([p["greedy_prefix"] for p in per_prompt])),
        "greedy_prefix_min": int(min(p["greedy_prefix"] for p in per_prompt)),
        "per_prompt": per_prompt,
    }
    return report, priors


# ------------------------------------------------------------------------------------ end to end
def image_fixed(pipe: Any, prompt: str, prior: np.ndarray, latents: np.ndarray, height: int, width: int,
                steps: int, scale: float) -> np.ndarray:
    """One image from `prior` tokens and initial `latents` (no AR planner): the DiT and VAE alone."""
    cond, uncond = pipe.encode_glyphs(prompt)
    lat, _ = pipe.denoise(latents.copy(), prompt_embeds=cond, negative_prompt_embeds=uncond, prior_token_ids=prior,
                          height=height, width=width, num_inference_steps=steps, guidance_scale=scale)
    return pipe.decode(lat)[0]


def end_to_end(ref: Any, got: Any, prompts: Sequence[str], priors: Sequence[np.ndarray], height: int,
               width: int, steps: int, seed: int, guidance_scale: float | None = None,
               free_running: bool = True) -> dict[str, Any]:
    """Image PSNR/SSIM vs fp32: with the fp32 tokens and latents, and free-running (same seed)."""
    scale = float(guidance_scale if guidance_scale is not None else ref.defaults.guidance_scale)
    fixed, free = [], []
    for k, (prompt, prior) in enumerate(zip(prompts, priors)):
        shape = (1, ref.latent_channels, height // ref.vae_scale, width // ref.vae_scale)
        latents = np.random.default_rng(seed + k).standard_normal(shape, dtype=np.float32)
        a = image_fixed(ref, prompt, prior, latents, height, width, steps, scale)
        b = image_fixed(got, prompt, prior, latents, height, width, steps, scale)
        fixed.append({"psnr_db": psnr(a, b), "ssim": ssim(a, b), "nonfinite": int(np.size(b) - np.count_nonzero(np.isfinite(b)))})
        if free_running:
            kw = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=scale, seed=seed + k)
            ia = np.asarray(ref(prompt, **kw).images[0], np.float32) / 255.0
            ib = np.asarray(got(prompt, **kw).images[0], np.float32) / 255.0
            free.append({"psnr_db": psnr(ia, ib), "ssim": ssim(ia, ib)})

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            return {}
        return {"nonfinite": sum(r.get("nonfinite", 0) for r in rows),
                "psnr_db_min": min(r["psnr_db"] for r in rows), "psnr_db_mean": float(np.mean([r["psnr_db"] for r in rows])),
                "ssim_min": min(r["ssim"] for r in rows), "ssim_mean": float(np.mean([r["ssim"] for r in rows])),
                "images": len(rows)}

    return {"size": [height, width], "steps": steps, "guidance_scale": scale,
            "fixed_tokens": summary(fixed), "free_running": summary(free),
            "note": "fixed_tokens: fp32 AR tokens and the same initial latents (glyph encoder, DiT and VAE "
                    "error only); free_running: each package samples its own tokens from the same seed"}


# ------------------------------------------------------------------------------------ thresholds
@dataclass
class Thresholds:
    min_psnr: float | None = None  # dB, image at fixed tokens and latents (worst prompt)
    min_ssim: float | None = None  # image at fixed tokens and latents (worst prompt)
    min_free_psnr: float | None = None  # dB, free-running image (worst prompt)
    min_top1: float | None = None  # percent, AR teacher-forced top-1 agreement (mean)
    max_rel_error: float | None = None  # relative L2 error of any graph's main output

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def failures(self, report: dict[str, Any]) -> list[str]:
        out = []
        fixed = report.get("end_to_end", {}).get("fixed_tokens", {})
        free = report.get("end_to_end", {}).get("free_running", {})
        ar = report.get("ar_planner")
        if self.min_psnr is not None and fixed and fixed["psnr_db_min"] < self.min_psnr:
            out.append(f"image PSNR at fixed tokens {fixed['psnr_db_min']:.2f} dB < {self.min_psnr:g} dB")
        if self.min_ssim is not None and fixed and fixed["ssim_min"] < self.min_ssim:
            out.append(f"image SSIM at fixed tokens {fixed['ssim_min']:.4f} < {self.min_ssim:g}")
        if self.min_free_psnr is not None and free and free["psnr_db_min"] < self.min_free_psnr:
            out.append(f"free-running image PSNR {free['psnr_db_min']:.2f} dB < {self.min_free_psnr:g} dB")
        if self.min_top1 is not None and ar and 100 * ar["top1_agreement"] < self.min_top1:
            out.append(f"AR top-1 agreement {100 * ar['top1_agreement']:.1f}% < {self.min_top1:g}%")
        if self.max_rel_error is not None:
            for name, g in report.get("graphs", {}).items():
                if g.get("rel_l2", 0.0) > self.max_rel_error:
                    out.append(f"{name}: relative L2 error {g['rel_l2']:.2e} > {self.max_rel_error:g}")
        for name, g in report.get("graphs", {}).items():
            if g.get("nonfinite"):
                out.append(f"{name}: {g['nonfinite']} non-finite output values")
        if fixed and fixed.get("nonfinite"):
            out.append("non-finite image values")
        return out


# ----------------------------------------------------------------------------------------- table
def format_table(recipe: str, sizes: dict[str, dict[str, Any]], report: dict[str, Any]) -> str:
    """The quality report as plain-text tables (printed by the CLI, stored in the manifest)."""
    lines = [f"quantization recipe {recipe}",
             f"{'graph':<22}{'fp32 MB':>10}{'new MB':>10}{'ratio':>8}{'fp32 left':>11}{'max abs':>11}{'rel L2':>11}  settings"]
    tot_a = tot_b = 0
    for name, s in sizes.items():
        g = report.get("graphs", {}).get(name, {})
        tot_a += s["bytes_before"]
        tot_b += s["bytes_after"]
        left = s.get("fp32_weight_share")
        lines.append(f"{name:<22}{s['bytes_before'] / 1e6:>10.2f}{s['bytes_after'] / 1e6:>10.2f}"
                     f"{s['bytes_after'] / max(s['bytes_before'], 1):>8.1%}"
                     f"{'-' if left is None else format(left, '.1%'):>11}"
                     f"{_num(g, 'max_abs'):>11}{_num(g, 'rel_l2'):>11}"
                     f"  {s.get('summary', '')}")
    lines.append(f"{'total':<22}{tot_a / 1e6:>10.2f}{tot_b / 1e6:>10.2f}{tot_b / max(tot_a, 1):>8.1%}")
    ar = report.get("ar_planner")
    if ar:
        lines.append(f"AR planner ({ar['prompts']} prompts x {ar['tokens_per_prompt']} tokens, greedy): "
                     f"top-1 agreement {100 * ar['top1_agreement']:.1f}% (teacher-forced), "
                     f"free-running equal {100 * ar['greedy_equal']:.1f}%, prefix match mean "
                     f"{ar['greedy_prefix_mean']:.1f} / min {ar['greedy_prefix_min']}")
    e2e = report.get("end_to_end")
    if e2e and e2e.get("fixed_tokens"):
        f, r = e2e["fixed_tokens"], e2e.get("free_running") or {}
        line = (f"image {e2e['size'][0]}x{e2e['size'][1]}, {e2e['steps']} steps: fixed tokens+latents PSNR "
                f"{f['psnr_db_min']:.2f} dB min / {f['psnr_db_mean']:.2f} mean, SSIM {f['ssim_min']:.4f} min")
        if r:
            line += f"; free-running PSNR {r['psnr_db_min']:.2f} dB min, SSIM {r['ssim_min']:.4f} min"
        lines.append(line)
    return "\n".join(lines)


def _num(row: dict[str, Any], key: str) -> str:
    return format(row[key], ".2e") if row and key in row else "-"


Log = Callable[[str], None]
