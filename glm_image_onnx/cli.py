"""`glm-image-onnx` command line: one subcommand per stage, imported only when used.

A serving host has no torch: the export-side subcommands import it lazily and say which extra
to install when it is missing. User errors end with one readable line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from glm_image_onnx.export.placement import PROVIDERS as CHECKED_PROVIDERS
from glm_image_onnx.manifest import GRAPH_CONFIGS
from glm_image_onnx.models.presets import PRESETS
from glm_image_onnx.provider_args import add_provider_arguments, provider_settings
from glm_image_onnx.targets import TARGETS

from glm_image_onnx.errors import EXIT_FAILED, EXIT_USAGE, exit_code


class CliError(Exception):
    """A user-facing failure: printed as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def need_extra(extra: str, *modules: str) -> None:
    """Fail with the pip command when an optional extra's modules are missing (imports are lazy).

    Only looks the modules up: importing torch, transformers and diffusers here would cost
    `export` seconds in a process that hands all the work to spawned workers."""
    import importlib.util

    for module in modules:
        try:
            missing = module if importlib.util.find_spec(module) is None else None
        except ImportError as e:  # a parent package of a dotted name is missing
            missing = e.name or module
        if missing:
            raise CliError(f"this command needs the {extra} extra ({missing} is missing): "
                           f"pip install 'glm-image-onnx[{extra}]'")


def _need_export_extra() -> None:
    need_extra("export", "torch", "transformers", "diffusers")


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    _need_export_extra()
    from glm_image_onnx.models.checkpoint import write_checkpoint
    from glm_image_onnx.models.presets import get_preset

    try:
        preset = get_preset(args.preset)
        if args.layers is not None:
            preset = preset.with_layers(args.layers)
        elif preset.name == "full":
            raise ValueError("preset 'full' has the published 40/30 layers (16B parameters); add "
                             "--layers N for every published width with N layers per stack")
        out = write_checkpoint(preset, Path(args.out), seed=args.seed, dtype=args.dtype)
    except (ValueError, FileExistsError) as e:
        raise CliError(str(e)) from None
    print(f"wrote {preset.name} checkpoint (seed {args.seed}) to {out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _need_export_extra()
    from glm_image_onnx.export.package import ExportError, ExportOptions, GRAPHS, export_package
    from glm_image_onnx.models.inspect import CheckpointError

    graphs = tuple(args.components) if args.components else tuple(GRAPHS)
    if args.jobs is not None and args.jobs < 1:
        raise CliError(f"--jobs must be >= 1, got {args.jobs}")
    try:
        options = ExportOptions(graphs=graphs, verify=args.verify, opset=args.opset, overwrite=args.overwrite,
                                seed=args.seed, jobs=args.jobs, target=args.target, dtype=args.dtype,
                                low_memory=args.low_memory)
    except ExportError as e:
        raise CliError(str(e)) from None
    try:
        export_package(args.checkpoint, args.out, options)
    except (CheckpointError, ExportError) as e:
        raise CliError(str(e), exit_code(e)) from None
    return 0


class _ProgressBar:
    """One line per stage on stderr, redrawn in place: AR tokens, then denoising steps."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.stage, self.width, self.drawn = stream, None, width, -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            if self.stage is not None:
                self.stream.write("\n")
            self.stage, self.drawn = stage, -1
        fill = self.width * done // max(total, 1)
        if fill == self.drawn and done != total:
            return  # redraw only when the bar moves
        self.drawn = fill
        width = self.width
        label = {"ar": "AR tokens", "denoise": "denoising"}.get(stage, stage)
        self.stream.write(f"\r{label:>10} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
        if done == total:
            self.stream.write("\n")
            self.stage = None
        self.stream.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from glm_image_onnx.runtime import GlmImageOnnxPipeline, PackageError, ProviderError

    sources = []
    for path in args.image or []:
        try:
            sources.append(Image.open(path).convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise CliError(f"--image {path}: cannot read the image ({e})") from None
    try:
        pipe = GlmImageOnnxPipeline.from_package(args.package, **provider_settings(args))
        out = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, seed=args.seed, image=sources or None,
                   do_sample=False if args.greedy else None, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, progress=None if args.quiet else _ProgressBar())
    except (PackageError, ProviderError, ValueError) as e:
        raise CliError(str(e)) from None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.images[0].save(args.out)
    t = out.timings
    print(f"wrote {args.out} (seed {out.seed}) in {t.total_s:.2f}s: AR {t.ar_prefill_s + t.ar_decode_s:.2f}s "
          f"({t.ar_tokens} tokens), DiT {t.dit_s:.2f}s, VAE {t.vae_s:.2f}s on "
          f"{', '.join(pipe.providers)}", file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    need_extra("quantize", "onnx", "onnxruntime.quantization")
    from glm_image_onnx.quantize import QuantizeError, QuantizeOptions, Thresholds, quantize_package

    if args.calibration_prompts and not Path(args.calibration_prompts).is_file():
        raise CliError(f"--calibration-prompts {args.calibration_prompts}: no such file")
    thresholds = Thresholds(min_psnr=args.min_psnr, min_ssim=args.min_ssim, min_free_psnr=args.min_free_psnr,
                            min_top1=args.min_top1, max_rel_error=args.max_rel_error)
    options = QuantizeOptions(
        recipe=args.recipe, graphs=tuple(args.components) if args.components else None,
        overwrite=args.overwrite, per_channel=args.per_channel, calibration_prompts=args.calibration_prompts,
        calibration_limit=args.calibration_limit, calibrate_method=args.calibrate_method,
        block_size=args.block_size, accuracy_level=args.accuracy_level, height=args.height, width=args.width,
        steps=args.steps, eval_prompts=args.eval_prompts, seed=args.seed, threads=args.threads,
        thresholds=thresholds)
    try:
        quantize_package(args.package, args.out, options)
    except QuantizeError as e:
        raise CliError(str(e), exit_code(e)) from None
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    need_extra("quantize", "onnx")
    import onnxruntime

    from glm_image_onnx.export.placement import SESSION_PROVIDERS, PlacementError, check_package, observe
    from glm_image_onnx.runtime.package import Package, PackageError

    try:
        reports = check_package(args.package, args.provider)
        package = Package.open(args.package, verify_files=False)
    except (PackageError, PlacementError) as e:
        raise CliError(str(e)) from None
    if args.observed:
        wanted = SESSION_PROVIDERS[args.provider][0]
        if wanted not in onnxruntime.get_available_providers():
            raise CliError(f"--observed: {wanted} is not in this onnxruntime build ({onnxruntime.__version__}: "
                           f"{', '.join(onnxruntime.get_available_providers())}); install the provider's build")
    for report in reports:
        print(report.summary())
        if args.verbose:
            for v in report.problems:
                print(f"  {v.node} {v.domain}.{v.op} opset {v.opset} {'/'.join(v.dtypes) or '?'}: "
                      f"{v.reason} -> {v.runs_on}")
        if args.observed:  # onnxruntime's own placement here, after its optimisations (fused nodes)
            seen = observe(package.graph_path(report.graph), args.provider)
            cpu_ops = sorted(set(seen.pop("CPUExecutionProvider ops", [])))
            print(f"  observed by onnxruntime {onnxruntime.__version__}: "
                  + ", ".join(f"{k}: {v}" for k, v in seen.items())
                  + (f" (on CPU: {', '.join(cpu_ops)})" if cpu_ops and args.provider != "cpu" else ""))
    falling = sum(len(r.problems) for r in reports)
    print(f"{args.package}: {falling} node{'s' if falling != 1 else ''} fall back from {args.provider} "
          f"in {sum(1 for r in reports if r.problems)} of {len(reports)} graphs", file=sys.stderr)
    return EXIT_FAILED if falling else 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from glm_image_onnx.info import describe
    from glm_image_onnx.manifest import to_json
    from glm_image_onnx.runtime.package import Package, PackageError

    try:
        package = Package.open(args.package, verify_files="full" if args.verify else "off")
    except PackageError as e:
        raise CliError(str(e)) from None
    print(json.dumps(to_json(package.manifest), indent=2) if args.json else describe(package.manifest, package.root))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-image-onnx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    _add_init_checkpoint(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_quantize(sub)
    _add_check(sub)
    _add_info(sub)
    # serve, client, triton-repo (argparse only)
    from glm_image_onnx.server.cli import add_commands as add_server_commands

    add_server_commands(sub)
    return parser


def _add_init_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init-checkpoint", help="write a random GLM-Image checkpoint (diffusers layout)")
    p.add_argument("--preset", default="tiny",
                   help=f"{' | '.join(PRESETS)} (default: tiny; demo: the demo model's untrained start)")
    p.add_argument("--layers", type=int, metavar="N",
                   help="N layers in each stack (AR planner, vision encoder, glyph encoder, DiT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the saved weights (the published checkpoint is bf16; default fp32)")
    p.add_argument("out", help="output folder (must not exist or be empty)")
    p.set_defaults(func=cmd_init_checkpoint)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint folder to an ONNX package")
    p.add_argument("checkpoint", help="GLM-Image checkpoint folder (diffusers layout)")
    p.add_argument("out", help="package folder to write")
    p.add_argument("--verify", action="store_true",
                   help="compare every graph with PyTorch at several shapes; fail above 1e-4 relative")
    p.add_argument("--components", nargs="+", metavar="GRAPH",
                   help=f"graphs to export (default: all): {' '.join(GRAPH_CONFIGS)}")
    p.add_argument("--target", default="cpu", choices=list(TARGETS),
                   help="execution provider the package is built for (default cpu)")
    p.add_argument("--dtype", choices=sorted({d for t in TARGETS.values() for d in t.dtypes}),
                   help="graph dtype: " + "; ".join(f"{t.name}: {' | '.join(t.dtypes)} (default {t.default_dtype})"
                                                   for t in TARGETS.values()))
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.add_argument("--jobs", type=int, help="parallel export processes, one graph per task (default: 2 for "
                                             "checkpoints under 2 GB on a multi-core machine, else 1)")
    p.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="trace without weights and stream each one from the checkpoint's safetensors "
                        "into the graph: the same graphs within 1.25x the largest component + 2 GB, one "
                        "component at a time; --verify loads the PyTorch model after the export "
                        "(default: on for checkpoints of 2 GB or more)")
    p.set_defaults(func=cmd_export)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate an image from an ONNX package (no torch needed)")
    p.add_argument("package", help="exported ONNX package folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--height", type=int, help="pixels, a multiple of the package's token grid, 32 for GLM-Image "
                                              "(default: the package's, or the source image's)")
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 1.5)")
    p.add_argument("--seed", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--greedy", action="store_true", help="greedy AR decoding instead of sampling")
    p.add_argument("--image", action="append", metavar="FILE", help="source image for editing (repeatable)")
    add_provider_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_generate)


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantise an ONNX package into a new package, with a quality report "
                                        "(no torch needed)")
    p.add_argument("package", help="exported fp32 ONNX package folder")
    p.add_argument("out", help="package folder to write")
    p.add_argument("--recipe", required=True, choices=["int8-dynamic", "int8-static", "int4-weight", "fp16"])
    p.add_argument("--components", nargs="+", metavar="GRAPH",
                   help="graphs to quantise (default: the recipe's: int8-dynamic AR, vision tokenizer, glyph "
                        "encoder, DiT; int8-static AR, glyph encoder, DiT; int4-weight AR and DiT; fp16 all)")
    p.add_argument("--calibration-prompts", metavar="FILE",
                   help="prompts for calibration runs, one a line (default: the shipped set)")
    p.add_argument("--calibration-limit", type=int, metavar="N", help="use the first N calibration prompts")
    p.add_argument("--calibrate-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="int8-static range estimation (default minmax)")
    p.add_argument("--per-channel", default="auto", choices=["auto", "on", "off"],
                   help="int8-dynamic weights per output channel; auto measures both on calibration "
                        "inputs and takes per-channel only where its error is >= 25%% lower (it is slower), "
                        "per graph (default auto)")
    p.add_argument("--block-size", type=int, default=32, help="int4-weight block size (default 32)")
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="int4-weight MatMulNBits compute type: 4 = int8 (fastest on CPU), 1 = fp32 (default: "
                        "onnxruntime's)")
    p.add_argument("--height", type=int, default=256, help="image size of calibration and evaluation runs")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="denoising steps of calibration and evaluation runs")
    p.add_argument("--eval-prompts", type=int, default=3, metavar="N", help="prompts in the quality report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads per graph (default: all cores)")
    p.add_argument("--min-psnr", type=float, metavar="DB",
                   help="fail below this image PSNR vs fp32 at fixed AR tokens and latents (worst prompt)")
    p.add_argument("--min-ssim", type=float, help="fail below this image SSIM at fixed tokens and latents")
    p.add_argument("--min-free-psnr", type=float, metavar="DB", help="fail below this free-running image PSNR")
    p.add_argument("--min-top1", type=float, metavar="PCT",
                   help="fail below this AR top-1 agreement with fp32 (teacher-forced, percent)")
    p.add_argument("--max-rel-error", type=float,
                   help="fail above this relative L2 error of any quantised graph's main output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.set_defaults(func=cmd_quantize)


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="which nodes of a package the provider has no kernel for (offline, from "
                                     "onnxruntime's kernel registrations); exit 1 if any falls back")
    p.add_argument("package", help="ONNX package folder")
    p.add_argument("--provider", required=True, choices=list(CHECKED_PROVIDERS))
    p.add_argument("--verbose", action="store_true", help="one line per node that falls back")
    p.add_argument("--observed", action="store_true",
                   help="also create each session on this machine and print onnxruntime's own node placement "
                        "(its verbose log; needs the provider's onnxruntime build and device)")
    p.set_defaults(func=cmd_check)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what a package holds, from its manifest: target, graphs, sizes, export "
                                    "checks, pipeline settings, provenance")
    p.add_argument("package", help="ONNX package folder")
    p.add_argument("--json", action="store_true", help="the manifest as the schema reads it, as JSON")
    p.add_argument("--verify", action="store_true", help="also hash every file against the manifest")
    p.set_defaults(func=cmd_info)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as e:
        print(f"glm-image-onnx {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"glm-image-onnx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
