"""The execution-provider options shared by `glm-image-onnx generate` and `serve`.

One declaration, so both commands take the same flags with the same help; only argparse is
imported at module level (the parser is built on hosts without the optional extras), the runtime
when the arguments are turned into settings.
"""

from __future__ import annotations

import argparse
from typing import Any, TypedDict


class ProviderSettings(TypedDict):
    """The keyword arguments both GlmImageOnnxPipeline.from_package and ServerConfig take."""

    provider: str
    provider_options: dict[str, Any]
    strict: bool
    threads: int | None
    verify_files: bool


def add_provider_arguments(parser: argparse.ArgumentParser) -> None:
    """--provider, --provider-option, --strict, --threads, --no-verify."""
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "cann"])
    parser.add_argument("--provider-option", action="append", metavar="KEY=VALUE",
                        help="execution provider option, e.g. device_id=0 (repeatable)")
    parser.add_argument("--strict", action="store_true", help="fail instead of falling back to CPU")
    parser.add_argument("--threads", type=int, help="CPU threads per graph (default: all cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the package files")


def provider_settings(args: argparse.Namespace) -> ProviderSettings:
    """The parsed flags as keyword arguments; raises ValueError for a --provider-option that is not KEY=VALUE."""
    from .runtime.providers import parse_options

    return ProviderSettings(provider=args.provider, provider_options=parse_options(args.provider_option),
                            strict=args.strict, threads=args.threads, verify_files=not args.no_verify)
