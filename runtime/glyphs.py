"""Glyph (quoted text) inputs of the ByT5 text encoder, as `GlmImagePipeline._get_glyph_embeds` builds them.

ByT5 needs no vocabulary: a token is a UTF-8 byte + 3 (ids 0..2 are pad, eos, unk). The only
non-byte tokens are the added ones (`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`) that transformers'
slow tokenizer matches literally in the text first, stripping whitespace next to the ones marked
lstrip/rstrip; that is reproduced so a prompt quoting such a string still matches.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glm_image_onnx.runtime.prompt import token_content

# `get_glyph_texts`: four patterns, concatenated in this order (not in order of appearance).
_GLYPH_PATTERNS = (r"'([^']*)'", r"\u201c([^\u201c\u201d]*)\u201d", r'"([^"]*)"', r"「([^「」]*)」")


def glyph_texts(prompt: str) -> list[str]:
    """The quoted texts of one prompt, in the pipeline's order (all '...', then “...”, "...", 「...」)."""
    return [t for pattern in _GLYPH_PATTERNS for t in re.findall(pattern, prompt)]


@dataclass(frozen=True)
class _Added:
    id: int
    lstrip: bool
    rstrip: bool


@dataclass
class ByteTokenizer:
    """ByT5's tokenizer (transformers' `ByT5Tokenizer`, slow) without transformers."""

    pad_id: int = 0
    eos_id: int = 1
    offset: int = 3  # ByT5: len({pad, eos, unk}); bytes start here
    added: dict[str, _Added] | None = None

    def __post_init__(self) -> None:
        if self.added is None:  # ByT5Tokenizer() defaults: extra_ids=125 at 259..383
            self.added = {"<pad>": _Added(0, True, True), "</s>": _Added(1, True, True),
                          "<unk>": _Added(2, True, True),
                          **{f"<extra_id_{i}>": _Added(259 + i, False, False) for i in range(125)}}
        # Longest first, so a regex alternation splits like transformers' longest-match trie.
        names = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @classmethod
    def from_dir(cls, folder: Path | str) -> "ByteTokenizer":
        """From a saved `ByT5Tokenizer` folder (the checkpoint's / package's `tokenizer/`)."""
        folder = Path(folder)
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        cls_name = cfg.get("tokenizer_class", "ByT5Tokenizer")
        if cls_name != "ByT5Tokenizer":
            raise ValueError(f"{cfg_path}: tokenizer_class {cls_name!r}; only ByT5Tokenizer is supported")
        added: dict[str, _Added] = {}
        for idx, tok in (cfg.get("added_tokens_decoder") or {}).items():
            added[tok["content"]] = _Added(int(idx), bool(tok.get("lstrip")), bool(tok.get("rstrip")))
        extra = folder / "added_tokens.json"
        if extra.exists():  # older saves: content -> id only
            for content, idx in json.loads(extra.read_text()).items():
                added.setdefault(content, _Added(int(idx), False, False))
        if not added:
            return cls()
        default = cls()
        pad = token_content(cfg.get("pad_token", "<pad>"))
        eos = token_content(cfg.get("eos_token", "</s>"))
        pad_id = added[pad].id if pad in added else default.pad_id
        eos_id = added[eos].id if eos in added else default.eos_id
        return cls(pad_id=pad_id, eos_id=eos_id, added=added)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """`tokenizer(text, max_length=..., truncation=True).input_ids` (eos appended)."""
        pieces = self._split.split(text) if self._split else [text]
        # transformers strips whitespace around added tokens with rstrip/lstrip, then drops empties
        for i, piece in enumerate(pieces):
            tok = self.added.get(piece) if i % 2 == 1 else None
            if tok is None:
                continue
            if tok.rstrip and i + 1 < len(pieces) and pieces[i + 1]:
                pieces[i + 1] = pieces[i + 1].lstrip()
            if tok.lstrip and i > 0 and pieces[i - 1]:
                pieces[i - 1] = pieces[i - 1].rstrip()
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 1:
                ids.append(self.added[piece].id)
            else:
                ids.extend(b + self.offset for b in piece.encode("utf-8"))
        if max_length is not None:
            ids = ids[: max(max_length - 1, 0)]  # truncation keeps room for the eos
        if not ids or ids[-1] != self.eos_id:  # `_add_eos_if_not_present`
            ids.append(self.eos_id)
        return ids


_DEFAULT = ByteTokenizer()
# The pipeline's `max_sequence_length` for the glyph encoder: longer quoted texts are truncated.
GLYPH_MAX_LENGTH = 2048


def glyph_batch(texts: list[str], max_length: int = GLYPH_MAX_LENGTH,
                tokenizer: ByteTokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int64 [n, L], attention_mask int64 [n, L]) for one prompt's glyph texts.

    An empty list means `[""]` (the pipeline's no-quotes / negative-prompt case). Reproduces the
    pipeline's odd `[pad] * ((n + 1) % 2)` prefix, where n is the *number of texts*: with an even
    count every row starts with a pad that is attended to (mask 1) and kept by `gather_rows`.
    """
    tok = tokenizer or _DEFAULT
    texts = list(texts) or [""]
    rows = [tok.encode(t, max_length) for t in texts]
    rows = [[tok.pad_id] * ((len(rows) + 1) % 2) + r for r in rows]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tok.pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def gather_rows(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """`last_hidden_state[attention_mask.bool()].unsqueeze(0)`: the attended rows of every text,
    concatenated in order -> [1, T, D]."""
    return np.asarray(last_hidden_state)[np.asarray(attention_mask).astype(bool)][None]
