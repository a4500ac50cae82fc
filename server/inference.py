"""One inference request, protocol-free: the path both front ends (gRPC and HTTP) share.

A front end decodes its wire format into input arrays, parameters and requested outputs; this
module does the rest the same way for both: model lookup and phase check, the model's own
validation (`prepare`, errors naming the field), admission (RESOURCE_EXHAUSTED over the limit), the
work on a worker (cancelled when the client goes away), the statistics, the metrics and the one log
line per request. The front end then encodes the `Result`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

from glm_image_onnx.server import errors
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.models import Decoded, Model, Progress, Result
from glm_image_onnx.server.state import ServerState
from glm_image_onnx.server.wire import printable

log = logging.getLogger("glm_image_onnx.server")

T = TypeVar("T")


AR_PROGRESS_UPDATES = 32  # at most this many AR progress updates per request (plus the last)


def loop_progress(loop: asyncio.AbstractEventLoop, send: Callable[[str, int, int], None]) -> Progress:
    """The pipeline's progress (on a worker thread) as calls of `send` on the event loop, AR steps
    throttled (`ar_throttled`): how a streaming front end turns progress into messages."""
    return ar_throttled(lambda stage, done, total: loop.call_soon_threadsafe(send, stage, done, total))


def ar_throttled(progress: Progress) -> Progress:
    """`progress` called for every denoising step but only ~AR_PROGRESS_UPDATES times during the AR
    planning (one call per token would flood a stream: ~4k tokens at 1024x1024)."""
    def throttled(stage: str, done: int, total: int) -> None:
        every = max(1, total // AR_PROGRESS_UPDATES) if stage == "ar" else 1
        if done % every == 0 or done == total:
            progress(stage, done, total)

    return throttled


def _apply_request_parameters(ctx: RequestContext, parameters: dict[str, Any]) -> None:
    """Triton's request parameters that concern the server, not the model, the same on every front
    end: `timeout` (microseconds) bounds the request like a gRPC deadline, the earlier one winning."""
    timeout_us = parameters.pop("timeout", None)
    if timeout_us is not None:
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us <= 0:
            raise errors.invalid("parameter 'timeout' must be a positive integer (microseconds)", "timeout")
        ctx.set_timeout(timeout_us / 1e6)


async def _outcome(future: Future, ctx: RequestContext) -> Any:
    """The work's value, or the context's error as soon as it is cancelled (a deadline, the drain
    timeout): the client is answered at once while the work stops at its next step."""
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()

    def wake() -> None:  # on the thread that cancels: a worker past its deadline, the drain, the loop
        if not loop.is_closed():  # closed: the server is gone and nobody waits
            loop.call_soon_threadsafe(lambda: stopped.done() or stopped.set_result(None))

    ctx.on_cancel(wake)
    work = asyncio.wrap_future(future)
    work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, if nobody waits for it
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not work.done():
        ctx.check()  # stopped: raises the cancellation's error (a cancelled context always has one)
    return work.result()


async def infer(state: ServerState, ctx: RequestContext, version: str, decode: Callable[[], Decoded],
                encode: Callable[[Model, Result], T], progress: Progress | None = None,
                admitted: asyncio.Event | None = None) -> T:
    """Run one request to `ctx.model` and return `encode(model, result)`.

    `decode` runs after the model lookup (so an unknown model is NOT_FOUND before any tensor is
    read); its RequestErrors, and every refusal here, reach the caller as RequestError. Cancelling
    the awaiting task (the client went away) cancels the work at its next AR token or denoising step.
    `admitted` is set once the request holds a slot (a streaming front end then starts its response)."""
    status, model, rows = "OK", None, 1
    try:
        model = state.model(ctx.model, version)
        if state.phase != "READY":
            raise errors.unavailable(f"the server is {state.phase.lower()}; not accepting requests")
        t = time.perf_counter()
        request = decode()
        _apply_request_parameters(ctx, request.parameters)
        prepared = model.prepare(request)
        rows = prepared.rows
        ctx.input_s = time.perf_counter() - t
        state.admission.admit(ctx, prepared.memory + ctx.wire_bytes)
        try:
            future = model.submit(prepared, ctx, state.admission, progress)
        except BaseException:
            state.admission.release(ctx)
            raise
        state.admission.hold_until_done(future, ctx)
        if admitted is not None:
            admitted.set()
        try:
            value = await _outcome(future, ctx)
        except asyncio.CancelledError:
            ctx.cancel(errors.deadline() if ctx.deadline is not None and time.monotonic() >= ctx.deadline
                       else errors.cancelled())
            future.cancel()
            status = "CANCELLED"
            raise
        t = time.perf_counter()
        result = model.finish(prepared, value)
        encoded = encode(model, result)
        ctx.output_s = time.perf_counter() - t
        if result.timings is not None:
            state.metrics.stages(model.name, result.timings.stages())
        return encoded
    except RequestError as e:
        status = e.code
        if e.code != "INTERNAL":
            raise
        log.error("request %s to %s failed: %r", printable(ctx.label), printable(ctx.model), e.message)
        raise errors.internal_answer(ctx.label) from None  # the client is told no internals
    except Exception:
        status = "INTERNAL"
        log.exception("request %s to %s failed", printable(ctx.label), printable(ctx.model))
        raise errors.internal_answer(ctx.label) from None
    finally:
        _record(state, ctx, model, status, rows)


def _record(state: ServerState, ctx: RequestContext, model: Model | None, status: str, rows: int) -> None:
    """A finished request's statistics, metrics and its one log line."""
    total = time.perf_counter() - ctx.t_received
    if model is not None:
        model.stats.request_done(status == "OK", total, ctx.queue_s(), ctx.input_s, ctx.compute_s(), ctx.output_s,
                                 rows)
    queued = ctx.queue_s() if ctx.t_started is not None else None
    state.metrics.request_done(ctx.model if model else "unknown", status, total, queued)
    log.info("infer model=%s id=%s peer=%s protocol=%s status=%s queue_ms=%.1f compute_ms=%.1f total_ms=%.1f%s%s",
             printable(ctx.model), printable(ctx.label), printable(ctx.peer), ctx.protocol, status,
             ctx.queue_s() * 1e3, ctx.compute_s() * 1e3, total * 1e3,
             "" if ctx.ar_rows is None else f" ar_rows={ctx.ar_rows}",
             f" memory_mb={ctx.memory >> 20}" if ctx.memory else "")
