"""`glm-image-onnx client`: one image from a running server, with the stock tritonclient.

Works against `glm-image-onnx serve` and against Triton serving the repository written by
`glm-image-onnx triton-repo` (`--stream` needs this project's server: Triton's Python model is not
decoupled and sends no progress).
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from glm_image_onnx.server.glm_image_fields import FIELDS, SETTINGS



class ClientError(Exception):
    pass


def build_inputs(prompt: str, image: bytes | None = None, **fields: Any) -> list:
    """glm_image's inputs, each in the datatype its request table declares (server.glm_image_request)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import triton_to_np_dtype

    def tensor(name: str, array: np.ndarray, datatype: str):
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("prompt", np.array([prompt.encode("utf-8")], dtype=object), "BYTES")]
    if image is not None:
        inputs.append(tensor("image", np.array([image], dtype=object), "BYTES"))
    for name, value in fields.items():
        if name not in SETTINGS:
            raise ValueError(f"{name} is not a glm_image setting ({', '.join(SETTINGS)})")
        if value is not None:
            datatype = FIELDS[name].datatype
            inputs.append(tensor(name, np.array([value], dtype=triton_to_np_dtype(datatype)), datatype))
    return inputs


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per glm_image setting (`glm_image_fields.FIELDS`), unset by default (the server's)."""
    for name in SETTINGS:
        kind = FIELDS[name].kind
        flag = "--" + name.replace("_", "-")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=int if kind == "int" else float)


def connection_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str] | None]:
    """(InferenceServerClient keyword arguments for TLS, request headers for the bearer token)."""
    import os

    token = getattr(args, "token", None)
    token_file = getattr(args, "token_file", None)
    if token and token_file:
        raise ClientError("--token and --token-file are exclusive")
    if token_file:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ClientError(f"--token-file {token_file}: cannot read it ({getattr(e, 'strerror', None) or e})"
                              ) from None
        tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        if not tokens:
            raise ClientError(f"--token-file {token_file}: no token in it")
        token = tokens[0]
    token = token or os.environ.get("GLM_IMAGE_TOKEN") or None
    headers = {"authorization": f"Bearer {token}"} if token else None
    ca, cert, key = getattr(args, "tls_ca", None), getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if (cert is None) != (key is None):
        raise ClientError("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not Path(path).is_file():
            raise ClientError(f"{flag} {path}: no such file")
    tls: dict[str, Any] = {}
    if getattr(args, "tls", False) or ca or cert:
        tls = {"ssl": True, "root_certificates": ca, "private_key": key, "certificate_chain": cert}
    return tls, headers


def _stream(client: Any, model: str, inputs: list, outputs: list, timeout: float | None,
            headers: dict[str, str] | None = None) -> Any:
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)),
                        stream_timeout=timeout, headers=headers)
    try:
        client.async_stream_infer(model, inputs, outputs=outputs, request_id="1")
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            params = result.get_response().parameters
            if "progress_stage" in params and not params["triton_final_response"].bool_param:
                stage = {"ar": "AR tokens", "denoise": "denoising"}.get(params["progress_stage"].string_param)
                done, total = params["progress_done"].int64_param, params["progress_total"].int64_param
                print(f"\r{stage:>10} {done}/{total}", end="\n" if done == total else "", file=sys.stderr,
                      flush=True)
                continue
            return result
    finally:
        client.stop_stream(cancel_requests=True)


def generate(args: argparse.Namespace) -> int:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    image = None
    if args.image:
        try:
            image = Path(args.image).read_bytes()
        except OSError as e:
            raise ClientError(f"--image {args.image}: {e.strerror}") from None
    fields = {name: getattr(args, name) for name in SETTINGS}
    inputs = build_inputs(args.prompt, image, **fields)
    outputs = [grpcclient.InferRequestedOutput("image_png")]
    start = time.perf_counter()
    tls, headers = connection_options(args)
    try:
        with grpcclient.InferenceServerClient(args.url, **tls) as client:
            if args.stream:
                result = _stream(client, args.model, inputs, outputs, args.timeout, headers)
            else:
                result = client.infer(args.model, inputs, outputs=outputs, client_timeout=args.timeout,
                                      headers=headers)
    except InferenceServerException as e:
        raise ClientError(f"{args.url}: {e.status() or 'error'}: {e.message()}") from None
    except queue.Empty:
        raise ClientError(f"{args.url}: no response within {args.timeout}s") from None
    png = result.as_numpy("image_png")
    if png is None:
        raise ClientError(f"{args.url}: the response has no image_png output")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png[0])
    params = result.get_response().parameters
    seed = f" (seed {params['seed'].int64_param})" if "seed" in params else ""
    print(f"wrote {out}{seed} in {time.perf_counter() - start:.2f}s from {args.url}", file=sys.stderr)
    return 0
