"""The demo model's world: signs with one word in named colours, the codebook that describes them,
the prompts that ask for them, and the OCR oracle that reads them back.

Numpy and Pillow only: the trainer (`models/demo_train.py`), the OCR benchmark and the tests all use
it, and none of it reaches the runtime or the server (they know nothing of the demo model).

A scene is 256x256: a grey wall, a sign band across cell rows 2-4 in the sign colour, and the word
centred in cell row 3, one letter per 32 px cell (the AR planner's target grid is one token per
32 px cell). The codebook is one token per cell, factored so that every token is common in training:

    0                 wall
    1 + 8*bg + fg     sign band cell (sign colour bg, letter colour fg), rows 2 and 4
    65                an empty cell of the letter row
    66 + i            letter i of A..Z in the letter row

The letter cells carry no colour: the DiT takes the colours from the band cells above and below
them. The preview grid (16x16 at 256 px), which the AR planner writes first and the DiT never sees,
is the same layout at 16 px cells: the planner spells the word there first, each letter twice.
(A preview with placeholder cells instead of letters was tried: the planner then placed the word
right but never learned to spell it in 4000 steps; spelling it in the preview too gives it five
times the letter supervision.)
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

SIZE = 256
CELL = 32
GRID = SIZE // CELL  # 8 target cells a side
BAND_ROWS = (2, 3, 4)
TEXT_ROW = 3
MIN_LETTERS, MAX_LETTERS = 3, GRID
FONT_SIZE = 30  # Pillow's embedded Aileron: the same glyphs on every machine, no font package

WALL_RGB = (150, 150, 150)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30), "green": (30, 140, 60), "blue": (30, 70, 200), "yellow": (240, 200, 30),
    "white": (245, 245, 245), "black": (20, 20, 20), "orange": (240, 120, 20), "purple": (120, 40, 160),
}
NAMES = tuple(COLOURS)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

WALL_TOKEN = 0
BLANK_TOKEN = 1 + len(NAMES) ** 2  # 65
LETTER_TOKEN0 = BLANK_TOKEN + 1  # 66
CODEBOOK_USED = LETTER_TOKEN0 + len(ALPHABET)  # 92 of the preset's codebook


def luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


# Pairs whose letters stand out in grey too (OCR reads luminance): the only pairs trained.
PAIRS: tuple[tuple[str, str], ...] = tuple(
    (bg, fg) for bg in NAMES for fg in NAMES
    if bg != fg and abs(luminance(COLOURS[bg]) - luminance(COLOURS[fg])) >= 110)


def default_letters(bg: str) -> str:
    """The letter colour when a prompt names only the sign's."""
    return "black" if luminance(COLOURS[bg]) >= 128 else "white"


def band_token(bg: str, fg: str) -> int:
    return 1 + len(NAMES) * NAMES.index(bg) + NAMES.index(fg)


def upsample(grid: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a token grid (the preview's cells, the DiT's prior tokens)."""
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


@dataclass(frozen=True)
class Sign:
    word: str  # A..Z, MIN_LETTERS..MAX_LETTERS letters
    bg: str  # sign colour
    fg: str  # letter colour

    def __post_init__(self) -> None:
        if not (MIN_LETTERS <= len(self.word) <= MAX_LETTERS and set(self.word) <= set(ALPHABET)):
            raise ValueError(f"a demo sign's word is {MIN_LETTERS}..{MAX_LETTERS} letters A-Z, got {self.word!r}")

    @property
    def start(self) -> int:
        """The first letter's column: the word centred (a cell to the left when the halves differ)."""
        return (GRID - len(self.word)) // 2

    def layout(self) -> np.ndarray:
        """The target grid's tokens [8, 8]."""
        grid = np.full((GRID, GRID), WALL_TOKEN, dtype=np.int64)
        grid[BAND_ROWS[0]] = grid[BAND_ROWS[-1]] = band_token(self.bg, self.fg)
        grid[TEXT_ROW] = BLANK_TOKEN
        for i, ch in enumerate(self.word):
            grid[TEXT_ROW, self.start + i] = LETTER_TOKEN0 + ALPHABET.index(ch)
        return grid

    def ar_tokens(self, preview: int = 16) -> np.ndarray:
        """What the AR planner generates: the preview grid (the layout at preview cells), then the target grid."""
        layout = self.layout()
        return np.concatenate([upsample(layout, preview // GRID).ravel(), layout.ravel()])

    def prior_tokens(self) -> np.ndarray:
        """The DiT's `prior_token_id` [1, 256] for this sign: the target grid upsampled 2x, as the
        pipeline hands it over."""
        return upsample(self.layout(), 2).reshape(1, -1)

    def render(self) -> Image.Image:
        font = ImageFont.load_default(size=FONT_SIZE)
        img = Image.new("RGB", (SIZE, SIZE), WALL_RGB)
        draw = ImageDraw.Draw(img)
        draw.rectangle([0, BAND_ROWS[0] * CELL, SIZE - 1, (BAND_ROWS[-1] + 1) * CELL - 1], fill=COLOURS[self.bg])
        fg = COLOURS[self.fg]
        for i, ch in enumerate(self.word):
            centre = ((self.start + i) * CELL + CELL // 2, TEXT_ROW * CELL + CELL // 2)
            draw.text(centre, ch, font=font, fill=fg, anchor="mm", stroke_width=1, stroke_fill=fg)
        return img


# How people ask for a sign. {bg} sign colour, {fg} letter colour, {w} the word in quotes.
TEMPLATES = (
    "a {bg} sign with {fg} letters that says '{w}'",
    "a {bg} sign that reads \"{w}\" in {fg}",
    "{fg} text '{w}' on a {bg} sign",
    "a {bg} label with the word '{w}' written in {fg}",
    "poster: '{w}', {fg} on {bg}",
    "the word \u201c{w}\u201d in {fg} letters on a {bg} background",
    "a shop sign saying '{w}', {fg} lettering on a {bg} board",
    "{bg} banner, {fg} letters: \u300c{w}\u300d",
    "a {bg} sign that says '{w}'",  # letter colour: default_letters(bg)
    "a sign that says '{w}'",  # white sign, black letters
    "a {bg} notice board with '{w}' painted in {fg}",
    "write '{w}' in {fg} on a {bg} plate",
)


def prompt_for(sign: Sign, template: str) -> str:
    return re.sub(r"\b([aA]) (?=[aeiou])", r"\1n ", template.format(bg=sign.bg, fg=sign.fg, w=sign.word))


def sign_for(template: str, word: str, rng: random.Random) -> Sign:
    """A sign that `template` describes fully: the colours it leaves unnamed take their defaults."""
    if "{bg}" not in template:
        return Sign(word, "white", "black")
    if "{fg}" not in template:
        bg = rng.choice(sorted({bg for bg, _ in PAIRS}))
        return Sign(word, bg, default_letters(bg))
    bg, fg = rng.choice(PAIRS)
    return Sign(word, bg, fg)


# Words the benchmark and tests ask for; the trainer never draws them (its words are random letters).
HELD_OUT_WORDS = (
    "OPEN", "CLOSED", "EXIT", "SALE", "HOTEL", "PIZZA", "TAXI", "BAKERY", "STOP", "PARK", "CAFE", "BANK",
    "MUSIC", "BOOKS", "FRESH", "LIGHT", "QUIET", "ZEBRA", "JUICE", "VIEW", "GARDEN", "WATER", "FIRE",
    "TRAIN", "HOUSE", "MARKET", "KING", "SHOP", "DANCE", "FOX", "JAZZ", "WIFI", "YOGA", "PUSH", "PULL",
    "SMILE", "NORTH", "SOUTH", "BRIDGE", "CLOCK", "MILK", "PHONE", "RADIO", "TOWER", "GOLD", "SILVER",
    "QUEEN", "VOTE", "WAVE", "DOCK", "HELP", "ICE", "SUN", "MOON",
)


def training_word(rng: random.Random) -> str:
    """Random letters (never a held-out word): the planner and the DiT learn letters, not words."""
    while True:
        word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS)))
        if word not in HELD_OUT_WORDS:
            return word


def training_example(rng: random.Random) -> tuple[str, Sign]:
    template = rng.choice(TEMPLATES)
    sign = sign_for(template, training_word(rng), rng)
    return prompt_for(sign, template), sign


def benchmark_set(n: int = 54, seed: int = 1234) -> list[tuple[str, Sign]]:
    """`n` prompts over the held-out words, cycling through every phrasing."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        sign = sign_for(template, HELD_OUT_WORDS[i % len(HELD_OUT_WORDS)], rng)
        out.append((prompt_for(sign, template), sign))
    return out


# Two held-out words, two phrasings, four colours: what the tests, the quick start and the device
# checks ask for (the first is the quick start's prompt).
SMOKE_CASES = (("a red sign with white letters that says 'OPEN'", Sign("OPEN", "red", "white")),
               ("black text 'QUEEN' on a yellow sign", Sign("QUEEN", "yellow", "black")))


# ---- the OCR oracle ---------------------------------------------------------------------------

def _band(image: Image.Image) -> np.ndarray:
    img = image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC) if image.size != (SIZE, SIZE) else image.convert("RGB")
    return np.asarray(img, dtype=np.float64)[BAND_ROWS[0] * CELL:(BAND_ROWS[-1] + 1) * CELL]


def read_word(image: Image.Image) -> str:
    """Tesseract's reading of the sign band (dark text on light, contrast stretched, one text line),
    upper-cased, letters only: they sit one per cell, so tesseract sometimes splits them with spaces,
    and the demo model draws nothing but letters."""
    grey = np.asarray(ImageOps.grayscale(Image.fromarray(_band(image).astype(np.uint8))), dtype=np.float64)
    if np.median(grey) < 128:  # light letters on a dark sign
        grey = 255 - grey
    lo, hi = np.percentile(grey, 1), np.percentile(grey, 99)
    grey = np.clip((grey - lo) / max(hi - lo, 1.0) * 255, 0, 255).astype(np.uint8)
    line = ImageOps.expand(Image.fromarray(grey), 24, fill=255)
    if shutil.which("tesseract") is None:
        raise RuntimeError("the OCR oracle needs tesseract: apt-get install tesseract-ocr")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "line.png"
        line.save(path)
        out = subprocess.run(["tesseract", str(path), "-", "--psm", "7"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    return re.sub(r"[^A-Z]", "", out.upper())


def nearest_colour(rgb: np.ndarray) -> str:
    return min(NAMES, key=lambda n: float(np.sum((np.asarray(COLOURS[n], dtype=np.float64) - rgb) ** 2)))


def read_colours(image: Image.Image) -> tuple[str, str]:
    """(sign colour, letter colour): the band's median colour, and the median of the letter row's
    pixels nearly as far from it as the furthest (the strokes' cores, not their blended edges)."""
    band = _band(image)
    bg = np.median(band.reshape(-1, 3), axis=0)
    text = (TEXT_ROW - BAND_ROWS[0]) * CELL
    row = band[text:text + CELL].reshape(-1, 3)
    dist = np.linalg.norm(row - bg, axis=1)
    ink = row[dist >= 0.8 * np.quantile(dist, 0.995)]
    return nearest_colour(bg), nearest_colour(np.median(ink, axis=0))


def letter_row_rank(image: Image.Image, sign: Sign, rivals: int = 20, seed: int = 0) -> int:
    """How many of `rivals` random words of the same length, rendered on the same sign, are closer
    (pixel MSE over the letter row) to `image` than the sign's own word: 0 means the letters drawn
    are nearer the asked-for word than any rival, a check of the glyphs below what OCR can read."""
    rng = random.Random(seed)
    top, bottom = TEXT_ROW * CELL, (TEXT_ROW + 1) * CELL

    def distance(word: str) -> float:
        ref = np.asarray(Sign(word, sign.bg, sign.fg).render(), dtype=np.float64)[top:bottom]
        return float(np.mean((np.asarray(image.convert("RGB"), dtype=np.float64)[top:bottom] - ref) ** 2))

    own = distance(sign.word)
    return sum(distance("".join(rng.choice(ALPHABET) for _ in sign.word)) < own for _ in range(rivals))


def char_accuracy(read: str, word: str) -> float:
    """1 - edit distance / word length, floored at 0."""
    prev = list(range(len(word) + 1))
    for i, a in enumerate(read, 1):
        cur = [i]
        for j, b in enumerate(word, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = cur
    return max(0.0, 1.0 - prev[-1] / len(word))


def score(images: list[Image.Image], signs: list[Sign]) -> dict[str, Any]:
    """The oracle's verdict on images of `signs` (each read once): exact words, characters and
    colours right, in percent, and what OCR read."""
    reads = [read_word(im) for im in images]
    colours = [read_colours(im) == (s.bg, s.fg) for im, s in zip(images, signs)]
    return {"exact_pct": 100 * float(np.mean([r == s.word for r, s in zip(reads, signs)])),
            "char_pct": 100 * float(np.mean([char_accuracy(r, s.word) for r, s in zip(reads, signs)])),
            "colours_pct": 100 * float(np.mean(colours)), "reads": reads}


def main(argv: list[str] | None = None) -> int:
    """`python -m glm_image_onnx.models.demo_scene IMAGE...`: what the oracle reads on each image."""
    import sys

    for path in (sys.argv[1:] if argv is None else argv):
        image = Image.open(path)
        bg, fg = read_colours(image)
        print(f"{path}: OCR reads {read_word(image)!r}; sign {bg}, letters {fg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
