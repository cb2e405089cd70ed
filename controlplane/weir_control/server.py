"""Assembling and running the control plane: settings -> store + artifacts -> gRPC services.

``ControlPlaneServer`` has an explicit ``start()`` / ``stop()``: tests run it in-process on port 0,
``weir control`` runs it until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from sqlalchemy import select

from weir_control.artifacts import ArtifactStore
from weir_control.attach import DataPlaneSyncService, DesiredStateHub
from weir_control.experiments import ExperimentsService
from weir_control.features.service import FeaturesService
from weir_control.lease import DEFAULT_TTL_SECONDS, LeaseKeeper, check_ttl, default_replica_id
from weir_control.metrics import ControlMetrics, ReplicaCollector
from weir_control.monitoring.monitor import DriftCollector, DriftMonitor
from weir_control.monitoring.service import MonitoringLinks, MonitoringService, run_windows, stop_task
from weir_control.readiness import DatabaseReadiness
from weir_control.replica_reports import ReplicaReports, dead_here
from weir_control.rollouts import RolloutController
from weir_control.services import (
    Auditor,
    AuditService,
    DeploymentsService,
    RefusalLog,
    RegistryService,
    RolloutsService,
)
from weir_control.store import Store, open_store
from weir_control.store.schema import MODEL_VERSIONS
from weir_control.training.runner import JobRunner
from weir_control.training.service import REPORTING_METHODS, TrainingService
from weir_proto.auth import AuthInterceptor, Needs, Role, TokenTable
from weir_proto.control.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    deployments_pb2,
    deployments_pb2_grpc,
    experiments_pb2,
    experiments_pb2_grpc,
    features_pb2,
    features_pb2_grpc,
    monitoring_pb2,
    monitoring_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    rollouts_pb2,
    rollouts_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from weir_proto.errors import InvalidArgumentError, WeirError
from weir_proto.listen import bind_grpc, listen_http
from weir_proto.tls import server_tls

log = logging.getLogger(__name__)
INTERRUPTED = "the upload did not complete: the control plane stopped during it"

SERVICE_NAMES = (
    registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
    deployments_pb2.DESCRIPTOR.services_by_name["Deployments"].full_name,
    deployments_pb2.DESCRIPTOR.services_by_name["DataPlaneSync"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
    rollouts_pb2.DESCRIPTOR.services_by_name["Rollouts"].full_name,
    experiments_pb2.DESCRIPTOR.services_by_name["Experiments"].full_name,
    features_pb2.DESCRIPTOR.services_by_name["Features"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["Training"].full_name,
    monitoring_pb2.DESCRIPTOR.services_by_name["Monitoring"].full_name,
)

_TRAINING = training_pb2.DESCRIPTOR.services_by_name["Training"].full_name

# The least role each control RPC needs; anything not listed under a control service is open
# (health, reflection). Reads are for viewers, changes for deployers.
_MUTATIONS = {
    "CreateRegisteredModel",
    "UpdateRegisteredModel",
    "CreateModelVersion",
    "UpdateModelVersion",
    "SetAlias",
    "DeleteAlias",
    "Deploy",
    "SetTraffic",
    "SetFlag",
    "Undeploy",
    "StartRollout",
    "PauseRollout",
    "ResumeRollout",
    "AbortRollout",
    "PromoteRollout",
    "StartBlueGreen",
    "SwitchBlueGreen",
    "StartABTest",
    "StopABTest",
    "RecordOutcome",
    "RecordOutcomes",
    "ApplyFeatures",
    "Materialize",
    "PushFeatures",
    "SubmitJob",
    "SubmitSweep",
    "CancelJob",
    "SetReference",
    "SetMonitoringPolicy",
    "RecordFeedback",
}


_SYNC = deployments_pb2.DESCRIPTOR.services_by_name["DataPlaneSync"].full_name
_REGISTRY = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
# A data plane's replica token attaches (admins may too: tools and tests) and downloads the
# artifacts it is told to serve; it can do nothing else, not even a viewer's reads.
ATTACH_ROLES = frozenset({Role.REPLICA, Role.ADMIN})
DOWNLOAD_ROLES = frozenset(Role)


def control_policy(method: str) -> Needs:
    service, _, name = method.lstrip("/").partition("/")
    if service not in SERVICE_NAMES:
        return None
    if service == _SYNC:
        return ATTACH_ROLES  # Attach, and any name under the service (answered UNIMPLEMENTED once allowed)
    if service == _REGISTRY and name == "DownloadArtifact":
        return DOWNLOAD_ROLES
    if name == "ApproveRollout":
        return Role.APPROVER
    if service == _TRAINING and name in REPORTING_METHODS:
        return None  # training code reports with its job's own secret, checked by the service
    return Role.DEPLOYER if name in _MUTATIONS else Role.VIEWER


@dataclass(frozen=True)
class ControlSettings:
    state_dir: Path = Path(".weir")  # the SQLite file and the artifact store live here by default
    database_url: str = ""  # empty: SQLite file <state_dir>/control.db; or postgresql+psycopg://...
    artifact_dir: Path | None = None  # default <state_dir>/artifacts
    listen_address: str = "127.0.0.1"
    port: int = 8011
    tokens_file: Path | None = None  # else WEIR_TOKENS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_port: int = -1  # Prometheus /metrics (-1: off, 0: any free port)
    online_store: str = ""  # told to data planes for enrichment (and materialized into): redis:// URL or SQLite file
    feature_root: Path | None = None  # relative feature sources without a base_directory: default <state_dir>/features
    jobs_dir: Path | None = (
        None  # training jobs' directories (code, logs, checkpoints, output): default <state_dir>/jobs
    )
    max_concurrent_jobs: int = 2
    job_user: str = "weir-job"  # OS user training jobs run as when the control plane is root (created if missing)
    # drift webhook destinations the operator allows (HOST[:PORT], ADDRESS[:PORT] or CIDR): none, no webhook
    webhook_allow: tuple[str, ...] = ()
    # Several replicas on one PostgreSQL database: each has its own id; the singleton work (rollout
    # steps, the job queue, drift actions) runs on the holder of a lease of ``lease_seconds``.
    replica_id: str = ""  # default: HOST-PID-RANDOM (unique per process)
    lease_seconds: float = DEFAULT_TTL_SECONDS
    advertise_address: str = ""  # HOST:PORT training jobs reach this replica at (default from listen)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or str(self.state_dir / "control.db")

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.state_dir / "artifacts"

    @property
    def resolved_jobs_dir(self) -> Path:
        return (self.jobs_dir or self.state_dir / "jobs").resolve()

    @property
    def resolved_feature_root(self) -> Path:
        return (self.feature_root or self.state_dir / "features").resolve()


class ControlPlaneServer:
    def __init__(self, settings: ControlSettings, tokens: TokenTable | None = None) -> None:
        self.settings = settings
        self.tokens = tokens if tokens is not None else TokenTable.load(settings.tokens_file)
        if self.tokens is None or not len(self.tokens):
            raise InvalidArgumentError(
                "tokens: every control RPC needs a bearer token; expected --tokens FILE or WEIR_TOKENS, got neither"
            )
        self.store: Store | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.registry = CollectorRegistry()
        self.metrics = ControlMetrics(self.registry)
        self.metrics_port: int | None = None
        self._metrics_http: WSGIServer | None = None
        self._rollout_task: asyncio.Task[None] | None = None
        self.features: FeaturesService | None = None
        self.training: JobRunner | None = None
        self.drift: DriftMonitor | None = None
        self._drift_task: asyncio.Task[None] | None = None
        self.refusals: RefusalLog | None = None
        self.lease: LeaseKeeper | None = None
        self.reports: ReplicaReports | None = None
        self._background: list[asyncio.Task[None]] = []  # the lease loop and the reports publisher
        self.hub: DesiredStateHub | None = None  # pushes the desired state; started with the server
        self.readiness: DatabaseReadiness | None = None  # health follows the database (docker/README.md)

    async def start(self) -> None:
        settings = self.settings
        check_ttl(settings.lease_seconds)
        self.store = store = await asyncio.to_thread(open_store, settings.resolved_database_url)
        replica_id = settings.replica_id or default_replica_id()
        self.lease = LeaseKeeper(store, replica_id, ttl=settings.lease_seconds)
        await self.lease.acquire_once()  # one replica alone holds it at once: its singleton work starts now
        self._background.append(asyncio.create_task(self.lease.run(), name="weir-lease"))
        artifacts = ArtifactStore(settings.resolved_artifact_dir)
        self.hub = hub = DesiredStateHub(store, self.metrics, settings.online_store)
        await hub.start()  # follows the desired-state revision in the database until stop()
        self.reports = ReplicaReports(store, replica_id, hub.attached)
        if not await asyncio.to_thread(self.reports.others_alive):
            # alone (no other replica reachable, this one not serving yet): every upload in progress
            # now was interrupted. Holding the lease, clean them up at once; else (a restart after
            # kill -9: the dead replica's lease expires within the ttl) those found now are cleaned up
            # once the lease is this replica's, without holding up its start. With other replicas
            # alive nothing is touched (see _clean_up_interrupted_uploads).
            if not self.lease.held:
                await self._take_over_from_dead_holder()
            if self.lease.held:
                await asyncio.to_thread(_clean_up_interrupted_uploads, store, artifacts)
            else:
                found = await asyncio.to_thread(_pending_versions, store)
                self._background.append(
                    asyncio.create_task(self._clean_up_after_takeover(found, artifacts, time.time()))
                )
        self.registry.register(ReplicaCollector(hub.replicas))
        self.refusals = refusals = RefusalLog(store)
        auditor = Auditor(store, self.tokens, refusals)
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.tokens, control_policy, refusals.interceptor_hook)]
            if self.tokens is not None
            else [],
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        registry_pb2_grpc.add_RegistryServicer_to_server(
            RegistryService(store, artifacts, auditor, hub, self.metrics), server
        )
        deployments_pb2_grpc.add_DeploymentsServicer_to_server(
            DeploymentsService(store, auditor, hub, other_replicas=self.reports.other_replicas), server
        )
        self.drift = await asyncio.to_thread(  # links set below, once the runner exists
            DriftMonitor, store, reference_root=settings.resolved_feature_root, webhook_allow=settings.webhook_allow
        )

        async def on_records(replica_id: str, records: monitoring_pb2.InferenceRecords) -> None:
            assert self.drift is not None
            await asyncio.to_thread(self.drift.ingest, replica_id, records)

        deployments_pb2_grpc.add_DataPlaneSyncServicer_to_server(
            DataPlaneSyncService(hub, on_records, self.tokens), server
        )
        audit_pb2_grpc.add_AuditServicer_to_server(AuditService(store), server)
        self.rollouts = RolloutController(
            store, hub, labelled_outcomes=self.drift.labelled_outcomes, lease=self.lease, reports=self.reports.read
        )
        rollouts_pb2_grpc.add_RolloutsServicer_to_server(RolloutsService(store, auditor, self.rollouts), server)
        experiments_pb2_grpc.add_ExperimentsServicer_to_server(ExperimentsService(store, auditor, hub), server)
        self.features = FeaturesService(store, auditor, hub, settings.resolved_feature_root, settings.online_store)
        features_pb2_grpc.add_FeaturesServicer_to_server(self.features, server)
        self.training = JobRunner(
            store, artifacts, settings.resolved_jobs_dir, settings.max_concurrent_jobs, start_canary=self.rollouts.start
        )
        self.training.isolate(
            settings.job_user, [settings.state_dir, settings.resolved_artifact_dir, settings.tokens_file],
            settings.resolved_database_url, [settings.resolved_feature_root],
        )  # fmt: skip
        training_pb2_grpc.add_TrainingServicer_to_server(TrainingService(store, auditor, self.training), server)
        self.drift.link(MonitoringLinks(store, self.training))
        self.drift.link_lease(self.lease)  # drift windows and actions: judged by the holder, fenced
        self.registry.register(DriftCollector(self.drift))
        monitoring_pb2_grpc.add_MonitoringServicer_to_server(MonitoringService(self.drift, auditor), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server)
        tls = server_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        try:
            self.port = bind_grpc(
                server, settings.listen_address, settings.port, tls.credentials() if tls else None,
                "the control plane's gRPC port",
            )  # fmt: skip
        except WeirError:
            await self.stop()  # the store, the refusal log and the feature service opened above
            raise
        await server.start()
        self._server = server
        host = "127.0.0.1" if settings.listen_address in ("0.0.0.0", "::", "[::]", "") else settings.listen_address
        self.reports.address = settings.advertise_address or f"{host}:{self.port}"
        self.training.control_address = self.reports.address
        self.training.control_addresses = self.reports.addresses  # jobs learn every live replica
        self.training.lease = self.lease
        await asyncio.to_thread(self.reports.publish, self.reports.snapshot())  # present before any job launches
        self._background.append(asyncio.create_task(self.reports.run(), name="weir-replica-reports"))
        await self.training.start()
        self._drift_task = asyncio.create_task(run_windows(self.drift), name="weir-drift-windows")
        self._rollout_task = asyncio.create_task(self.rollouts.run(), name="weir-rollout-controller")
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.readiness = DatabaseReadiness(settings.resolved_database_url, health_servicer, ("", *SERVICE_NAMES))
        self.readiness.start()
        if settings.metrics_port >= 0:
            try:
                self._metrics_http, _ = listen_http(
                    lambda: start_http_server(settings.metrics_port, settings.listen_address, self.registry),
                    settings.listen_address, settings.metrics_port, "the control plane's /metrics port",
                )  # fmt: skip
            except WeirError:
                await self.stop()
                raise
            self.metrics_port = self._metrics_http.server_port
        log.info(
            "control plane started",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "database": _redacted(settings.resolved_database_url),
                "tls": bool(tls),
            },
        )

    async def stop(self, grace: float = 5.0) -> None:
        if self.readiness is not None:
            await self.readiness.stop()
            self.readiness = None
        if self._rollout_task is not None:
            self._rollout_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rollout_task
            self._rollout_task = None
        await stop_task(self._drift_task)
        self._drift_task = None
        if self.training is not None:
            await self.training.stop()  # jobs keep running: the next start (or another replica) adopts them
        for task in reversed(self._background):  # the reports go, then the lease is released
            await stop_task(task)
        self._background = []
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.hub is not None:
            await self.hub.stop()
            self.hub = None
        if self.refusals is not None:
            self.refusals.close()
            await self.refusals.drain()
        if self.features is not None:
            await asyncio.to_thread(self.features.close)
            self.features = None
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    async def _take_over_from_dead_holder(self) -> None:
        """A restart after kill -9: the previous process's term is still unexpired, but it is dead
        (on this host, its port closed): take the lease now rather than a ttl later."""
        assert self.lease is not None and self.reports is not None
        lease, reports = self.lease, self.reports
        found = await asyncio.to_thread(lease.current)
        if found is None or found[0] in ("", lease.holder) or found[2] <= found[3]:
            return  # never held, ours, or expired (the run loop takes it)
        address = await asyncio.to_thread(reports.address_of, found[0])
        dead = bool(address) and await asyncio.to_thread(dead_here, address)
        if dead:
            await lease.take_over_from(found[0], found[1])

    async def _clean_up_after_takeover(
        self, versions: list[tuple[str, int]], artifacts: ArtifactStore, before: float
    ) -> None:
        """Once this replica holds the lease: the uploads found interrupted at its start FAILED, and
        the partial files older than its start removed (its own uploads since are left alone)."""
        assert self.lease is not None and self.store is not None
        await self.lease.wait_held()
        store = self.store

        def clean_up() -> None:
            for model_name, version in versions:
                store.fail_version(model_name, version, INTERRUPTED)
            removed = _clear_abandoned_uploads(artifacts, before)
            counts = {"versions": len(versions), "files": removed}
            log.warning("uploads interrupted by the previous stop cleaned up", extra=counts)

        if versions or any(artifacts.incoming.glob("upload-*")):
            await asyncio.to_thread(clean_up)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _clean_up_interrupted_uploads(store: Store, artifacts: ArtifactStore) -> None:
    """Uploads a stopped (or killed) control plane left unfinished: their versions FAILED, their
    partial files removed. Run only by a replica that holds the lease and sees no other live replica
    (no one else can be uploading into this store and artifact directory); with several replicas
    running, an interrupted upload stays PENDING and its partial file is left for ``weir control-gc``
    (which removes it by age), rather than breaking another replica's upload in progress."""
    interrupted = store.fail_pending_versions(INTERRUPTED)
    if interrupted:
        log.warning("uploads interrupted by the previous stop marked FAILED", extra={"count": interrupted})
    abandoned = _clear_abandoned_uploads(artifacts)
    if abandoned:
        log.warning("partial upload files of the previous run removed", extra={"count": abandoned})


def _clear_abandoned_uploads(artifacts: ArtifactStore, before: float | None = None) -> int:
    """Partial upload files a stopped (or killed) control plane left in ``incoming/`` (see above):
    all, or those last written before ``before`` (time.time())."""
    removed = 0
    for path in artifacts.incoming.glob("upload-*"):
        with contextlib.suppress(FileNotFoundError):
            if before is None or path.stat().st_mtime < before:
                path.unlink()
                removed += 1
    return removed


def _pending_versions(store: Store) -> list[tuple[str, int]]:
    with store.transaction() as connection:
        rows = connection.execute(
            select(MODEL_VERSIONS.c.model_name, MODEL_VERSIONS.c.version).where(MODEL_VERSIONS.c.state == "PENDING")
        ).all()
    return [(row[0], int(row[1])) for row in rows]


def _redacted(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
