"""The AR planner's prompt: `GlmImageProcessor.apply_chat_template(..., tokenize=True)` without transformers.

Steps, as transformers 5 does them for the pipeline's call:
1. render the chat template (jinja2 sandbox, trim_blocks + lstrip_blocks, add_generation_prompt
   False: the pipeline does not pass it and the processor's default is False);
2. append the grid layout (`GlmImageProcessor.prepare_inputs_layout`): `<sop>{th} {tw}<eop>` for the
   target, then `<sop>{ph} {pw}<eop>` for the preview in text-to-image only, then the bos token;
3. expand each `<|image|>` placeholder to h*w / merge_size**2 copies;
4. tokenize with the `tokenizers` library (no truncation, no padding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from glm_image_onnx.manifest import Grid, Layout, Tokens, token_string_defaults


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' AssistantTracker), rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str) -> jinja2.Template:
    # The environment transformers' `_compile_jinja_template` builds.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def token_content(value: Any) -> str | None:
    """A tokenizer config's token: a string, or an AddedToken record {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass(frozen=True)
class PromptInputs:
    """The AR planner's inputs for one prompt (what the processor's chat template gives)."""

    input_ids: np.ndarray  # int64 [1, S]
    attention_mask: np.ndarray  # int64 [1, S]
    image_grid_thw: np.ndarray  # int64 [G, 3]: i2i sources then target; t2i target then preview
    target_grid: tuple[int, int]
    preview_grid: tuple[int, int] | None  # t2i only
    max_new_tokens: int
    target_offset: int  # where the target grid starts among the generated tokens (t2i: after the preview)


class PromptBuilder:
    """Builds the AR prompt ids from the tokenizer files (a package's: manifest `Layout`)."""

    def __init__(self, tokenizer: Path, tokenizer_config: Path, chat_template: Path, processor_config: Path,
                 tokens: Tokens | None = None, grid: Grid = Grid()):
        """`tokens`: the manifest's special tokens; None takes them from the tokenizer config."""
        tok_cfg = json.loads(Path(tokenizer_config).read_text())
        processor_config = Path(processor_config)
        proc_cfg = json.loads(processor_config.read_text()) if processor_config.exists() else {}
        self.template = _compile(self._find_template(Path(chat_template), tok_cfg, proc_cfg))
        # Every special token the tokenizer knows by name is a template variable (`special_tokens_map`).
        self.special = {k: token_content(v) for k, v in tok_cfg.items()
                        if k.endswith("_token") and isinstance(token_content(v), str)}
        names = {k: getattr(tokens, k) if tokens is not None else self.special.get(k, default)
                 for k, default in token_string_defaults().items()}
        self.bos, self.image_token = names["bos_token"], names["image_token"]
        self.grid_bos, self.grid_eos = names["grid_bos_token"], names["grid_eos_token"]
        if self.bos is None:
            raise ValueError(f"{tokenizer_config} has no bos_token (the image-start token)")
        self.grid = grid
        self.merge_size = int(proc_cfg.get("image_processor", proc_cfg).get("merge_size", 2))
        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        # transformers' __call__ without padding/truncation switches both off whatever the json says
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @staticmethod
    def _find_template(path: Path, tok_cfg: dict, proc_cfg: dict) -> str:
        if path.exists():
            return path.read_text()
        legacy = path.with_suffix(".json")  # an older processor's chat_template.json
        if legacy.exists():
            return json.loads(legacy.read_text())["chat_template"]
        for cfg in (proc_cfg, tok_cfg):
            if isinstance(cfg.get("chat_template"), str):
                return cfg["chat_template"]
        raise ValueError(f"{path.parent}: no chat template ({path.name} or a `chat_template` config entry)")

    @classmethod
    def from_package(cls, root: Path | str, layout: Layout = Layout(), tokens: Tokens | None = None,
                     grid: Grid = Grid()) -> "PromptBuilder":
        """From a package or checkpoint folder whose files lie where `layout` says."""
        root = Path(root)
        return cls(root / layout.ar, root / layout.ar_config, root / layout.chat_template,
                   root / layout.image_processor, tokens, grid)

    def render(self, prompt: str, num_images: int = 0, height: int | None = None,
               width: int | None = None) -> str:
        """The chat-templated text (before the grid layout is appended)."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        # transformers passes the processor kwargs (target_h/target_w) to the template too
        extra = {k: v for k, v in (("target_h", height), ("target_w", width)) if v is not None}
        return self.template.render(messages=[{"role": "user", "content": content}], tools=None,
                                    documents=None, add_generation_prompt=False, **{**self.special, **extra})

    def build(self, prompt: str, height: int, width: int,
              source_grids: list[tuple[int, int]] | None = None) -> PromptInputs:
        """The AR inputs for one prompt.

        `source_grids`: each source image's (grid_h, grid_w) in patches, from `images.ImageProcessor`;
        none/empty means text-to-image. Returns input_ids int64 [1, S], attention_mask int64 [1, S],
        image_grid_thw int64 [G, 3] (i2i: sources then target; t2i: target then preview),
        target_grid (th, tw), preview_grid (ph, pw) or None, max_new_tokens, and target_offset: where
        the target grid starts among the generated tokens (t2i generates the preview first).
        """
        grids = [tuple(map(int, g)) for g in (source_grids or [])]
        text_to_image = not grids
        if min(height, width) < self.grid.factor:
            raise ValueError(f"height and width must be at least {self.grid.factor} (got {height}x{width})")
        th, tw, ph, pw = self.grid.target_shape(height, width)
        text = self.render(prompt, len(grids), height, width)
        if text.count(self.image_token) != len(grids):
            raise ValueError(f"the prompt has {text.count(self.image_token) - len(grids)} extra "
                             f"{self.image_token} placeholders for {len(grids)} images")
        text += f"{self.grid_bos}{th} {tw}{self.grid_eos}"
        if text_to_image:
            text += f"{self.grid_bos}{ph} {pw}{self.grid_eos}"
        text += self.bos
        # Replace the placeholders in order, each by h*w/merge^2 copies (`replace_image_token`).
        parts = text.split(self.image_token)
        text = parts[0] + "".join(self.image_token * (h * w // self.merge_size ** 2) + rest
                                  for (h, w), rest in zip(grids, parts[1:]))
        # transformers skips special tokens only when the text starts with bos; here the
        # post-processor adds none anyway, but keep the same switch.
        ids = self.tokenizer.encode(text, add_special_tokens=not text.startswith(self.bos)).ids
        thw = [[1, h, w] for h, w in grids] + [[1, th, tw]] + ([[1, ph, pw]] if text_to_image else [])
        target_tokens = th * tw
        return PromptInputs(input_ids=np.asarray([ids], dtype=np.int64),
                            attention_mask=np.ones((1, len(ids)), dtype=np.int64),
                            image_grid_thw=np.asarray(thw, dtype=np.int64), target_grid=(th, tw),
                            preview_grid=(ph, pw) if text_to_image else None,
                            max_new_tokens=target_tokens + (ph * pw if text_to_image else 0) + 1,
                            target_offset=ph * pw if text_to_image else 0)

    def prompt_error(self, prompt: str) -> str | None:
        """Why a user's prompt cannot be built, or None: the image placeholder is reserved for
        source images (the processor would take it for one)."""
        if self.image_token in prompt:
            return f"prompt: {self.image_token!r} is reserved for source images; leave it out of the text"
        return None
