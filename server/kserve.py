"""KServe v2 `inference.GRPCInferenceService` on grpc.aio, using the protocol modules shipped in
tritonclient so that the stock `tritonclient.grpc` clients (sync, aio, streaming) work unchanged.

Inference never runs on the event loop: a request is decoded and validated here (errors name the
field), admitted by admission control (RESOURCE_EXHAUSTED over the limit), run on a worker or a batcher,
and awaited; a client that cancels or whose deadline passes stops the work at the next AR token or
denoising step. `ModelStreamInfer` runs each request of the stream concurrently, sends progress
responses (parameter `progress_stage`) before the final one, and reports per-request errors in-band
as `error_message`, so the stream stays usable.
"""

from __future__ import annotations

import asyncio
from importlib import metadata as importlib_metadata
from typing import AsyncIterator, Callable

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from glm_image_onnx.server import errors
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.inference import Decoded, ar_throttled, infer
from glm_image_onnx.server.models import VERSION, Model, Result
from glm_image_onnx.server.state import ServerState
from glm_image_onnx.server.tensors import DEFAULT_MAX_ELEMENTS, add_output, parameter_value, read_inputs, set_parameter

SERVER_NAME = "glm-image-onnx"
EXTENSIONS = ["model_configuration", "statistics", "binary_tensor_data", "parameters", "streaming_progress"]


def server_version() -> str:
    try:
        return importlib_metadata.version("glm-image-onnx")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def _progress_response(request: service_pb2.ModelInferRequest, stage: str, done: int, total: int
                       ) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=VERSION, id=request.id)
    set_parameter(response.parameters, "progress_stage", stage)
    set_parameter(response.parameters, "progress_done", done)
    set_parameter(response.parameters, "progress_total", total)
    set_parameter(response.parameters, "triton_final_response", False)
    return service_pb2.ModelStreamInferResponse(infer_response=response)


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState, max_tensor_elements: int = DEFAULT_MAX_ELEMENTS,
                 max_stream_pending: int = 256):
        self.state = state
        self.max_tensor_elements = max_tensor_elements
        self.max_stream_pending = max_stream_pending
        self.version = server_version()

    # ------------------------------------------------------------------------------ health-ish
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.state.ready)

    async def ModelReady(self, request, context):
        model = self.state.models.get(request.name)
        ready = bool(self.state.ready and model is not None and model.ready and request.version in ("", VERSION))
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    # ------------------------------------------------------------------------------- metadata
    async def _lookup(self, context, name: str, version: str):
        try:
            return self.state.model(name, version)
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)

    async def ModelMetadata(self, request, context):
        return (await self._lookup(context, request.name, request.version)).metadata()

    async def ModelConfig(self, request, context):
        model = await self._lookup(context, request.name, request.version)
        return service_pb2.ModelConfigResponse(config=model.config())

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else list(self.state.models)
        response = service_pb2.ModelStatisticsResponse()
        for name in names:
            model = await self._lookup(context, name, request.version)
            response.model_stats.append(model.stats.to_proto(model.name, VERSION))
        return response

    async def RepositoryIndex(self, request, context):
        response = service_pb2.RepositoryIndexResponse()
        for entry in self.state.repository_index(request.ready):
            response.models.add(**entry)
        return response

    # ------------------------------------------------------------------------------ inference
    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, context)
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator, context) -> AsyncIterator:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def handle(request: service_pb2.ModelInferRequest) -> None:
            progress = None
            wanted = parameter_value(request.parameters["progress"]) if "progress" in request.parameters else True
            if wanted is not False:
                progress = self._stream_progress(loop, queue, request)
            try:
                response = await self._infer(request, context, progress)
                set_parameter(response.parameters, "triton_final_response", True)
                queue.put_nowait(service_pb2.ModelStreamInferResponse(infer_response=response))
            except RequestError as e:
                failed = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
                queue.put_nowait(service_pb2.ModelStreamInferResponse(error_message=e.message,
                                                                      infer_response=failed))

        async def read() -> None:
            async for request in request_iterator:
                # back-pressure: a client that sends faster than it reads (or never reads) waits here, so
                # one stream holds at most `max_stream_pending` requests and a bounded response backlog
                while len(tasks) >= self.max_stream_pending or queue.qsize() >= 64 * self.max_stream_pending:
                    await asyncio.sleep(0.01)
                task = asyncio.create_task(handle(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    def _stream_progress(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
                         request: service_pb2.ModelInferRequest) -> Callable[[str, int, int], None]:
        def progress(stage: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, _progress_response(request, stage, done, total))

        return ar_throttled(progress)

    async def _infer(self, request: service_pb2.ModelInferRequest, context,
                     progress: Callable[[str, int, int], None] | None = None) -> service_pb2.ModelInferResponse:
        ctx = RequestContext(request.model_name, request.id, context.time_remaining(), context.peer())

        def decode() -> Decoded:
            for out in request.outputs:
                if "shared_memory_region" in out.parameters:
                    raise errors.invalid(f"output '{out.name}': shared memory is not supported by this server")
            params = {k: parameter_value(v) for k, v in request.parameters.items()}
            return Decoded(read_inputs(request, self.max_tensor_elements), params, [o.name for o in request.outputs])

        def encode(model: Model, result: Result) -> service_pb2.ModelInferResponse:
            response = service_pb2.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request.id)
            for name, array, datatype in result.outputs:
                add_output(response, name, array, datatype)
            for key, value in result.parameters.items():
                set_parameter(response.parameters, key, value)
            return response

        return await infer(self.state, ctx, request.model_version, decode, encode, progress)
