"""Helpers for the server tests: the real server on a free loopback port, tritonclient inputs."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="needs the serve extra (tritonclient[grpc])")

from glm_image_onnx.server.app import ServerConfig, ServerThread  # noqa: E402
from glm_image_onnx.server.glm_image_model import Limits  # noqa: E402

GLM_TYPES = {"prompt": "BYTES", "image": "BYTES", "height": "INT32", "width": "INT32", "steps": "INT32",
             "guidance": "FP32", "seed": "INT64", "temperature": "FP32", "top_p": "FP32", "top_k": "INT32"}
NUMPY = {"BYTES": object, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(package: Path, load: bool = True, **overrides: Any) -> ServerThread:
    """The server with both front ends: gRPC, and HTTP on another free port (`http_url`)."""
    settings: dict[str, Any] = dict(host="127.0.0.1", port=0, http_port=0, verify_files=False) | overrides
    return ServerThread(ServerConfig(package=package, **settings)).start(load=load)


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         context: Any = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one plain HTTP request (urllib: no client library in between)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def tensor(name: str, value: Any, datatype: str | None = None) -> Any:
    datatype = datatype or GLM_TYPES[name]
    array = np.asarray(value if isinstance(value, (list, np.ndarray)) else [value], dtype=NUMPY.get(datatype))
    if datatype == "BYTES":
        array = np.array([v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)],
                         dtype=object).reshape(array.shape)
    t = tritonclient_grpc.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def glm_inputs(**fields: Any) -> list[Any]:
    return [tensor(name, value) for name, value in fields.items()]


def outputs(*names: str) -> list[Any]:
    return [tritonclient_grpc.InferRequestedOutput(n) for n in names]


__all__ = ["Limits", "ServerThread", "free_port", "glm_inputs", "http", "outputs", "start_server", "tensor",
           "tritonclient_grpc"]
