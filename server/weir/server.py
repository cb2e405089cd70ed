"""Assembling and running the data plane: settings -> repository -> data plane -> gRPC server.

``WeirServer`` has an explicit ``start()`` / ``stop()``; tests run it in-process on port 0 and the
CLI runs it until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

from weir.backends.optimization import AccuracyCollector
from weir.cache import CacheMetrics, LocalResponseCache, RedisResponseCache, ResponseCache
from weir.dataplane import DataPlane
from weir.enrichment import Enricher, FreshnessCollector
from weir.errors import WeirError
from weir.follower import ControlPlaneFollower, FollowerSettings, default_replica_id
from weir.grpc_service import InferenceServicer, generic_handler
from weir.metrics import Metrics
from weir.monitoring import RecordBuffer, RecordCollector
from weir.repository import ModelRepository
from weir.settings import ControlMode, ServerSettings
from weir.shadow import ShadowCollector, ShadowMirror
from weir_proto.auth import AuthInterceptor, Role, TokenTable
from weir_proto.feature_definitions import load_definitions
from weir_proto.inference import pool
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
_REPOSITORY_CHANGES = ("RepositoryModelLoad", "RepositoryModelUnload")
RETIRED_STORE_SECONDS = 10.0  # a replaced online store stays open this long for reads in flight


def _enricher(settings: ServerSettings) -> Enricher | None:
    if not settings.feature_definitions:
        return None
    definitions_file = Path(settings.feature_definitions)
    store, name = open_online_store(settings.online_store or str(definitions_file.parent / "online.db"))
    return Enricher(load_definitions(definitions_file), store, name)


def data_plane_policy(require_inference_token: bool) -> Callable[[str], Role | None]:
    """With tokens configured: load/unload need a deployer; inference needs any token if asked."""

    def policy(method: str) -> Role | None:
        service, _, name = method.lstrip("/").partition("/")
        if service != pool.SERVICE_NAME:
            return None  # health, reflection
        if name in _REPOSITORY_CHANGES:
            return Role.DEPLOYER
        return Role.VIEWER if require_inference_token else None

    return policy


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
            thread_name_prefix="weir-compute",
            initializer=functools.partial(set_torch_threads, threads) if threads else None,
        )
        self.repository = ModelRepository(settings.model_repository, self._executor, self.metrics)
        self.response_cache = _response_cache(settings, self.registry)
        self.shadows = ShadowMirror(self.repository, settings.max_tensor_elements)
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
        )
        self._health = health.aio.HealthServicer()
        self.tokens = TokenTable.load(Path(settings.tokens_file) if settings.tokens_file else None)
        if settings.require_inference_token and self.tokens is None:
            raise ValueError(
                "setting require_inference_token: expected tokens (--tokens-file or WEIR_TOKENS), got none"
            )
        self.follower: ControlPlaneFollower | None = None
        self._follower_task: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http: WSGIServer | None = None
        self._accepting = False
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
        )
        server.add_generic_rpc_handlers((generic_handler(servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        # Reflection reads one pool: give it health and reflection too, so grpcurl sees every service.
        pool.add_file_to_pool(health_pb2.DESCRIPTOR)
        pool.add_file_to_pool(reflection_pb2.DESCRIPTOR)
        reflection_names = (pool.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(reflection_names, server, pool=pool.POOL)
        address = f"{_host(settings.listen_address)}:{settings.grpc_port}"
        tls = server_tls(
            Path(settings.tls_cert) if settings.tls_cert else None,
            Path(settings.tls_key) if settings.tls_key else None,
            Path(settings.tls_client_ca) if settings.tls_client_ca else None,
        )
        self.grpc_port = (
            server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
        )
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC on {settings.listen_address}:{settings.grpc_port}")
        await server.start()
        self._server = server
        self._accepting = True
        for name in HEALTH_SERVICE_NAMES:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if settings.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(settings.metrics_port, settings.listen_address, self.registry)
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
            address=settings.control_plane,
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
        """Stop accepting, let in-flight requests finish within the grace period, release models."""
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._accepting = False
        if self._follower_task is not None:
            self._follower_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower_task
            self._follower_task = None
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.shadows.drain()
        for enricher in [*self._retired_enrichers, *([self.enricher] if self.enricher else [])]:
            await enricher.aclose()
        self._retired_enrichers.clear()
        await self.repository.aclose()
        await self.response_cache.aclose()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        log.info("server stopped")


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
