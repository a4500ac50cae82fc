"""The OpenAI Images API's serving logic, over the protocol-free core (`dataplane`): an
`ImagesRequest` becomes `n` typed glm_image requests, parsed once by glm_image's own parser, image
i with the pipeline's seed rule (`runtime.sampling.image_seeds`: seed + i, a random seed for a batch
given none), so image 0 equals the gRPC result for that seed. Each runs through the core's
inference path (admission, cancellation, statistics, the log line), as a KServe request does.

No web framework here: `openai_images` turns HTTP into calls of `ImagesServing` and its answers
into responses, so this can be driven alone (a DataPlane is all it needs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, AsyncIterator

import numpy as np

from glm_image_onnx.runtime.sampling import image_seeds
from glm_image_onnx.server import errors
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.dataplane import DataPlane
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.glm_image_fields import SEED_LIMIT, GlmImageRequest, Previews
from glm_image_onnx.server.inference import loop_progress
from glm_image_onnx.server.models import Decoded, Model, Result
from glm_image_onnx.server.openai_protocol import MODEL, ImagesRequest, error_event, progress_comment

log = logging.getLogger("glm_image_onnx.server")


class ImagesServing:
    def __init__(self, plane: DataPlane):
        self.plane = plane

    def requests(self, ask: ImagesRequest, inputs: dict[str, np.ndarray]) -> list[GlmImageRequest]:
        """The `n` glm_image requests `ask` makes (its source images as `inputs["image"]` for an edit)."""
        model = self.plane.model(MODEL)
        first = model.parse(inputs, ask.params)  # type: ignore[attr-defined]
        seeds = image_seeds(first.seed, ask.n)
        if seeds[-1] is not None and seeds[-1] >= SEED_LIMIT:
            raise errors.invalid(f"seed + n - 1 must be below 2^63 (image i takes seed + i), got seed {first.seed} "
                                 f"and n {ask.n}", "seed")
        return [dataclasses.replace(first, seed=seed) for seed in seeds]

    def _infer(self, ask: ImagesRequest, request: GlmImageRequest, ctx: RequestContext, progress: Any = None,
               admitted: asyncio.Event | None = None) -> Any:
        def decode() -> Decoded:
            return Decoded({}, outputs=[ask.output], request=request)

        def encode(model: Model, result: Result) -> Result:
            return result

        return self.plane.infer(ctx, "", decode, encode, progress, admitted)

    async def images(self, ask: ImagesRequest, requests: list[GlmImageRequest],
                     contexts: list[RequestContext]) -> list[tuple[str, str]]:
        """Every image, (base64 file, "WIDTHxHEIGHT") each; the first failure cancels the others."""
        tasks = [asyncio.ensure_future(self._infer(ask, r, ctx)) for r, ctx in zip(requests, contexts)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()  # a no-op for the finished ones
        failed = [t.exception() for t in done if t.exception() is not None]
        if failed:
            # A cancelled task is not done until it has run once more: wait for the others to stop
            # (their admission slots freed, their log lines written) before answering the first error.
            await asyncio.gather(*tasks, return_exceptions=True)
            raise failed[0]  # type: ignore[misc]
        results = [t.result() for t in tasks]
        return await asyncio.to_thread(lambda: [ask.encode(r) for r in results])

    async def stream(self, ask: ImagesRequest, request: GlmImageRequest, ctx: RequestContext
                     ) -> AsyncIterator[bytes]:
        """The server-sent events of one image: a RequestError before the request is admitted is
        raised here (a plain error response); after that, errors are an `error` event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        def preview(*args: Any) -> None:  # on the worker: encoded there, sent from the event loop
            event = ask.partial_event(*args)
            loop.call_soon_threadsafe(queue.put_nowait, event)

        request = dataclasses.replace(request, previews=Previews(ask.partial_images, preview))
        progress = loop_progress(loop, lambda *p: queue.put_nowait(progress_comment(*p)))
        admitted = asyncio.Event()
        task = asyncio.ensure_future(self._infer(ask, request, ctx, progress, admitted))
        waiter = asyncio.ensure_future(admitted.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return self._events(ask, task, queue, ctx)

    async def _events(self, ask: ImagesRequest, task: asyncio.Future, queue: asyncio.Queue[bytes],
                      ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                yield get.result()
            while not queue.empty():
                yield queue.get_nowait()
            try:
                b64, size = await asyncio.to_thread(ask.encode, task.result())
                yield ask.completed_event(b64, size)
            except RequestError as e:
                yield error_event(e)
            except Exception:  # our bug (encoding the image): the stream still ends with an `error` event
                log.exception("request %s: encoding the streamed image failed", ctx.label)
                yield error_event(errors.internal_answer(ctx.label))
        finally:
            if not task.done():  # the client went away mid-stream
                task.cancel()
