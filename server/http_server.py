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
from typing import Any, Awaitable, Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from glm_image_onnx.server import errors
from glm_image_onnx.server.errors import RequestError
from glm_image_onnx.server.security import SecurityConfig, TokenStore, bearer
from glm_image_onnx.server.dataplane import DataPlane

log = logging.getLogger("glm_image_onnx.server")
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines repeat ours

Handler = Callable[[Request], Awaitable[Response]]


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM / SIGINT belong to GlmImageServer.run (drain)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFrontEnd:
    def __init__(self, plane: DataPlane, tokens: TokenStore | None, max_body_bytes: int, max_tensor_elements: int):
        self.plane = plane
        self.state = plane.state
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.max_tensor_elements = max_tensor_elements
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
        config = uvicorn.Config(self.app(), lifespan="off", log_config=None, access_log=False, server_header=False,
                                timeout_graceful_shutdown=5, **tls)
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
                e = caught if isinstance(caught, RequestError) else None
                if e is None:  # a bug here still answers in the protocol's shape, and is logged
                    log.exception("http %s %s failed", request.method, request.url.path)
                    e = errors.internal(f"internal error: {type(caught).__name__}: {caught}")
                response = on_error(e)
                if e.code == "UNAUTHENTICATED":
                    response.headers["WWW-Authenticate"] = "Bearer"
                if not request.state.logged:  # inference.infer logged the others
                    log.info("http %s %s peer=%s status=%d error=%r total_ms=%.1f", request.method,
                             request.url.path, self.peer(request), response.status_code, e.message[:200],
                             (time.perf_counter() - t0) * 1e3)
            self.state.metrics.http_request(handler.__name__, response.status_code)
            return response

        return route

    def authenticate(self, request: Request) -> None:
        if self.tokens is None:
            return
        token = bearer(request.headers.items())
        if token is None:
            raise errors.unauthenticated("this server needs a bearer token: send the header "
                                         "'Authorization: Bearer <token>'")
        if not self.tokens.accepts(token):
            raise errors.unauthenticated("the bearer token is not accepted by this server")

    async def read_body(self, request: Request) -> bytes:
        """The whole body, refused (413) as soon as it passes the limit: never buffered beyond it."""
        limit = self.max_body_bytes
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise errors.invalid(f"header Content-Encoding: {encoding[:20]} is not supported; send the body "
                                 "uncompressed")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise errors.too_large(f"the request body is {int(length)} bytes, more than this server's limit of "
                                   f"{limit} bytes (--max-message-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise errors.too_large(f"the request body is more than this server's limit of {limit} bytes "
                                       "(--max-message-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

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
