"""Configs -> manifest: the typed records (glm_image_onnx.manifest) an export writes.

A graph's entry is a `manifest.Graph` from the moment its file is written (`graph_entry`), read
through the schema there and then, so that a graph the runtime would not take fails the export as
it is made, naming the graph, not after every other graph has been exported. The pipeline settings
come from the checkpoint's source configs (`pipeline_config`); `build_manifest` puts it all
together once the package's files are in place.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from glm_image_onnx.export.options import ExportOptions
from glm_image_onnx.manifest import (FORMAT, FORMAT_VERSION, Defaults, Generation, Graph, Grid, Layout, Manifest,
                                     Pipeline, Source, Target, Tensor, Tokens, Vae, file_table, read_graphs,
                                     to_json, token_string_defaults)
from glm_image_onnx.models.inspect import CheckpointInfo
from glm_image_onnx.runtime.prompt import token_content
from glm_image_onnx.targets import SHAPE_BUCKETS, get_target


def graph_entry(name: str, path: Path, *, description: str, dtype: str, config: dict[str, Any],
                export_seconds: float, ort_fusions: dict[str, int] | None = None,
                precision: dict[str, Any] | None = None, verify: dict[str, Any] | None = None) -> Graph:
    """The manifest entry of the graph just written at `path` (its files, signature and sizes)."""
    from glm_image_onnx.export.onnx_info import onnx_files, signature  # onnx: not for export.package's importers

    files = onnx_files(path)
    sig = signature(path)
    entry = Graph(file=path.name, external_data=[f.name for f in files[1:]], dtype=dtype,
                  inputs=[Tensor(**t) for t in sig["inputs"]], outputs=[Tensor(**t) for t in sig["outputs"]],
                  config=config, bytes=sum(f.stat().st_size for f in files), description=description,
                  opset=sig["opset"], export_seconds=export_seconds, ort_fusions=ort_fusions or None,
                  precision=precision or None, verify=verify or None)
    # The export modules state a graph's config as a plain dict: the schema's reader makes it that
    # graph's config class (numbers as its fields type them: what Manifest.write writes), strictly.
    return read_graphs({name: to_json(entry)}, strict=True)[name]


def refreshed_files(entry: Graph, path: Path) -> Graph:
    """`entry` after its graph's files changed on disk (weights moved to a shared data file)."""
    from glm_image_onnx.export.onnx_info import onnx_files

    files = onnx_files(path)
    return dataclasses.replace(entry, external_data=[f.name for f in files[1:]],
                               bytes=sum(f.stat().st_size for f in files))


def _first(size: int | list[int]) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def pipeline_config(info: CheckpointInfo) -> Pipeline:
    """What the runtime needs from the source configs besides the graphs."""
    c = info.configs
    ar, vae = c["vision_language_encoder"], c["vae"]
    text = ar["text_config"]
    root = info.root
    layout = Layout()
    tok_cfg = json.loads((root / layout.ar_config).read_text()) if (root / layout.ar_config).exists() else {}
    gen_path = root / "vision_language_encoder" / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    latent_channels = vae["latent_channels"]
    return Pipeline(
        tokens=Tokens(
            image_start_token_id=ar["image_start_token_id"],
            image_end_token_id=ar["image_end_token_id"],
            image_token_id=ar["image_token_id"],
            pad_token_id=text.get("pad_token_id"),
            codebook_size=ar["vq_config"]["num_embeddings"],
            vision_vocab_size=text["vision_vocab_size"],
            **{k: token_content(tok_cfg.get(k, default)) for k, default in token_string_defaults().items()},
        ),
        generation=Generation(**{k: gen[k] for k in ("do_sample", "temperature", "top_p", "top_k") if k in gen}),
        scheduler=c["scheduler"],
        vae=Vae(
            scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            latent_channels=latent_channels,
            latents_mean=vae.get("latents_mean") or [0.0] * latent_channels,
            latents_std=vae.get("latents_std") or [1.0] * latent_channels,
            # the runtime's VAE tile size (diffusers: tile_sample_min_size = sample_size, or its first entry)
            sample_size=_first(vae.get("sample_size", 1024)),
        ),
        # GLM-Image's grid and the copied files' places: the schema's defaults
        grid=Grid(), defaults=Defaults(), tokenizers=layout,
    )


def target_record(options: ExportOptions) -> Target:
    """The manifest's `target`: name and dtype, and for static-shapes targets the length buckets the
    runtime pads to (runtime.shapes)."""
    static = get_target(options.target).static_shapes
    return Target(options.target, options.dtype, SHAPE_BUCKETS if static else None)


def created_by() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("glm-image-onnx", "torch", "transformers", "diffusers", "onnx", "onnxruntime"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def build_manifest(info: CheckpointInfo, options: ExportOptions, graphs: dict[str, Graph], tmp: Path,
                   t_start: float) -> Manifest:
    """The package's manifest, once every file of it is in `tmp` (the file table hashes them)."""
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, created_by=created_by(),
        source=Source(str(info.root.resolve()), info.preset), target=target_record(options),
        opset=options.opset, graphs=graphs, pipeline=pipeline_config(info), files=file_table(tmp),
        export_seconds=round(time.perf_counter() - t_start, 3))
