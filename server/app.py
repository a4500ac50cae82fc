"""The server process: gRPC (KServe v2 + grpc.health.v1 + reflection), optionally HTTP (KServe v2
REST + the OpenAI Images API, `http_server`) on the same models, model loading, shutdown.

Lifecycle: the port opens first with health NOT_SERVING and ServerReady false while the package
loads on a thread (a multi-GB package takes minutes); then SERVING. SIGTERM / SIGINT drain: health
goes NOT_SERVING, new inference requests get UNAVAILABLE (HTTP 503), admitted ones finish (up to
`drain_timeout_s`), then the ports close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2, service_pb2_grpc

from glm_image_onnx.manifest import Graph
from glm_image_onnx.server import errors
from glm_image_onnx.runtime.ar_batch import ArBatching
from glm_image_onnx.server.envelope import RequestBounds, envelope
from glm_image_onnx.server.admission import Admission
from glm_image_onnx.server.glm_image_model import GlmImageModel
from glm_image_onnx.server.glm_image_request import MAX_SOURCE_IMAGES
from glm_image_onnx.server.http_server import HttpFrontEnd
from glm_image_onnx.server.dataplane import DataPlane
from glm_image_onnx.server.kserve import ErrorInterceptor, InferenceService
from glm_image_onnx.server.limits import ComponentLimits, ConnectionLimits, Limits
from glm_image_onnx.server import memory
from glm_image_onnx.server.memory import MemoryBudget
from glm_image_onnx.server.metrics import Metrics
from glm_image_onnx.server.models import BatchingOptions, ComponentModel, Model
from glm_image_onnx.server.security import SecurityConfig, TokenStore, auth_interceptor, exposure_warnings
from glm_image_onnx.server.state import DRAINING, FAILED, LOADING, READY, STOPPED, ServerState
from glm_image_onnx.server.tensors import NUMPY, datatype_of

log = logging.getLogger("glm_image_onnx.server")

INFERENCE_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass
class ServerConfig:
    package: Path
    host: str = "127.0.0.1"
    port: int = 8001  # 0 picks a free port
    http_port: int | None = None  # KServe v2 REST + OpenAI Images API beside gRPC (0: a free port)
    provider: str = "cpu"
    provider_options: dict[str, Any] = field(default_factory=dict)
    strict: bool = False
    threads: int | None = None
    verify_files: bool | str = True  # "cached" (True), "full" or "off" (False): runtime.package
    vae_tiling: str = "auto"  # "auto" | "on" | "off": see GlmImageOnnxPipeline.from_package
    vae_tile_size: int | None = None
    max_concurrency: int = 1
    max_queue: int = 64
    max_batch_size: int = 8
    max_queue_delay_us: int = 0
    ar_batching: ArBatching = field(default_factory=ArBatching)  # glm_image generations share AR steps
    components: bool = True  # serve every graph of the package as a plain model too
    metrics_port: int | None = None
    limits: Limits = field(default_factory=Limits)
    max_message_bytes: int = 256 << 20
    drain_timeout_s: float = 60.0
    security: SecurityConfig = field(default_factory=SecurityConfig)
    component_limits: ComponentLimits = field(default_factory=ComponentLimits)
    connection: ConnectionLimits = field(default_factory=ConnectionLimits)  # HTTP timeouts and body memory
    max_memory: int | None = None  # bytes for the process (server.memory); None: 90% of the machine's; 0: no budget


def load_models(config: ServerConfig, metrics: Metrics) -> dict[str, Model]:
    from glm_image_onnx.runtime import GlmImageOnnxPipeline
    from glm_image_onnx.runtime.providers import create_session

    pipeline = GlmImageOnnxPipeline.from_package(config.package, provider=config.provider,
                                                 provider_options=config.provider_options, strict=config.strict,
                                                 verify_files=config.verify_files, threads=config.threads,
                                                 vae_tiling=config.vae_tiling,
                                                 vae_tile_size=config.vae_tile_size,
                                                 ar_batching=config.ar_batching)
    glm_image = GlmImageModel(pipeline, config.limits, metrics)
    models: dict[str, Model] = {"glm_image": glm_image}
    if config.components:
        lim = glm_image.limits
        bounds = envelope(pipeline, RequestBounds(lim.max_side, lim.max_pixels, lim.max_prompt_bytes, MAX_SOURCE_IMAGES))
        batching = BatchingOptions(config.max_batch_size, config.max_queue_delay_us)
        for name, graph in pipeline.package.graphs.items():
            why = not_carried(graph)
            if why:  # glm_image still runs the graph; only its KServe model is left out
                log.warning("%s: not served as a component model: %s", name, why)
                continue
            session = pipeline.sessions.get(name) or create_session(pipeline.package.graph_path(name),
                                                                    pipeline.provider, config.threads)
            models[name] = ComponentModel(name, graph, session, batching, on_execution=metrics.execution,
                                          limits=config.component_limits, bounds=bounds.get(name))
    return models


def memory_budget(config: ServerConfig, models: dict[str, Model]) -> MemoryBudget | None:
    """Measure what requests cost (server.memory) and the budget left for them; None when off."""
    if config.max_memory == 0:
        return None
    why = memory.measurable()
    if why:
        log.warning("no memory budget: %s", why)
        return None
    glm = models["glm_image"]
    grid, side = glm.limits.grid.factor, glm.limits.max_side
    sides = (max(grid, side // 4 // grid * grid), max(2 * grid, side // 2 // grid * grid))
    costs = memory.probe(glm.pipeline, sides)
    glm.cost, glm.ar_cost = costs.glm_image, costs.graphs.get("ar_planner")
    for name, model in models.items():
        model.cost = costs.graphs.get(name, model.cost)
    total = config.max_memory or int(0.9 * memory.machine_memory())
    budget = MemoryBudget(total, memory.resident_bytes())
    if budget.capacity <= 0:
        raise LoadError(f"--max-memory {total >> 20} MiB is less than the {budget.baseline >> 20} MiB the loaded "
                        "package already holds")
    log.info("memory budget: %d MiB for requests (--max-memory %d MiB less %d MiB loaded); a %dx%d image takes "
             "about %d MiB", budget.capacity >> 20, total >> 20, budget.baseline >> 20, side, side,
             glm.cost(side * side) >> 20)
    return budget


def not_carried(graph: Graph) -> str | None:
    """Why a graph cannot be a KServe model of this server (tensors numpy cannot hold), or None."""
    odd = [t for t in graph.inputs + graph.outputs if datatype_of(t.dtype) not in NUMPY]
    if not odd:
        return None
    return (f"{', '.join(t.name for t in odd[:2])}{', ...' if len(odd) > 2 else ''} are "
            f"{odd[0].dtype}, which this "
            "server does not carry over KServe (no numpy type); glm_image runs it, Triton (triton-repo) serves it")


class LoadError(RuntimeError):
    """The package could not be loaded for a reason other than its manifest or checksums."""


class GlmImageServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        admission = Admission(config.max_concurrency, config.max_queue, on_change=self.metrics.in_flight.set)
        self.state = ServerState(admission, self.metrics)
        self.plane = DataPlane(self.state)  # what both KServe front ends answer from
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.tokens: TokenStore | None = None
        self.metrics_port: int | None = None
        self.http: HttpFrontEnd | None = None
        self.http_port: int | None = None
        self._stopped = asyncio.Event()

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, status)
        self.metrics.ready.set(1 if serving else 0)

    async def start(self) -> int:
        """Open the port (health NOT_SERVING until `load` finishes); returns the bound port."""
        config = self.config
        size = config.max_message_bytes
        security = self.config.security
        security.check()
        credentials = security.server_credentials() if security.tls else None
        interceptors = []
        if security.token_file is not None:
            self.tokens = TokenStore(security.token_file)
            interceptors.append(auth_interceptor(self.tokens))
        interceptors.append(ErrorInterceptor())  # inside the token check: UNAUTHENTICATED comes first
        for warning in exposure_warnings(self.config.host, security):
            log.warning(warning)
        self.server = grpc.aio.server(interceptors=interceptors, options=[("grpc.max_receive_message_length", size),
                                               ("grpc.max_send_message_length", size),
                                               ("grpc.so_reuseport", 0)],
                                      # each RPC's message is read whole before a handler sees it: bound how
                                      # many are read at once (beyond admission's, a few for health checks)
                                      maximum_concurrent_rpcs=config.max_concurrency + config.max_queue + 16)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(self.plane, config.component_limits.max_tensor_elements), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)
        address = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        try:
            if credentials is not None:
                self.port = self.server.add_secure_port(f"{address}:{self.config.port}", credentials)
            else:
                self.port = self.server.add_insecure_port(f"{address}:{self.config.port}")
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port} (in use, or not an address "
                          "of this host)")
        await self._set_health(False)
        await self.server.start()
        if config.http_port is not None:
            self.http = HttpFrontEnd(self.plane, self.tokens, size, config.component_limits.max_tensor_elements,
                                     config.connection)
            try:
                self.http_port = await self.http.start(config.host, config.http_port, security)
            except BaseException:
                await self.server.stop(None)
                raise
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        mode = ("mutual TLS" if security.tls_client_ca else "TLS") if security.tls else "plaintext"
        auth = f", {len(self.tokens)} bearer token(s)" if self.tokens is not None else ""
        http = "" if self.http_port is None else f"; HTTP on {self.http_port} (KServe v2 REST, OpenAI Images API)"
        log.info("listening on %s:%d (KServe v2 gRPC, %s%s)%s; loading %s", self.config.host, self.port, mode, auth,
                 http, self.config.package)
        return self.port

    async def load(self) -> None:
        from glm_image_onnx.runtime import PackageError, ProviderError

        try:
            models = await asyncio.to_thread(load_models, self.config, self.metrics)
            self.state.admission.memory = await asyncio.to_thread(memory_budget, self.config, models)
        except (PackageError, ProviderError) as e:
            self.state.phase, self.state.reason = FAILED, str(e)
            log.error("loading %s failed: %s", self.config.package, e)
            raise
        except Exception as e:  # a broken graph or tokenizer file, onnxruntime refusing a model, ...
            first = (str(e).strip().splitlines() or [""])[0][:500]
            message = f"cannot load {self.config.package}: {type(e).__name__}: {first}"
            self.state.phase, self.state.reason = FAILED, message
            log.error("%s", message)
            raise LoadError(message) from e
        self.state.models = models
        if self.state.phase == LOADING:
            self.state.phase = READY
            await self._set_health(True)
        log.info("ready: %s; quantization: %s; target: %s",
                 ", ".join(f"{n} (max_batch_size {m.max_batch_size})" for n, m in models.items()),
                 models["glm_image"].quantization, models["glm_image"].target)

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Drain (finish admitted requests, refuse new ones), then close the port."""
        if self.state.phase in (DRAINING, STOPPED):
            await self._stopped.wait()
            return
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.state.phase = DRAINING
        self.state.admission.drain()
        await self._set_health(False)
        in_flight = self.state.admission.in_flight
        log.info("draining: %d request(s) in flight, waiting up to %.0fs", in_flight, timeout)
        drained = await asyncio.to_thread(self.state.admission.wait_idle, timeout)
        if not drained:
            abandoned = self.state.admission.abandon(errors.unavailable(
                "the server shut down before this request finished (its drain timeout passed); retry on another "
                "replica"))
            log.warning("drain timeout: %d request(s) still running are abandoned (answered UNAVAILABLE)", abandoned)
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        if self.server is not None:
            await self.server.stop(grace=2.0)
        for model in self.state.models.values():
            model.close()
        self.state.admission.shutdown()
        self.metrics.close()
        self.state.phase = STOPPED
        self._stopped.set()
        log.info("stopped")

    async def run(self) -> int:
        """Serve until SIGTERM / SIGINT; exit code 0 after a clean drain. A failed load closes the port
        and raises (PackageError: bad manifest or checksum; ProviderError; LoadError). SIGHUP re-reads
        the token file."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        if self.tokens is not None:
            loop.add_signal_handler(signal.SIGHUP, self.tokens.reload)
        loader = asyncio.create_task(self.load())
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({loader, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if loader.done() and loader.exception() is not None:
            waiter.cancel()
            await self.shutdown(0)
            raise loader.exception()
        await waiter
        log.info("signal received: shutting down")
        if not loader.done():
            loader.cancel()
        await self.shutdown()
        return 0


class ServerThread:
    """The real server on its own event loop thread, for tests and benchmarks."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.server: GlmImageServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        assert self.server is not None and self.server.port is not None
        return f"{self.config.host}:{self.server.port}"

    @property
    def http_url(self) -> str:
        assert self.server is not None and self.server.http_port is not None
        scheme = "https" if self.config.security.tls else "http"
        return f"{scheme}://{self.config.host}:{self.server.http_port}"

    def start(self, load: bool = True, timeout_s: float = 300) -> "ServerThread":
        def main() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                self.server = GlmImageServer(self.config)
                self.loop.run_until_complete(self.server.start())
                if load:
                    self.loop.run_until_complete(self.server.load())
            except BaseException as e:  # reported to the caller of start()
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=main, name="glm-image-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"server did not start within {timeout_s}s")
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro, timeout_s: float | None = None) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        if self.loop is None or self.server is None:
            return
        if self.loop.is_running():
            self.call(self.server.shutdown(drain_timeout_s))
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.loop = None
