"""The HTTP listener (`serve --http-port`): KServe v2 REST (`kserve_http`) and the OpenAI Images API
(`openai_images`) on one Starlette app, served by uvicorn on the gRPC server's own event loop, over
the same models, admission limits, bearer tokens, TLS / mTLS settings, metrics and drain.

Why Starlette on uvicorn: both are small, well-kept and the base of most Python model servers
(KServe's own Python server and vLLM among them); Starlette gives routing, multipart forms and
streaming responses and nothing more. Not FastAPI: its pydantic request models would be a second
copy of request validation, and each request must go through the one parser the gRPC front end
uses (`glm_image_request`, `tensors`, the core `dataplane`).

What this module owns, for both APIs: authentication (every route but `/v2/health/*`, the same
tokens as gRPC: `Authorization: Bearer <token>`, which the OpenAI SDK sends as its api key), the body
limit (`--max-message-mb`, 413 past it, checked while reading), cancellation when the client
disconnects, the `glm_image_http_requests` metric, and one log line for a request refused before it
reaches `inference.infer` (which logs the others).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import uuid
from typing import Any, Awaitable, Callable, Iterator

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from glm_image_onnx.server import errors
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.limits import ConnectionLimits
from glm_image_onnx.server.security import SecurityConfig, TokenStore, bearer
from glm_image_onnx.server.dataplane import DataPlane
from glm_image_onnx.server.wire import printable

log = logging.getLogger("glm_image_onnx.server")
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines repeat ours

Handler = Callable[[Request], Awaitable[Response]]


class _H11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers (uvicorn has none): a
    client that connects, or starts a request on a kept-alive connection, and does not finish its
    headers within `header_timeout` s is disconnected instead of holding the connection forever."""

    header_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm()  # the first bytes of a new request
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # its headers are in: the body has its own timeout (read_body)
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            peer = "%s:%d" % self.client if self.client else "unknown"
            log.info("http peer=http:%s no complete request headers within %.1f s: connection closed", peer,
                     self.header_timeout)
            self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM / SIGINT belong to GlmImageServer.run (drain)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFrontEnd:
    def __init__(self, plane: DataPlane, tokens: TokenStore | None, max_body_bytes: int, max_tensor_elements: int,
                 connection: ConnectionLimits = ConnectionLimits()):
        self.plane = plane
        self.state = plane.state
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.max_tensor_elements = max_tensor_elements
        self.connection = connection
        self.body_bytes = 0  # bytes of bodies held by requests now (changed on the event loop only)
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    def app(self) -> Starlette:
        from glm_image_onnx.server import kserve_http, openai_images

        return Starlette(routes=kserve_http.routes(self) + openai_images.routes(self))

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int, security: SecurityConfig) -> int:
        """Listen on host:port (0: a free port) and return the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP, not 0 (socket.create_server's): asyncio sets TCP_NODELAY only on accepted
        # sockets whose proto says TCP, and without it Nagle holds a response's body behind its headers
        # until the client's delayed ACK: 40 ms per request.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
            sock.listen(2048)
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on {host}:{port} for HTTP ({e.strerror or e})") from None
        tls: dict[str, Any] = {}
        if security.tls:
            tls = dict(ssl_certfile=str(security.tls_cert), ssl_keyfile=str(security.tls_key))
            if security.tls_client_ca is not None:
                tls.update(ssl_ca_certs=str(security.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        protocol = type("H11", (_H11,), {"header_timeout": self.connection.header_timeout})
        config = uvicorn.Config(self.app(), lifespan="off", log_config=None, access_log=False, server_header=False,
                                timeout_graceful_shutdown=5, http=protocol,
                                timeout_keep_alive=self.connection.keep_alive, **tls)
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # uvicorn reports no event for it
            if self._task.done():
                self._task.result()
                raise OSError(f"the HTTP listener on {host}:{port} did not start")
            await asyncio.sleep(0.005)
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Close the port; open connections get up to uvicorn's graceful timeout to finish."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._server = self._task = None

    # ------------------------------------------------------------------------------- requests
    def open(self, handler: Handler) -> Handler:
        """A route without authentication (health checks: load balancers carry no token)."""
        async def route(request: Request) -> Response:
            response = await handler(request)
            self.state.metrics.http_request(handler.__name__, response.status_code)
            return response

        return route

    def guarded(self, handler: Handler, on_error: Callable[[RequestError], Response]) -> Handler:
        """A route that needs a token; every RequestError becomes `on_error`'s response."""
        async def route(request: Request) -> Response:
            t0 = time.perf_counter()
            request.state.logged = False
            try:
                self.authenticate(request)
                response = await handler(request)
            except Exception as caught:
                response = self._failed(request, caught, on_error, t0)
            self.body_bytes -= getattr(request.state, "body_bytes", 0)  # `read_body`'s reservation
            self.state.metrics.http_request(handler.__name__, response.status_code)
            return response

        return route

    def _failed(self, request: Request, caught: Exception, on_error: Callable[[RequestError], Response],
                t0: float) -> Response:
        """The answer to a route that raised: a RequestError in its protocol's shape; a client that left
        while sending as 499 (logged at INFO: not our failure); anything else is a bug of ours, logged
        with a request id that the 500 carries instead of the exception. The path is the routed one
        (`request.url` drops the newline of a `%0A`), escaped."""
        if isinstance(caught, RequestError):
            e = caught
        elif isinstance(caught, ClientDisconnect):
            e = errors.cancelled("the client disconnected while sending the request")
        else:
            request_id = uuid.uuid4().hex[:16]
            log.exception("http %s %s failed (request id %s)", printable(request.method),
                          printable(request.scope["path"]), request_id)
            e = errors.internal_answer(request_id)
        response = on_error(e)
        if e.code == "UNAUTHENTICATED":
            response.headers["WWW-Authenticate"] = "Bearer"
        if not request.state.logged:  # inference.infer logged the others
            log.info("http %s %s peer=%s status=%d error=%r total_ms=%.1f", printable(request.method),
                     printable(request.scope["path"]), printable(self.peer(request)), response.status_code,
                     e.message[:200], (time.perf_counter() - t0) * 1e3)
        return response

    def authenticate(self, request: Request) -> None:
        if self.tokens is None:
            return
        token = bearer(request.headers.items())
        if token is None:
            raise errors.unauthenticated("this server needs a bearer token: send the header "
                                         "'Authorization: Bearer <token>'")
        if not self.tokens.accepts(token):
            raise errors.unauthenticated("the bearer token is not accepted by this server")

    async def read_body(self, request: Request) -> bytearray:
        """The whole body, refused as soon as it passes the size limit (413), stalls (408) or would
        take the bodies held by all requests past --max-body-memory-mb (429): never buffered beyond
        them. Its bytes count against that budget until the route returns (`guarded`)."""
        limit = self.max_body_bytes
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise errors.invalid(f"header Content-Encoding: {encoding[:20]!r} is not supported; send the body "
                                 "uncompressed")
        length = request.headers.get("content-length", "")
        declared = int(length) if length.isascii() and length.isdigit() else None
        if declared is not None and declared > limit:
            raise errors.too_large(f"the request body is {declared} bytes, more than this server's limit of "
                                   f"{limit} bytes (--max-message-mb)")
        self._reserve(request, declared or 0)
        body = bytearray()
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), self.connection.body_timeout)
            except StopAsyncIteration:
                return body
            except asyncio.TimeoutError:
                raise errors.request_timeout(f"the request body stalled for {self.connection.body_timeout:g} s "
                                             "(--body-timeout)") from None
            if len(body) + len(chunk) > limit:
                raise errors.too_large(f"the request body is more than this server's limit of {limit} bytes "
                                       "(--max-message-mb)")
            self._reserve(request, len(body) + len(chunk))
            body += chunk

    def _reserve(self, request: Request, size: int) -> None:
        """Count `size` bytes of this request's body (what it already counted included) against the
        budget of all bodies held at once; 429 past it."""
        held = getattr(request.state, "body_bytes", 0)
        if size <= held:
            return
        budget = self.connection.max_body_memory
        if self.body_bytes + size - held > budget:
            raise errors.exhausted(f"server busy: {self.body_bytes} bytes of request bodies held, and this one "
                                   f"would pass the limit of {budget} (--max-body-memory-mb); retry later")
        self.body_bytes += size - held
        request.state.body_bytes = size

    async def until_disconnect(self, request: Request, work: Awaitable[Any]) -> Any:
        """Await `work` (an inference, whose body has been read); if the client disconnects first,
        cancel it (inference.infer then stops the generation at its next token or step)."""
        request.state.logged = True
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RequestError):
                await task
            return Response(status_code=499)  # nobody reads it
        return task.result()

    @staticmethod
    def peer(request: Request) -> str:
        client = request.client
        return f"http:{client.host}:{client.port}" if client else "http:unknown"
