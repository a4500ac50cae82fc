"""The package manifest (`manifest.json`): the one contract between the exporter and the quantiser,
which write it, and the runtime, the server and the quantiser, which read it.

The schema is the dataclasses below. `Manifest.from_dict` reads a whole manifest into them and
names the field of any error (`pipeline.grid.factor: expected an integer, got a string "x"`); `to_dict` is
its inverse, and `write` checks what it writes by reading it back. Every key the exporter writes is
a field here, and the comment beside each says who reads it; "info" is `glm-image-onnx info`, which
shows a package's record to a person (sizes, checks, provenance). A key outside the schema is an
error when strict (the exporter's own test), ignored otherwise (a newer writer's addition).

The facts the runtime must not assume live in `Pipeline`: the token grid (`Grid`: the pixel factor,
the preview size, the prior upsampling), the special tokens (`Tokens`) and where the tokenizer
files are (`Layout`). The defaults below are the published GLM-Image's and the paths the exporter
copies the checkpoint's files to.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from glm_image_onnx.atomic import write_text

FORMAT = "glm-image-onnx-package"
# 2: the AR planner's cache is a fixed-capacity buffer updated in place (seqlens_k and
# total_sequence_length replace attention_mask); a version 1 package needs re-exporting.
# 3: the package records its build target (`target`: provider and dtype) and the AR planner's cache
# contract (`kv_cache`: dtype, layout, capacity rule); a version 2 package reads as cpu / fp32.
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
# The AR planner's cache capacity: one slot per prompt token and per generated token (the only rule
# the runtime implements; a package that asks for another one is refused).
KV_CAPACITY_RULE = "prompt_tokens + new_tokens"
# Static-shapes packages (targets.Target.static_shapes): the smallest of the capacity buckets
# (manifest target.shape_buckets.capacity) that holds the padded prompt and prompt + new tokens.
KV_CAPACITY_BUCKETED = "capacity bucket >= max(prompt bucket, prompt_tokens + new_tokens)"
KV_LAYOUT = "[batch, num_kv_heads, capacity, head_dim]"
POSITION_IDS_LAYOUT = "[3, batch, seq] = (temporal, height, width)"


class ManifestError(ValueError):
    """A manifest that does not follow the schema; the message starts with the field's path."""


# ------------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class Grid:
    """The AR planner's token grids (transformers' `GlmImageProcessor._get_target_shape`)."""

    factor: int = 32  # pixels per target token side; image sides are multiples of it (runtime, server, quantize)
    preview_base: int = 16  # text-to-image previews hold about preview_base^2 tokens (runtime.prompt)
    prior_upsample: int = 2  # each target token covers prior_upsample^2 DiT prior tokens (runtime.images)

    def target_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(token_h, token_w, preview_h, preview_w) for an image size, as the processor computes them."""
        token_h, token_w = height // self.factor, width // self.factor
        ratio = token_h / token_w
        return (token_h, token_w, int(math.sqrt(ratio) * self.preview_base),
                int(math.sqrt(1 / ratio) * self.preview_base))

    def floor(self, pixels: int) -> int:
        """`pixels` down to the grid (the pipeline's default size from a source image)."""
        return pixels // self.factor * self.factor

    def side_error(self, name: str, value: int) -> str | None:
        """Why `value` cannot be the image side `name`, or None."""
        if value < self.factor or value % self.factor:
            return f"{name} must be a positive multiple of {self.factor}, got {value}"
        return None


@dataclass(frozen=True)
class Tokens:
    """The AR vocabulary's special tokens."""

    image_start_token_id: int  # runtime.mrope (where a source image's tokens begin)
    image_end_token_id: int  # runtime.mrope
    image_token_id: int  # runtime.pipeline (the placeholders a source image's codebook ids replace)
    pad_token_id: int | None  # info
    codebook_size: int  # runtime.sampling (the image tokens the sampler may draw)
    vision_vocab_size: int  # checked against the AR planner's config (one vocabulary)
    image_token: str = "<|image|>"  # runtime.prompt (the placeholder in the chat template)
    grid_bos_token: str = "<sop>"  # runtime.prompt (the grid layout's brackets)
    grid_eos_token: str = "<eop>"  # runtime.prompt
    bos_token: str | None = None  # runtime.prompt (the image-start token that ends the prompt)


def token_string_defaults() -> dict[str, str | None]:
    """`Tokens`' special-token strings (named as in the tokenizer config) and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(Tokens) if f.name.endswith("_token")}


@dataclass(frozen=True)
class Generation:
    """The AR planner's sampling settings: the package's defaults (the checkpoint's
    generation_config.json: runtime.pipeline), and what runtime.sampling draws tokens with."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


@dataclass(frozen=True)
class Vae:
    scale_factor: int  # runtime.pipeline (latent size), server (limits)
    latent_channels: int  # runtime.pipeline, quantize.quality
    latents_mean: list[float]  # runtime.pipeline (de-normalising before the VAE decoder)
    latents_std: list[float]  # runtime.pipeline
    sample_size: int = 1024  # runtime.pipeline (diffusers' VAE tile)


@dataclass(frozen=True)
class Defaults:
    """What a call without these settings gets: runtime.pipeline, server.glm_image_request."""

    guidance_scale: float = 1.5
    num_inference_steps: int = 50
    height: int = 1024
    width: int = 1024


@dataclass(frozen=True)
class Layout:
    """Where the non-graph files are, relative to the package root (the manifest key `tokenizers`)."""

    ar: str = "processor/tokenizer.json"  # runtime.prompt
    ar_config: str = "processor/tokenizer_config.json"  # runtime.prompt
    chat_template: str = "processor/chat_template.jinja"  # runtime.prompt
    image_processor: str = "processor/processor_config.json"  # runtime.images, runtime.prompt (merge size)
    glyph: str = "tokenizer"  # runtime.glyphs (ByT5's folder)


@dataclass(frozen=True)
class Pipeline:
    tokens: Tokens
    vae: Vae
    scheduler: dict[str, Any]  # diffusers' scheduler config: runtime.scheduler.FlowMatchSchedule.from_config
    grid: Grid = Grid()
    generation: Generation = Generation()
    defaults: Defaults = Defaults()
    tokenizers: Layout = Layout()

    def image_size(self, height: int | None, width: int | None,
                   source: tuple[int, int] | None = None) -> tuple[int, int]:
        """The size a call makes (diffusers' rule): what it asks for, else the first source image's
        (height, width) floored to the grid, else the package default (runtime, server)."""
        def default(value: int | None, fallback: int) -> int:
            return fallback if value is None else value

        if source is not None:
            return default(height, self.grid.floor(source[0])), default(width, self.grid.floor(source[1]))
        return default(height, self.defaults.height), default(width, self.defaults.width)


# -------------------------------------------------------------------------------------- graphs
@dataclass(frozen=True)
class KvCache:
    """The AR planner's cache contract: runtime.ar allocates by it and refuses what it cannot run."""

    dtype: str
    layout: str = KV_LAYOUT
    capacity: str = KV_CAPACITY_RULE
    update: str = ""  # info (how present.* is bound to past_key_values.*)


@dataclass(frozen=True)
class ArPlannerConfig:
    num_layers: int  # runtime.ar, quantize (the cache's names)
    num_kv_heads: int  # runtime.ar
    head_dim: int  # runtime.ar
    vision_vocab_size: int  # runtime.ar (the logits' width)
    kv_cache: KvCache = KvCache("float32")  # runtime.ar (format 2 had none: a float32 cache)
    past_key_template: str = "past_key_values.%d.key"  # runtime.ar, quantize
    past_value_template: str = "past_key_values.%d.value"
    present_key_template: str = "present.%d.key"
    present_value_template: str = "present.%d.value"
    position_ids_layout: str = POSITION_IDS_LAYOUT  # runtime.ar (refuses another one)
    # the language model's sizes: info
    num_heads: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    mrope_section: list[int] | None = None
    partial_rotary_factor: float | None = None
    rope_theta: float | None = None

    def cache_names(self) -> list[str]:
        """Every cache input and output, in graph order per layer (quantize keeps them in the package dtype)."""
        return [t % i for i in range(self.num_layers) for t in (
            self.past_key_template, self.past_value_template, self.present_key_template, self.present_value_template)]


@dataclass(frozen=True)
class VisionTokenizerConfig:
    """info: the vision encoder's sizes (the runtime's preprocessing reads `Layout.image_processor`)."""

    patch_size: int
    in_channels: int
    patch_dim: int
    spatial_merge_size: int
    vision_hidden_size: int
    codebook_size: int


@dataclass(frozen=True)
class GlyphEncoderConfig:
    """info: ByT5's sizes (runtime.glyphs reads the tokenizer's own files)."""

    d_model: int
    num_layers: int
    vocab_size: int
    pad_token_id: int | None = None
    eos_token_id: int | None = None


@dataclass(frozen=True)
class DitConfig:
    """The DiT decoder's and its condition write's sizes."""

    num_layers: int  # runtime.pipeline (the empty condition K/V)
    num_heads: int  # runtime.pipeline
    head_dim: int  # runtime.pipeline
    patch_size: int  # runtime.pipeline (latent tokens)
    in_channels: int  # checked against pipeline.vae.latent_channels
    out_channels: int  # info
    text_embed_dim: int  # info
    prior_codebook_size: int  # info
    kv_layout: str  # info (the condition K/V's layout; the runtime builds it)
    has_encoder_attention_mask: bool | None = None  # info (the decoder masks padded glyph tokens)
    concat_axis: int | None = None  # info (condition write: several images' K/V concatenate here)


@dataclass(frozen=True)
class VaeConfig:
    """info: the VAE graph's sizes (the runtime reads `pipeline.vae`)."""

    scale_factor: int
    latent_channels: int
    in_channels: int
    out_channels: int
    latents_mean: list[float]
    latents_std: list[float]


# The config class of each graph: also the graph names the package may hold.
GRAPH_CONFIGS: dict[str, type] = {
    "ar_planner": ArPlannerConfig, "vision_tokenizer": VisionTokenizerConfig, "glyph_encoder": GlyphEncoderConfig,
    "dit_decoder": DitConfig, "dit_condition_write": DitConfig, "vae_decoder": VaeConfig, "vae_encoder": VaeConfig,
}
# What text-to-image needs, and what image-to-image adds.
T2I_GRAPHS = ("ar_planner", "glyph_encoder", "dit_decoder", "vae_decoder")
I2I_GRAPHS = ("vision_tokenizer", "vae_encoder", "dit_condition_write")


@dataclass(frozen=True)
class Tensor:
    name: str  # quantize (signature checks), server (component model metadata and Triton configs)
    dtype: str
    shape: list[int | str]  # symbolic dims by name


@dataclass(frozen=True)
class Graph:
    file: str  # runtime (the session's model), server.triton_repo, quantize
    external_data: list[str]  # server.triton_repo, quantize (files that travel with the graph)
    dtype: str  # quantize (which recipes apply), info
    inputs: list[Tensor]
    outputs: list[Tensor]
    config: Any  # GRAPH_CONFIGS[name]
    bytes: int  # quantize (sizes before / after), info
    description: str = ""  # server (model metadata), info
    opset: int | None = None  # info
    export_seconds: float | None = None  # info
    ort_fusions: dict[str, int] | None = None  # info (onnxruntime fusions the export applied)
    precision: dict[str, Any] | None = None  # info (what a half-precision conversion kept in fp32)
    verify: dict[str, Any] | None = None  # info, quantize (checked against PyTorch at export)
    quantization: dict[str, Any] | None = None  # info (this graph's quantisation settings)


@dataclass(frozen=True)
class Target:
    """The build target (glm_image_onnx.targets): runtime.providers (mismatch line), quantize (recipes)."""

    name: str = "cpu"
    dtype: str = "fp32"
    shape_buckets: dict[str, list[int]] | None = None  # runtime.shapes (static-shapes targets pad to these)


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # runtime.package (verification)
    bytes: int  # runtime.package (a free size check first)


@dataclass(frozen=True)
class Source:
    checkpoint: str  # info
    preset: str | None = None  # info (the random preset a test checkpoint was built from)


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    graphs: dict[str, Graph]
    pipeline: Pipeline
    files: dict[str, FileEntry]
    target: Target = Target()  # a version 2 package is cpu / fp32
    created_by: dict[str, str] = field(default_factory=dict)  # info (package versions that wrote it)
    source: Source | None = None
    opset: int | None = None  # info
    export_seconds: float | None = None  # info
    quantization: dict[str, Any] | None = None  # quantize (refuses to quantise twice), server (recipe), info

    @classmethod
    def from_dict(cls, data: Any, strict: bool = False) -> "Manifest":
        """The schema's reading of a parsed manifest.json; ManifestError naming the first bad field."""
        if not isinstance(data, dict):
            raise ManifestError(f"the manifest is {_kind(data)}, not a JSON object")
        if data.get("format") != FORMAT:
            raise ManifestError(f"not a glm-image-onnx manifest (format {data.get('format')!r})")
        version = data.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            older = isinstance(version, int) and version < min(SUPPORTED_VERSIONS)
            raise ManifestError(f"format_version {version!r} is not supported by this runtime "
                                f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
                                + ("; re-export the checkpoint with this version" if older else ""))
        manifest = _Reader(strict).dataclass(cls, data, "")
        manifest._check()
        return manifest

    @classmethod
    def read(cls, folder: Path, strict: bool = False) -> "Manifest":
        return cls.from_dict(json.loads((Path(folder) / MANIFEST).read_text()), strict)

    def to_dict(self) -> dict[str, Any]:
        return to_json(self)

    def write(self, folder: Path) -> None:
        """Atomically, after reading it back strictly: the writers cannot write what no reader takes."""
        data = self.to_dict()
        Manifest.from_dict(json.loads(json.dumps(data)), strict=True)
        write_text(Path(folder) / MANIFEST, json.dumps(data, indent=2) + "\n")

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def _check(self) -> None:
        """What the field types cannot say: facts the manifest states twice must agree."""
        for name, graph in self.graphs.items():
            for rel in (graph.file, *graph.external_data):
                if rel not in self.files:
                    raise ManifestError(f"graphs.{name}.file: {rel!r} is not listed in files")
        ar = self.graphs.get("ar_planner")
        if ar is not None and ar.config.vision_vocab_size != self.pipeline.tokens.vision_vocab_size:
            raise ManifestError(f"graphs.ar_planner.config.vision_vocab_size: {ar.config.vision_vocab_size} differs "
                                f"from pipeline.tokens.vision_vocab_size ({self.pipeline.tokens.vision_vocab_size})")
        dit = self.graphs.get("dit_decoder")
        if dit is not None and dit.config.in_channels != self.pipeline.vae.latent_channels:
            raise ManifestError(f"graphs.dit_decoder.config.in_channels: {dit.config.in_channels} differs from "
                                f"pipeline.vae.latent_channels ({self.pipeline.vae.latent_channels})")
        for name, value in (("factor", self.pipeline.grid.factor), ("preview_base", self.pipeline.grid.preview_base),
                            ("prior_upsample", self.pipeline.grid.prior_upsample)):
            if value < 1:
                raise ManifestError(f"pipeline.grid.{name}: must be >= 1, got {value}")


def read_graphs(records: dict[str, Any], strict: bool = False) -> dict[str, Graph]:
    """The `graphs` section alone (the exporter and the quantiser build it as JSON records)."""
    return _Reader(strict).value(dict[str, Graph], records, "graphs")


# ----------------------------------------------------------------------------- reading, writing
def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _Reader:
    def __init__(self, strict: bool):
        self.strict = strict

    def dataclass(self, cls: type, data: Any, path: str) -> Any:
        if not isinstance(data, dict):
            raise ManifestError(f"{path or 'the manifest'}: expected an object, got {_kind(data)}")
        hints = _hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        if self.strict:
            for key in data:
                if key not in known:
                    raise ManifestError(f"{_join(path, key)}: not in the manifest schema ({cls.__name__})")
        values = {}
        for name, f in known.items():
            where = _join(path, name)
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ManifestError(f"{where}: missing")
                continue
            if cls is Graph and name == "config":
                graph = path.rsplit(".", 1)[-1]
                values[name] = self.dataclass(GRAPH_CONFIGS[graph], data[name], where)
            else:
                values[name] = self.value(hints[name], data[name], where)
        try:
            return cls(**values)
        except ValueError as e:  # a dataclass's own check (Generation's ranges)
            raise ManifestError(f"{path}: {e}") from None

    def value(self, tp: Any, value: Any, path: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return value
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            for option in options[:-1]:  # int | str: the first that fits
                try:
                    return self.value(option, value, path)
                except ManifestError:
                    pass
            return self.value(options[-1], value, path)
        if dataclasses.is_dataclass(tp):
            return self.dataclass(tp, value, path)
        if origin is list:
            if not isinstance(value, list):
                raise ManifestError(f"{path}: expected a list, got {_kind(value)}")
            return [self.value(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                raise ManifestError(f"{path}: expected an object, got {_kind(value)}")
            if path == "graphs":
                unknown = [k for k in value if k not in GRAPH_CONFIGS]
                if unknown:
                    raise ManifestError(f"graphs.{unknown[0]}: not a graph this runtime knows "
                                        f"({', '.join(GRAPH_CONFIGS)})")
            return {k: self.value(args[1], v, _join(path, k)) for k, v in value.items()}
        if tp is bool:
            ok = isinstance(value, bool)
        elif tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif tp is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif tp is str:
            ok = isinstance(value, str)
        else:
            raise TypeError(f"{path}: the schema has no reader for {tp!r}")
        if not ok:
            raise ManifestError(f"{path}: expected {_kind(tp())}, got {_kind(value)} {json.dumps(value)[:60]}")
        return value


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_json(value: Any) -> Any:
    """Schema dataclasses (and what holds them) as JSON values; an optional field left at None is left out."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is None and f.default is None:
                continue
            out[f.name] = to_json(v)
        return out
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------------- checksums
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    # 4 MiB chunks: hashlib drops the GIL for each one, so threads can hash files side by side
    # (runtime.package); 1-16 MiB measured the same (~1.75 GB/s a core, SHA-NI), 16 MiB a bit slower.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under `root` except the manifest itself."""
    table = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            table[p.relative_to(root).as_posix()] = FileEntry(sha256_file(p), p.stat().st_size)
    return table
