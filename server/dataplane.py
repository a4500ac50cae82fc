"""The protocol-free core of the KServe front ends, as KServe's own `DataPlane`: health, server and
model description, readiness, statistics, the repository index, and inference (`inference.infer`).

It answers with plain data in the shape of Triton's JSON: field names as in KServe's and Triton's
.proto files, enums by name, 64-bit integers as numbers. The HTTP front end writes these dicts as
they are; the gRPC front end parses them into its protobuf messages (`json_format.ParseDict`, which
refuses a field the .proto does not have), so both answer the same facts by construction and only
the gRPC codec needs protobuf. Errors are `RequestError`s, which each front end encodes its way.
"""

from __future__ import annotations

import asyncio
from importlib import metadata as importlib_metadata
from typing import Any, Callable, TypeVar

from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.inference import infer
from glm_image_onnx.server.models import VERSION, Decoded, Model, Progress, Result
from glm_image_onnx.server.state import ServerState

T = TypeVar("T")

SERVER_NAME = "glm-image-onnx"
EXTENSIONS = ["model_configuration", "statistics", "binary_tensor_data", "parameters", "streaming_progress"]


def server_version() -> str:
    try:
        return importlib_metadata.version("glm-image-onnx")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


class DataPlane:
    def __init__(self, state: ServerState):
        self.state = state
        self.version = server_version()

    def ready(self) -> bool:
        return self.state.ready

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": self.version, "extensions": list(EXTENSIONS)}

    def model(self, name: str, version: str = "") -> Model:
        """The served model (NOT_FOUND naming the known ones, UNAVAILABLE while loading)."""
        return self.state.model(name, version)

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.state.ready and self.model(name, version).ready

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        return self.model(name, version).metadata()

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        return self.model(name, version).config()

    def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Every model's statistics, or `name`'s."""
        models = [self.model(name, version)] if name else [self.model(n, version) for n in self.state.models]
        return {"model_stats": [m.stats.snapshot(m.name, VERSION) for m in models]}

    def repository_index(self, only_ready: bool = False) -> list[dict[str, str]]:
        return self.state.repository_index(only_ready)

    async def infer(self, ctx: RequestContext, version: str, decode: Callable[[], Decoded],
                    encode: Callable[[Model, Result], T], progress: Progress | None = None,
                    admitted: asyncio.Event | None = None) -> T:
        """One inference (`inference.infer`): the same path, checks, log line and statistics for every
        front end."""
        return await infer(self.state, ctx, version, decode, encode, progress, admitted)
