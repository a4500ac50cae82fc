"""Next-token choice for the AR planner, restricted to the image codebook.

Mirrors transformers' sampling order (temperature -> top-k -> top-p -> softmax -> draw) on numpy,
with a seeded numpy Generator so that a seed reproduces a run. Only codebook ids can be drawn:
the pipeline needs exactly `n` image tokens, so an early end-of-image or a non-codebook id from a
real model (which diffusers' pipeline would choke on) is never produced.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from glm_image_onnx.manifest import Generation


def random_seed() -> int:
    """A fresh seed for a call that gave none; below 2**62 so that a batch's seed + i stays an int64."""
    return int(np.random.SeedSequence().entropy % (2 ** 62))


def image_seeds(seed: int | None, count: int) -> list[int | None]:
    """The seed of each of `count` images asked for together: seed + i (a random seed for a batch
    given none; None, drawn later, for one image given none). Image 0 of a batch is thus the image
    one request with that seed gives; every caller (the pipeline's batch call, the OpenAI `n`) uses
    this rule."""
    if seed is None and count > 1:
        seed = random_seed()
    return [None if seed is None else int(seed) + i for i in range(count)]


class TokenSampler:
    def __init__(self, config: Generation, codebook_size: int, seed: int | None = None):
        self.config = config
        self.codebook_size = codebook_size
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [batch, vocab] -> token ids [batch] (int64), each < codebook_size."""
        return _choose(self.config, self.codebook_size, logits, lambda rows: self.rng.random((rows, 1)))


Sampler = Callable[[np.ndarray], np.ndarray]
"""logits [rows, vocab] -> token ids [rows]: a TokenSampler, or any callable (the quantiser's)."""


def sample_rows(samplers: list[Sampler], logits: np.ndarray) -> np.ndarray:
    """One token per row of logits [rows, vocab], row i with samplers[i] (its config and generator).

    TokenSampler rows with the same config are sampled in one vectorised pass; every operation
    works along the vocabulary axis of a C-contiguous row, and each row draws from its own
    generator, so a row's token is the one `samplers[i](logits[i:i + 1])` gives alone. Other
    callables are called row by row."""
    out = np.empty(len(samplers), np.int64)
    groups: dict[tuple[Generation, int], list[int]] = {}
    for i, s in enumerate(samplers):
        if isinstance(s, TokenSampler):
            groups.setdefault((s.config, s.codebook_size), []).append(i)
        else:
            out[i] = s(logits[i: i + 1])[0]
    for (config, codebook), rows in groups.items():
        def draws(n: int, rows: list[int] = rows) -> np.ndarray:
            return np.concatenate([samplers[i].rng.random((1, 1)) for i in rows])
        out[rows] = _choose(config, codebook, logits[rows], draws)
    return out


def _choose(cfg: Generation, codebook_size: int, logits: np.ndarray,
            uniforms: Callable[[int], np.ndarray]) -> np.ndarray:
    logits = np.ascontiguousarray(logits[:, :codebook_size], dtype=np.float32)
    greedy = not cfg.do_sample or cfg.top_k == 1
    if greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    scores = logits / np.float32(cfg.temperature)
    if cfg.top_k is not None and cfg.top_k < scores.shape[-1]:
        kth = np.partition(scores, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if cfg.top_p < 1.0:
        scores = _top_p(scores, cfg.top_p)
    probs = _softmax(scores)
    # Inverse-CDF draw: one uniform number per row.
    cdf = np.cumsum(probs, axis=-1)
    u = uniforms(probs.shape[0]) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def _softmax(scores: np.ndarray) -> np.ndarray:
    m = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - m)
    return e / e.sum(axis=-1, keepdims=True)


def _top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep >= 1."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cum = np.cumsum(_softmax(sorted_scores), axis=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)
