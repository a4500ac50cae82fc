"""`glm-image-onnx info PACKAGE`: what a package holds, read from its manifest alone (no graph is
loaded): the target, each graph's size, dtype, sizes and export checks, the pipeline settings, and
where it came from. The reader of the manifest's record fields (manifest.py: "info")."""

from __future__ import annotations

from typing import Any

from glm_image_onnx.manifest import Graph, Manifest, to_json


def describe(manifest: Manifest, root: Any) -> str:
    """A few lines a person reads: the package, then one block per graph."""
    m = manifest
    total = sum(f.bytes for f in m.files.values())
    lines = [f"{root}: glm-image-onnx package, format {m.format_version}, target {m.target.name} {m.target.dtype}, "
             f"{len(m.graphs)} graphs, {total / 1e6:.1f} MB in {len(m.files)} files"]
    made = ", ".join(f"{k} {v}" for k, v in m.created_by.items())
    if m.source is not None:
        preset = f" (random preset {m.source.preset})" if m.source.preset else ""
        took = f" in {m.export_seconds:.1f} s" if m.export_seconds is not None else ""
        lines.append(f"  exported from {m.source.checkpoint}{preset}{took}"
                     + (f", opset {m.opset}" if m.opset else "") + (f"; {made}" if made else ""))
    if m.target.shape_buckets:
        lines.append("  static shapes, padded to buckets: "
                     + "; ".join(f"{k} {v[0]}..{v[-1]}" for k, v in m.target.shape_buckets.items()))
    if m.quantization is not None:
        q = m.quantization
        lines.append(f"  quantised: {q.get('recipe')} ({'passed' if q.get('passed') else 'not checked'} "
                     f"quality thresholds {q.get('thresholds', {})}); unchanged: {', '.join(q.get('unchanged', [])) or '-'}")
    p = m.pipeline
    g, d, s = p.grid, p.defaults, p.generation
    lines.append(f"  pipeline: {d.height}x{d.width}, {d.num_inference_steps} steps, guidance {d.guidance_scale}; "
                 f"token grid {g.factor} px, preview ~{g.preview_base}x{g.preview_base}, prior x{g.prior_upsample}; "
                 f"AR sampling {'on' if s.do_sample else 'off'} (temperature {s.temperature}, top_p {s.top_p}, "
                 f"top_k {s.top_k}); scheduler {p.scheduler.get('_class_name', '?')}")
    lines.append("  tokens: " + ", ".join(f"{k}={v}" for k, v in to_json(p.tokens).items()))
    lines.append("  tokenizer files: " + ", ".join(f"{k}={v}" for k, v in to_json(p.tokenizers).items())
                 + f"; VAE x{p.vae.scale_factor}, {p.vae.latent_channels} latent channels, tile {p.vae.sample_size} px")
    for name, graph in m.graphs.items():
        lines += _graph_lines(name, graph)
    return "\n".join(lines)


def _graph_lines(name: str, graph: Graph) -> list[str]:
    files = [graph.file, *graph.external_data]
    head = f"  {name}: {graph.dtype}, {graph.bytes / 1e6:.1f} MB ({', '.join(files)})"
    if graph.export_seconds is not None:
        head += f", exported in {graph.export_seconds:.1f} s"
    lines = [head]
    if graph.description:
        lines.append(f"    {graph.description}")
    lines.append("    config: " + ", ".join(f"{k}={v}" for k, v in to_json(graph.config).items()))
    if graph.verify:
        v = graph.verify
        lines.append(f"    verified against PyTorch on {v.get('cases', '?')} shapes: max rel error "
                     f"{v.get('max_rel', float('nan')):.2e}" if "max_rel" in v else f"    verify: {v}")
    if graph.ort_fusions:
        lines.append("    onnxruntime fusions: " + ", ".join(f"{k} x{n}" for k, n in graph.ort_fusions.items()))
    if graph.precision:
        pr = graph.precision
        lines.append(f"    precision: {pr.get('kept_fp32_nodes', '?')} nodes kept fp32"
                     + (f", falls back: {pr['falls_back']}" if pr.get("falls_back") else ""))
    if graph.quantization:
        lines.append("    quantisation: " + ", ".join(f"{k}={v}" for k, v in graph.quantization.items()))
    return lines
