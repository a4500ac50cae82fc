"""The execution-provider options shared by `glm-image-onnx generate` and `serve`.

One declaration, so both commands take the same flags with the same help; only argparse is
imported at module level (the parser is built on hosts without the optional extras), the runtime
when the arguments are turned into settings.
"""

from __future__ import annotations

import argparse
from typing import Any, TypedDict

from glm_image_onnx.targets import PROVIDER_NAMES


class ProviderSettings(TypedDict):
    """The keyword arguments both GlmImageOnnxPipeline.from_package and ServerConfig take."""

    provider: str
    provider_options: dict[str, Any]
    strict: bool
    threads: int | None
    verify_files: bool | str  # True ("cached"), "full" or False ("off"): runtime.package.verify_mode
    vae_tiling: str
    vae_tile_size: int | None


def add_provider_arguments(parser: argparse.ArgumentParser) -> None:
    """--provider, --provider-option, --strict, --threads, --verify / --no-verify, --vae-tiling."""
    parser.add_argument("--provider", default="cpu", choices=PROVIDER_NAMES)
    parser.add_argument("--provider-option", action="append", metavar="KEY=VALUE",
                        help="execution provider option, e.g. device_id=0 (repeatable)")
    parser.add_argument("--strict", action="store_true", help="fail instead of falling back to CPU")
    parser.add_argument("--threads", type=int, help="CPU threads per graph (default: all cores)")
    verify = parser.add_mutually_exclusive_group()
    verify.add_argument("--verify", dest="verify_full", action="store_true",
                        help="sha256 every package file, ignoring the checksum cache (default: only files "
                             "whose size, mtime or inode changed since their last check are hashed)")
    verify.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the package files")
    # How the VAE graphs run rather than where, but a session setting both commands share like the rest.
    parser.add_argument("--vae-tiling", default="auto", choices=["auto", "on", "off"],
                        help="VAE decode/encode in diffusers' overlapping tiles: auto (images larger than "
                             "one tile, bounded memory), on (always), off (whole image at once)")
    parser.add_argument("--vae-tile-size", type=int, metavar="PX",
                        help="VAE tile side in pixels (default: the VAE's sample_size, 1024 for the "
                             "published model, at most 512 on the CPU: a 1024 tile of the published VAE "
                             "needs 15 GB there)")


def provider_settings(args: argparse.Namespace) -> ProviderSettings:
    """The parsed flags as keyword arguments; raises ValueError for a --provider-option that is not KEY=VALUE."""
    from glm_image_onnx.runtime.providers import parse_options

    return ProviderSettings(provider=args.provider, provider_options=parse_options(args.provider_option),
                            strict=args.strict, threads=args.threads,
                            # False, not "off": from_package warns on a falsy verify_files
                            verify_files=False if args.no_verify else "full" if args.verify_full else True,
                            vae_tiling=args.vae_tiling, vae_tile_size=args.vae_tile_size)
