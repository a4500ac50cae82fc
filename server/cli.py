"""The serving subcommands of `glm-image-onnx`: serve, client, triton-repo.

Only argparse is imported here; each command imports its module when it runs, and says which
extra to install when grpc or tritonclient is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glm_image_onnx.errors import exit_code
from glm_image_onnx.provider_args import add_provider_arguments, provider_settings
from glm_image_onnx.server import limits as limits_mod
from glm_image_onnx.server.client import add_setting_arguments
from glm_image_onnx.server.limits import ComponentLimits, ConnectionLimits, Limits
from glm_image_onnx.targets import PROVIDER_NAMES


def _cli_error(message: str, code: int = 2) -> Exception:
    from glm_image_onnx.cli import CliError

    return CliError(message, code)


def _need_serve_extra() -> None:
    from glm_image_onnx.cli import need_extra

    need_extra("serve", "grpc", "grpc_health", "grpc_reflection", "prometheus_client", "tritonclient.grpc",
               "starlette", "uvicorn", "python_multipart")


def cmd_serve(args: argparse.Namespace) -> int:
    _need_serve_extra()
    import asyncio
    import logging

    from glm_image_onnx.runtime import ArBatching, Package, PackageError, ProviderError
    from glm_image_onnx.server import memory
    from glm_image_onnx.server.app import GlmImageServer, LoadError, ServerConfig
    from glm_image_onnx.server.security import SecurityConfig, SecurityError

    for flag in ("max_concurrency", "max_batch_size"):
        if getattr(args, flag) < 1:
            raise _cli_error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_queue < 0 or args.max_queue_delay_us < 0:
        raise _cli_error("--max-queue and --max-queue-delay-us must be >= 0")
    if args.ar_max_rows < 1 or not args.ar_join_wait_ms >= 0:
        raise _cli_error(f"--ar-max-rows must be >= 1 and --ar-join-wait-ms >= 0, got {args.ar_max_rows} and "
                         f"{args.ar_join_wait_ms}")
    ar_batching = ArBatching(enabled=not args.no_ar_batching, max_rows=args.ar_max_rows,
                             join_wait_ms=args.ar_join_wait_ms)
    if args.max_message_mb < 1:
        raise _cli_error(f"--max-message-mb must be >= 1, got {args.max_message_mb}")
    try:
        limits = limits_mod.from_arguments(args, Limits)
        component_limits = limits_mod.from_arguments(args, ComponentLimits)
        connection = limits_mod.from_arguments(args, ConnectionLimits)
        max_memory = None if args.max_memory is None else memory.parse_size(args.max_memory)
    except ValueError as e:
        raise _cli_error(str(e)) from None
    if not (Path(args.package) / "manifest.json").is_file():
        raise _cli_error(f"{args.package}: not an exported package (no manifest.json)")
    security = SecurityConfig(tls_cert=_path(args.tls_cert), tls_key=_path(args.tls_key),
                              tls_client_ca=_path(args.tls_client_ca), token_file=_path(args.token_file))
    try:
        providers = provider_settings(args)  # ValueError: a --provider-option that is not KEY=VALUE
        security.check()
        Package.open(args.package, verify_files=False)  # manifest + format version, before the port opens
    except (ValueError, SecurityError) as e:  # PackageError is a ValueError; it names the bad file
        raise _cli_error(str(e)) from None
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise _cli_error(f"--http-port must be a port number (0..65535), got {args.http_port}")
    config = ServerConfig(package=Path(args.package), host=args.host, port=args.port, http_port=args.http_port,
                          **providers,
                          max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                          max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                          ar_batching=ar_batching, components=not args.no_components,
                          metrics_port=args.metrics_port, limits=limits,
                          max_message_bytes=args.max_message_mb << 20, drain_timeout_s=args.drain_timeout,
                          security=security, component_limits=component_limits, connection=connection,
                          max_memory=max_memory)
    try:
        return asyncio.run(GlmImageServer(config).run())
    except (PackageError, SecurityError, ProviderError, LoadError, ValueError, OSError) as e:
        # exit 2 for the usage errors (a bad manifest or checksum naming the file, TLS / token files), else 1
        raise _cli_error(str(e), exit_code(e)) from None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def cmd_client(args: argparse.Namespace) -> int:
    _need_serve_extra()
    from glm_image_onnx.server.client import ClientError, generate

    try:
        return generate(args)
    except ClientError as e:
        raise _cli_error(str(e), 1) from None


def cmd_triton_repo(args: argparse.Namespace) -> int:
    _need_serve_extra()
    from glm_image_onnx.runtime import PackageError
    from glm_image_onnx.server.triton_repo import RepoOptions, write_repository

    try:
        limits = limits_mod.from_arguments(args, Limits)
    except ValueError as e:
        raise _cli_error(str(e)) from None
    options = RepoOptions(kind=args.kind, max_batch_size=args.max_batch_size, limits=limits,
                          max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                          tensorrt=args.tensorrt, fp16=args.fp16, files=args.files,
                          components=not args.no_components, pipeline=not args.no_pipeline,
                          provider=args.pipeline_provider, overwrite=args.overwrite)
    try:
        out = write_repository(Path(args.package), Path(args.out), options)
    except (PackageError, ValueError, FileExistsError) as e:
        raise _cli_error(str(e)) from None
    print(f"wrote Triton model repository {out}", file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_serve(sub)
    _add_client(sub)
    _add_triton_repo(sub)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a package over gRPC (KServe v2 / Triton protocol)")
    p.add_argument("package", help="exported ONNX package folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001, Triton's)")
    p.add_argument("--http-port", type=int,
                   help="also serve HTTP on this port: KServe v2 REST and the OpenAI Images API (Triton's is "
                        "8000; default: no HTTP)")
    add_provider_arguments(p)
    p.add_argument("--max-concurrency", type=int, default=1,
                   help="requests executing at once (worker threads; default 1)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond those; more get RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="rows per execution of a dynamically batched component model (1: no batching; default 8)")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="how long a component batch waits for more requests (default 0: never waits)")
    p.add_argument("--no-ar-batching", action="store_true",
                   help="decode each glm_image generation alone (default: concurrent generations share the "
                        "AR planner's decode steps)")
    p.add_argument("--ar-max-rows", type=int, default=16,
                   help="glm_image generations running at once, sharing AR decode steps; more wait (default 16)")
    p.add_argument("--ar-join-wait-ms", type=float, default=0.0,
                   help="how long an AR decode step waits for new generations to join (default 0: never waits)")
    p.add_argument("--no-components", action="store_true", help="serve only glm_image, not every graph")
    limits_mod.add_arguments(p, Limits, ComponentLimits, ConnectionLimits)  # the request bounds: server.limits
    p.add_argument("--max-message-mb", type=int, default=256, help="gRPC message size limit (default 256 MiB)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory for the whole process, e.g. 4G: a request whose measured estimate would pass it gets "
                        "RESOURCE_EXHAUSTED / 429 (default 90%% of the machine's or its cgroup's; 0: no budget)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve over TLS with this certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="PEM",
                   help="mutual TLS: require client certificates signed by this CA")
    p.add_argument("--token-file", metavar="FILE",
                   help="require 'authorization: Bearer <token>'; one token per line, re-read on SIGHUP")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (/metrics)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for in-flight requests (default 60)")
    p.add_argument("--quiet", action="store_true", help="log warnings only (no per-request lines)")
    p.set_defaults(func=cmd_serve)


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="generate an image with a running server (tritonclient)")
    p.add_argument("--url", default="127.0.0.1:8001", help="server host:port (default 127.0.0.1:8001)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", metavar="FILE", help="source image to edit (PNG/JPEG)")
    add_setting_arguments(p)  # --height, --steps, ...: one per glm_image setting
    p.add_argument("--timeout", type=float, help="seconds before the request is abandoned (server stops the work)")
    p.add_argument("--stream", action="store_true", help="show progress (ModelStreamInfer)")
    p.add_argument("--model", default="glm_image", help="model name (default glm_image)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--token", help="bearer token (prefer --token-file or GLM_IMAGE_TOKEN: argv is visible to ps)")
    p.add_argument("--token-file", metavar="FILE", help="file whose first token line is the bearer token")
    p.add_argument("--tls", action="store_true", help="connect with TLS using the system roots")
    p.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA (implies --tls)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (implies --tls)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.set_defaults(func=cmd_client)


def _add_triton_repo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton-repo", help="write a Triton model repository for a package")
    p.add_argument("package", help="exported ONNX package folder")
    p.add_argument("out", help="repository folder to write")
    p.add_argument("--kind", default="cpu", choices=["cpu", "gpu"],
                   help="instance kind for the ONNX models (gpu: CUDA, optionally TensorRT)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-us", type=int, default=100)
    p.add_argument("--instances", type=int, default=1, help="instances per model (default 1)")
    p.add_argument("--tensorrt", action="store_true", help="gpu: use the TensorRT accelerator for the ONNX models")
    p.add_argument("--fp16", action="store_true", help="gpu + tensorrt: allow FP16 engines")
    p.add_argument("--files", default="link", choices=["link", "copy", "symlink"],
                   help="how graph files enter the repository (default link: hard link, else copy)")
    p.add_argument("--no-components", action="store_true", help="only the glm_image Python model")
    p.add_argument("--no-pipeline", action="store_true", help="only the ONNX component models")
    limits_mod.add_arguments(p, Limits)  # glm_image's request bounds, in its model config
    p.add_argument("--pipeline-provider", default=None, choices=PROVIDER_NAMES,
                   help="execution provider of the glm_image model (default: cuda for --kind gpu, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository")
    p.set_defaults(func=cmd_triton_repo)
