"""`glm-image-onnx` command line: one subcommand per stage, imported only when used.

A serving host has no torch: the export-side subcommands import it lazily and say which extra
to install when it is missing. User errors end with one readable line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    """A user-facing failure: printed as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _need_export_extra() -> None:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise CliError(f"this command needs the export extra ({e.name} is missing): "
                       "pip install 'glm-image-onnx[export]'") from None


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    _need_export_extra()
    from .models.checkpoint import write_checkpoint
    from .models.presets import get_preset

    try:
        preset = get_preset(args.preset)
        if preset.name == "full":
            raise ValueError("preset 'full' records the published sizes (16B parameters) and is not "
                             "built here; use tiny or bench")
        out = write_checkpoint(preset, Path(args.out), seed=args.seed)
    except (ValueError, FileExistsError) as e:
        raise CliError(str(e)) from None
    print(f"wrote {preset.name} checkpoint (seed {args.seed}) to {out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _need_export_extra()
    from .export.package import ExportError, ExportOptions, GRAPHS, export_package
    from .models.inspect import CheckpointError

    graphs = tuple(args.components) if args.components else tuple(GRAPHS)
    options = ExportOptions(graphs=graphs, verify=args.verify, opset=args.opset,
                            overwrite=args.overwrite, seed=args.seed)
    try:
        export_package(args.checkpoint, args.out, options)
    except (CheckpointError, ExportError) as e:
        raise CliError(str(e), EXIT_FAILED if isinstance(e, ExportError) else EXIT_USAGE) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-image-onnx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-checkpoint", help="write a random GLM-Image checkpoint (diffusers layout)")
    p.add_argument("--preset", default="tiny", help="tiny | bench (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("out", help="output folder (must not exist or be empty)")
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("export", help="export a checkpoint folder to an ONNX package")
    p.add_argument("checkpoint", help="GLM-Image checkpoint folder (diffusers layout)")
    p.add_argument("out", help="package folder to write")
    p.add_argument("--verify", action="store_true",
                   help="compare every graph with PyTorch at several shapes; fail above 1e-4 relative")
    p.add_argument("--components", nargs="+", metavar="GRAPH",
                   help="graphs to export (default: all): ar_planner vision_tokenizer glyph_encoder "
                        "dit_decoder dit_condition_write vae_decoder vae_encoder")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.set_defaults(func=cmd_export)
    return parser


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
