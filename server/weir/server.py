"""Assembling and running the data plane: settings -> repository -> data plane -> gRPC server.

``WeirServer`` has an explicit ``start()`` / ``stop()``; tests run it in-process on port 0 and the
CLI runs it until SIGTERM.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, Counter, start_http_server

from weir.backends.optimization import AccuracyCollector
from weir.cache import CacheMetrics, LocalResponseCache, RedisResponseCache, ResponseCache
from weir.dataplane import DataPlane
from weir.enrichment import Enricher, FreshnessCollector
from weir.errors import WeirError
from weir.follower import SERVED_MARKER, ControlPlaneFollower, FollowerSettings, default_replica_id
from weir.grpc_service import InferenceServicer, generic_handler
from weir.metrics import Metrics
from weir.monitoring import RecordBuffer, RecordCollector
from weir.repository import ModelRepository
from weir.routing import SEPARATOR
from weir.settings import ControlMode, ServerSettings, control_plane_addresses
from weir.shadow import ShadowCollector, ShadowMirror
from weir_proto.auth import AuthInterceptor, Role, TokenTable
from weir_proto.feature_definitions import load_definitions
from weir_proto.inference import pool
from weir_proto.listen import bind_grpc, listen_http
from weir_proto.online_store import open_online_store
from weir_proto.tls import ClientTLS, server_tls

log = logging.getLogger(__name__)


def set_torch_threads(count: int) -> None:
    """Runs in each compute thread as it starts. torch's intra-op thread count (OpenMP's) is kept per
    thread: set only on the main thread, a compute thread would still start as many OpenMP threads
    as the process saw CPUs at start-up, e.g. two spinning on the one CPU a server is pinned to
    (a 60x slower model, measured)."""
    import torch

    torch.set_num_threads(count)


HEALTH_SERVICE_NAMES = ("", pool.SERVICE_NAME)
COMPUTE_THREAD_PREFIX = "weir-compute"
RETIRED_STORE_SECONDS = 10.0  # a replaced online store stays open this long for reads in flight
# After the grace period: how long calls cut short get to send their UNAVAILABLE, and how long the
# clean-up steps (shadows, feature stores, models, caches) may take together. Exit is bounded by the
# grace period + these (+ 1 s the CLI gives idle compute threads to end).
CUT_SHORT_FLUSH_SECONDS = 1.0
CLEANUP_SECONDS = 2.0

# glibc keeps the memory of freed large buffers (a 64 MiB request's copies) for reuse: measured, 4
# concurrent 64 MiB requests left ~280 MiB resident that malloc_trim(0) gave back. So once large bodies
# (>= 1 MiB) have added up to TRIM_AFTER_BYTES, memory is trimmed in a thread once none has come for
# TRIM_DELAY_SECONDS (those requests are done by then).
TRIM_AFTER_BYTES = 64 * 1024 * 1024
TRIM_DELAY_SECONDS = 2.0

# The data plane's role table (README): the least role each RPC of the inference service needs when
# tokens are configured. None: open, like inference, unless --require-inference-token (then viewer).
# RepositoryIndex lists every model of the repository, loaded or not: a viewer's. Load/unload change
# what serves: a deployer's. ModelMetadata/ModelConfig/ModelStatistics stay with inference: clients
# such as perf_analyzer call them before inferring.
DATA_PLANE_ROLES: dict[str, Role | None] = {
    "ServerLive": None,
    "ServerReady": None,
    "ModelReady": None,
    "ServerMetadata": None,
    "ModelMetadata": None,
    "ModelConfig": None,
    "ModelStatistics": None,
    "ModelInfer": None,
    "ModelStreamInfer": None,
    "RepositoryIndex": Role.VIEWER,
    "RepositoryModelLoad": Role.DEPLOYER,
    "RepositoryModelUnload": Role.DEPLOYER,
}


def _enricher(settings: ServerSettings) -> Enricher | None:
    if not settings.feature_definitions:
        return None
    definitions_file = Path(settings.feature_definitions)
    store, name = open_online_store(settings.online_store or str(definitions_file.parent / "online.db"))
    return Enricher(load_definitions(definitions_file), store, name)


def data_plane_policy(require_inference_token: bool) -> Callable[[str], Role | None]:
    """With tokens configured: ``DATA_PLANE_ROLES``; the open methods need any token if asked. A
    method the table does not name (a newer client's) needs the highest role: closed by default."""

    def policy(method: str) -> Role | None:
        service, _, name = method.lstrip("/").partition("/")
        if service != pool.SERVICE_NAME:
            return None  # health, reflection
        least = DATA_PLANE_ROLES.get(name, Role.ADMIN)
        if least is None and require_inference_token:
            return Role.VIEWER
        return least

    return policy


def is_loopback(address: str) -> bool:
    """Whether a listen address is reachable from this host only ('localhost', 127.0.0.0/8, ::1)."""
    host = address.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class WeirServer:
    def __init__(
        self, settings: ServerSettings, registry: CollectorRegistry | None = None, reuse_port: bool = False
    ) -> None:
        self.settings = settings
        self._reuse_port = reuse_port
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics.create(self.registry)
        threads = settings.torch_intra_op_threads
        self._executor = ThreadPoolExecutor(
            settings.compute_threads,
            thread_name_prefix=COMPUTE_THREAD_PREFIX,
            initializer=functools.partial(set_torch_threads, threads) if threads else None,
        )
        self.repository = ModelRepository(settings.model_repository, self._executor, self.metrics)
        self.response_cache = _response_cache(settings, self.registry)
        self.shadows = ShadowMirror(
            self.repository, settings.max_tensor_elements, max_bytes_elements=settings.max_bytes_elements
        )
        self.registry.register(ShadowCollector(self.shadows))
        self.registry.register(AccuracyCollector(self.repository.accuracy_reports))
        self.enricher = _enricher(settings)
        self._retired_enrichers: set[Enricher] = set()
        self._background: set[asyncio.Future[None]] = set()
        self.registry.register(FreshnessCollector(lambda: self.enricher))
        # sampled requests for drift monitoring: only a follower has somewhere to send them
        self.records = RecordBuffer() if settings.control_plane else None
        if self.records is not None:
            self.registry.register(RecordCollector(self.records))
        self.dataplane = DataPlane(
            self.repository,
            self.metrics,
            settings.max_tensor_elements,
            self.response_cache,
            shadows=self.shadows,
            enricher=self.enricher,
            records=self.records,
            max_bytes_elements=settings.max_bytes_elements,
        )
        self._health = health.aio.HealthServicer()
        self.tokens = TokenTable.load(Path(settings.tokens_file) if settings.tokens_file else None)
        if settings.require_inference_token and self.tokens is None:
            raise ValueError(
                "setting require_inference_token: expected tokens (--tokens-file or WEIR_TOKENS), got none"
            )
        if (
            settings.model_control_mode is ControlMode.EXPLICIT
            and self.tokens is None
            and not is_loopback(settings.listen_address)
            and not settings.allow_anonymous_model_control
        ):
            raise ValueError(
                f"setting model_control_mode: explicit model control on {settings.listen_address} (beyond loopback) "
                "lets anyone who reaches the port load and unload models; expected tokens (--tokens-file or "
                "WEIR_TOKENS; load/unload then need the deployer role), a loopback --listen-address, or "
                "--allow-anonymous-model-control true, got none of them"
            )
        self.follower: ControlPlaneFollower | None = None
        self._follower_task: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http: WSGIServer | None = None
        self._accepting = False
        self._servicer: InferenceServicer | None = None
        self._trimmer = MemoryTrimmer(self.metrics.transport.memory_trims)
        self.grpc_port = 0
        self.metrics_port: int | None = None

    def is_ready(self) -> bool:
        return self._accepting and self.repository.all_ready()

    async def start(self) -> None:
        """Listen first (live, not ready), then load models, then report ready."""
        settings = self.settings
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # gRPC inflates a compressed message completely before comparing it with the limit above
            # (a 1 MB gzip body became 1000 MiB): the servicer's decoder inflates within the limit instead.
            ("grpc.per_message_decompression", 0),
            # Two servers silently sharing a port would split traffic between them: refuse, unless
            # sharing is the point (the workers of `weir serve --workers N`).
            ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            # Clients that keep idle connections alive with pings are welcome every 10 s.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        interceptors = []
        if self.tokens is not None:
            interceptors.append(AuthInterceptor(self.tokens, data_plane_policy(settings.require_inference_token)))
        server = grpc.aio.server(options=options, interceptors=interceptors)
        servicer = InferenceServicer(
            self.dataplane,
            self.repository,
            explicit_model_control=settings.model_control_mode is ControlMode.EXPLICIT,
            is_ready=self.is_ready,
            on_repository_change=self.refresh_health,
            tokens=self.tokens,
            transport=self.metrics.transport,
            stream_backlog_bytes=settings.stream_backlog_bytes,
            managed_by_control_plane=self.managed_by_control_plane,
        )
        self._servicer = servicer
        server.add_generic_rpc_handlers(
            (generic_handler(servicer, settings.max_message_bytes, self._trimmer.note_large_body),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        # Reflection reads one pool: give it health and reflection too, so grpcurl sees every service.
        pool.add_file_to_pool(health_pb2.DESCRIPTOR)
        pool.add_file_to_pool(reflection_pb2.DESCRIPTOR)
        reflection_names = (pool.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(reflection_names, server, pool=pool.POOL)
        tls = server_tls(
            Path(settings.tls_cert) if settings.tls_cert else None,
            Path(settings.tls_key) if settings.tls_key else None,
            Path(settings.tls_client_ca) if settings.tls_client_ca else None,
        )
        self.grpc_port = bind_grpc(
            server, settings.listen_address, settings.grpc_port, tls.credentials() if tls else None,
            "the data plane's gRPC port, --grpc-port", reuse_port=self._reuse_port,
        )  # fmt: skip
        await server.start()
        self._server = server
        self._trimmer.start()
        self._accepting = True
        for name in HEALTH_SERVICE_NAMES:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if settings.metrics_port >= 0:
            self._metrics_http, _ = listen_http(
                lambda: start_http_server(settings.metrics_port, settings.listen_address, self.registry),
                settings.listen_address, settings.metrics_port, "the data plane's /metrics port, --metrics-port",
            )  # fmt: skip
            self.metrics_port = self._metrics_http.server_port
        log.info(
            "listening",
            extra={"grpc_port": self.grpc_port, "metrics_port": self.metrics_port, "address": settings.listen_address},
        )
        await self._load_initial_models()
        await self.refresh_health()
        log.info("server started", extra={"grpc_port": self.grpc_port, "metrics_port": self.metrics_port})

    async def _load_initial_models(self) -> None:
        settings = self.settings
        if settings.control_plane:
            await self._follow_control_plane()
            return
        if settings.model_control_mode is ControlMode.NONE or "*" in settings.load_model:
            await self.repository.load_all()
            return
        for name in settings.load_model:
            try:
                await self.repository.load(name)
            except Exception as error:
                log.error("model failed to load", extra={"model": name, "reason": str(error)})

    async def _follow_control_plane(self) -> None:
        settings = self.settings
        tls = None
        if settings.control_plane_tls_ca or settings.control_plane_tls_cert:
            tls = ClientTLS(
                ca=Path(settings.control_plane_tls_ca) if settings.control_plane_tls_ca else None,
                cert=Path(settings.control_plane_tls_cert) if settings.control_plane_tls_cert else None,
                key=Path(settings.control_plane_tls_key) if settings.control_plane_tls_key else None,
            )
        follower_settings = FollowerSettings(
            addresses=control_plane_addresses(settings.control_plane),
            token=settings.control_plane_token or None,
            replica_id=settings.replica_id or default_replica_id(),
            serving_address=f"{_host(settings.listen_address)}:{self.grpc_port}",
            heartbeat_seconds=settings.heartbeat_seconds,
            tls=tls,
        )
        settings.model_repository.mkdir(parents=True, exist_ok=True)
        self.follower = ControlPlaneFollower(
            follower_settings,
            self.repository,
            self.dataplane.router,
            settings.model_repository,
            self.refresh_health,
            shadows=self.shadows,
            on_features=self.use_features,
            records=self.records,
            element_names=self._element_names,
        )
        await self.follower.load_last_known_good()
        self._follower_task = asyncio.create_task(self.follower.run(), name="weir-control-plane-follower")

    def managed_by_control_plane(self, model: str) -> bool:
        """Following a control plane, the repository directory is its: a variant's model
        (endpoint@variant), an endpoint, or a directory it installed is not a deployer's to change here."""
        if not self.settings.control_plane:
            return False
        return (
            SEPARATOR in model
            or self.dataplane.router.get(model) is not None
            or (self.settings.model_repository / model / SERVED_MARKER).is_file()
        )

    def _element_names(self, model: str, tensor: str) -> list[str] | None:
        """An enriched input's elements are its feature service's features: records name them so."""
        enricher = self.enricher
        try:
            loaded = self.repository.resolve(model, "")
        except WeirError:
            return None
        spec = loaded.enrichment
        if enricher is None or spec is None or spec.feature_input != tensor:
            return None
        try:
            return enricher.feature_names(spec.service)
        except WeirError:
            return None

    def use_features(self, definitions_toml: str, online_store: str) -> None:
        """Feature definitions from the control plane: enrichment switches to them at once."""
        import tomllib

        from weir_proto.feature_definitions import parse_definitions

        definitions = parse_definitions(tomllib.loads(definitions_toml), "control plane feature definitions")
        store, name = open_online_store(online_store or str(self.settings.model_repository / ".online.db"))
        previous, self.enricher = self.enricher, Enricher(definitions, store, name)
        self.dataplane.enricher = self.enricher
        if previous is not None:
            # reads already started on the previous store finish first; then its connections close
            self._retired_enrichers.add(previous)
            asyncio.get_running_loop().call_later(RETIRED_STORE_SECONDS, self._close_retired, previous)

    def _close_retired(self, enricher: Enricher) -> None:
        if enricher in self._retired_enrichers:
            self._retired_enrichers.discard(enricher)
            self._background.add(task := asyncio.ensure_future(enricher.aclose()))
            task.add_done_callback(self._background.discard)

    async def refresh_health(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if self.is_ready() else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICE_NAMES:
            await self._health.set(name, status)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stop within the grace period plus a few seconds, whatever runs: new calls answer UNAVAILABLE
        at once; calls in flight get the grace period to finish, then answer UNAVAILABLE; clean-up
        steps are bounded, and a computation still running in a compute thread is left behind (the
        CLI exits without waiting for it)."""
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        grace_ends = time.monotonic() + grace
        self._accepting = False
        if self._servicer is not None:
            self._servicer.gate.close()
        await self._health.enter_graceful_shutdown()
        if self._follower_task is not None:
            self._follower_task.cancel()
            await _bounded(
                "control-plane follower", asyncio.gather(self._follower_task, return_exceptions=True), grace_ends
            )
            self._follower_task = None
        if self._servicer is not None and not await self._servicer.gate.drained(grace_ends - time.monotonic()):
            cut_short = self._servicer.gate.expire()
            log.warning("grace period over: calls still running are answered UNAVAILABLE", extra={"calls": cut_short})
            await self._servicer.gate.drained(CUT_SHORT_FLUSH_SECONDS)
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        await self._trimmer.aclose()
        cleanup_ends = time.monotonic() + CLEANUP_SECONDS
        await _bounded("shadow mirrors", self.shadows.drain(), cleanup_ends)
        for enricher in [*self._retired_enrichers, *([self.enricher] if self.enricher else [])]:
            await _bounded("feature store", enricher.aclose(), cleanup_ends)
        self._retired_enrichers.clear()
        await _bounded("models", self.repository.aclose(), cleanup_ends)
        await _bounded("response cache", self.response_cache.aclose(), cleanup_ends)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        log.info("server stopped")


class MemoryTrimmer:
    """Gives freed memory back to the system (glibc's ``malloc_trim``) after large requests, off the
    request path: a background task, due once large bodies add up to ``TRIM_AFTER_BYTES``, trims when
    no large body has come for ``TRIM_DELAY_SECONDS`` (their requests are done by then, or nearly)."""

    def __init__(self, trims: Counter | None = None) -> None:
        self._trim = _malloc_trim()
        self._trims = trims
        self._large_bytes = 0  # since the last trim
        self._large_bodies = 0  # ever: tells a quiet delay from a busy one
        self._due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def note_large_body(self, size: int) -> None:
        self._large_bodies += 1
        self._large_bytes += size
        if self._large_bytes >= TRIM_AFTER_BYTES:
            self._due.set()

    def start(self) -> None:
        if self._trim is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="weir-memory-trim")

    async def _run(self) -> None:
        assert self._trim is not None
        while True:
            await self._due.wait()
            while True:
                seen = self._large_bodies
                await asyncio.sleep(TRIM_DELAY_SECONDS)
                if self._large_bodies == seen:
                    break
            self._due.clear()
            self._large_bytes = 0
            await asyncio.to_thread(self._trim)
            if self._trims is not None:
                self._trims.inc()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return functools.partial(trim, 0)


async def _bounded(step: str, work: Awaitable[object], until: float) -> None:
    """One step of shutdown, given until the monotonic time ``until`` (at least a moment, so a quick
    step still runs): a step waiting on a computation must not hold the exit."""
    try:
        await asyncio.wait_for(work, max(until - time.monotonic(), 0.1))
    except TimeoutError:
        log.warning("shutdown step left unfinished", extra={"step": step})


def _response_cache(settings: ServerSettings, registry: CollectorRegistry) -> ResponseCache:
    metrics = CacheMetrics.create(registry)
    redis = None
    if settings.redis_url:
        redis = RedisResponseCache(
            settings.redis_url, settings.redis_ttl_seconds, settings.redis_timeout_ms / 1000, metrics
        )
    return ResponseCache(LocalResponseCache(settings.response_cache_bytes, metrics), redis)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
