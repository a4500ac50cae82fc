"""KServe v2 `inference.GRPCInferenceService` on grpc.aio, using the protocol modules shipped in
tritonclient so that the stock `tritonclient.grpc` clients (sync, aio, streaming) work unchanged.

A thin codec over `dataplane.DataPlane`: protobuf in, the core's plain answers parsed into protobuf
out. Inference never runs on the event loop: a request is decoded here (errors name the field),
validated, admitted (RESOURCE_EXHAUSTED over the limit) and run on a worker by the core, and awaited; a client that cancels or whose deadline passes stops the work at the next AR token or
denoising step. `ModelStreamInfer` runs each request of the stream concurrently, sends progress
responses (parameter `progress_stage`) before the final one, and reports per-request errors in-band
as `error_message`, so the stream stays usable. `ErrorInterceptor` answers what escapes a handler:
a message protobuf cannot parse is INVALID_ARGUMENT, a bug INTERNAL with a request id, never grpc's
UNKNOWN naming the exception.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from glm_image_onnx.server import errors
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.dataplane import DataPlane
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.inference import loop_progress
from glm_image_onnx.server.models import VERSION, Decoded, Model, Result
from glm_image_onnx.server.tensors import DEFAULT_MAX_ELEMENTS, add_output, parameter_value, read_inputs, set_parameter
from glm_image_onnx.server.wire import printable

log = logging.getLogger("glm_image_onnx.server")
SERVICE = "/inference.GRPCInferenceService/"


def to_message(data: dict[str, Any], message: Message) -> Message:
    """The core's plain answer as a protobuf message (a field the .proto lacks is a bug: it raises)."""
    return json_format.ParseDict(data, message)


def _progress_response(request: service_pb2.ModelInferRequest, stage: str, done: int, total: int
                       ) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=VERSION, id=request.id)
    set_parameter(response.parameters, "progress_stage", stage)
    set_parameter(response.parameters, "progress_done", done)
    set_parameter(response.parameters, "progress_total", total)
    set_parameter(response.parameters, "triton_final_response", False)
    return service_pb2.ModelStreamInferResponse(infer_response=response)


class Malformed:
    """Stands for a message protobuf cannot parse (truncated, or a string field that is not UTF-8, as
    a lone surrogate in a prompt parameter is), so that the call can answer INVALID_ARGUMENT."""

    def __init__(self, what: str):
        self.message = (f"the message is not a valid {what}: protobuf cannot parse it (truncated, or a string "
                        "field that is not UTF-8)")


def _tolerant(parse: Callable[[bytes], Any], what: str) -> Callable[[bytes], Any]:
    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return Malformed(what)

    return tolerant


def _guarded(method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A unary handler whose failures are answered as `ErrorInterceptor` says."""
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            answer = behavior(request, context)
            return await answer if inspect.isawaitable(answer) else answer
        except grpc.aio.AbortError:  # the handler's own status
            raise
        except NotImplementedError:  # the generated servicer's answer for a method this server lacks
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")
        except Exception:
            request_id = getattr(request, "id", "") or uuid.uuid4().hex[:16]
            log.exception("grpc %s failed (request id %s)", method, printable(request_id))
            await context.abort(grpc.StatusCode.INTERNAL, errors.internal_answer(request_id).message)

    return call


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """What escapes the inference service's handlers, answered as the client's error or ours: a
    message that does not parse is INVALID_ARGUMENT, a method this server lacks UNIMPLEMENTED, and
    any other exception (a bug of ours) INTERNAL with a request id under which it is logged. grpc
    would answer UNKNOWN with the exception's class and message. Install it after the token check."""

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE):
            return handler
        method = details.method[len(SERVICE):]
        parse = _tolerant(handler.request_deserializer, f"{method} request")
        if handler.request_streaming or handler.response_streaming:  # ModelStreamInfer answers in-band
            return handler._replace(request_deserializer=parse)
        return handler._replace(request_deserializer=parse, unary_unary=_guarded(method, handler.unary_unary))


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, max_tensor_elements: int = DEFAULT_MAX_ELEMENTS,
                 max_stream_pending: int = 256):
        self.plane = plane
        self.max_tensor_elements = max_tensor_elements
        self.max_stream_pending = max_stream_pending

    async def _answer(self, context, make: Callable[[], Message]) -> Message:
        try:
            return make()
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)

    # ------------------------------------------------------------------------------ health-ish
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request, context):
        try:  # KServe's gRPC ModelReady has no error: an unknown model is not ready
            ready = self.plane.model_ready(request.name, request.version)
        except RequestError:
            ready = False
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return to_message(self.plane.server_metadata(), service_pb2.ServerMetadataResponse())

    # ------------------------------------------------------------------------------- metadata
    async def ModelMetadata(self, request, context):
        return await self._answer(context, lambda: to_message(self.plane.model_metadata(request.name, request.version),
                                                              service_pb2.ModelMetadataResponse()))

    async def ModelConfig(self, request, context):
        return await self._answer(context, lambda: service_pb2.ModelConfigResponse(config=to_message(
            self.plane.model_config(request.name, request.version), model_config_pb2.ModelConfig())))

    async def ModelStatistics(self, request, context):
        return await self._answer(context, lambda: to_message(
            self.plane.model_statistics(request.name, request.version), service_pb2.ModelStatisticsResponse()))

    async def RepositoryIndex(self, request, context):
        return to_message({"models": self.plane.repository_index(request.ready)}, service_pb2.RepositoryIndexResponse())

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
                progress = loop_progress(loop, lambda *p: queue.put_nowait(_progress_response(request, *p)))
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
                if isinstance(request, Malformed):  # the stream stays open, as for any bad request
                    queue.put_nowait(service_pb2.ModelStreamInferResponse(error_message=request.message))
                    continue
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

    async def _infer(self, request: service_pb2.ModelInferRequest, context,
                     progress: Callable[[str, int, int], None] | None = None) -> service_pb2.ModelInferResponse:
        ctx = RequestContext(request.model_name, request.id, context.time_remaining(), context.peer())
        ctx.wire_bytes = request.ByteSize()

        def decode() -> Decoded:
            for out in request.outputs:
                if "shared_memory_region" in out.parameters:
                    raise errors.no_shared_memory(f"output '{out.name}'")
            params = {k: parameter_value(v) for k, v in request.parameters.items()}
            return Decoded(read_inputs(request, self.max_tensor_elements), params, [o.name for o in request.outputs])

        def encode(model: Model, result: Result) -> service_pb2.ModelInferResponse:
            response = service_pb2.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request.id)
            for name, array, datatype in result.outputs:
                add_output(response, name, array, datatype)
            for key, value in result.parameters.items():
                set_parameter(response.parameters, key, value)
            return response

        return await self.plane.infer(ctx, request.model_version, decode, encode, progress)
