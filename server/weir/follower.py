"""Following a control plane: the data plane side of the attach stream.

With ``--control-plane A[,B...]`` the model repository directory is Weir's to manage: it holds, per
endpoint variant, the version the control plane wants served. The follower

1. loads what the directory already holds (the last-known-good state), so a restart serves at once
   even when no control plane is reachable;
2. attaches to one control plane (one bidirectional stream), says hello with what it serves,
   heartbeats, and checks that the control plane still answers (gRPC health, every heartbeat);
3. on every desired state, reconciles at once (``weir.reconciler.plan``): the routing table, flags
   and the kill switch apply in the same event-loop turn the state arrives in; artifact installs run
   in the background, at most INSTALL_CONCURRENCY at a time, and a newer state cancels the installs
   it no longer wants. An endpoint routes to a new version only once it is completely loaded; a
   version that fails to load is reported FAILED and the old one keeps serving;
4. reports its status after every change; when the stream breaks or the control plane stops
   answering, it keeps serving and attaches to the next control plane of the list (round robin,
   exponential backoff once each has been tried), then reconciles against the state it is sent.

Inference never waits on any of this. It talks to the control plane only through the
``weir.control.v1`` protos.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from weir import __version__
from weir.errors import WeirError
from weir.installer import ARTIFACTS_DIR, SERVED_MARKER, Installer, RegistryLink, read_served_marker, write_atomically
from weir.monitoring import RecordBuffer, to_records
from weir.reconciler import Install, Observed, Target, plan
from weir.repository import ModelRepository
from weir.routing import DEFAULT_KEY_PARAMETER, SEPARATOR, EndpointRoute, Router, ShadowRoute, VariantRoute
from weir.shadow import ShadowMirror
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc, monitoring_pb2, registry_pb2_grpc
from weir_proto.tls import ClientTLS

__all__ = ["SERVED_MARKER", "ControlPlaneFollower", "FollowerSettings", "default_replica_id"]

log = logging.getLogger(__name__)

ROUTES_FILE = ".routes.json"  # the traffic policy last applied, for a restart without the control plane
RECORDS_SECONDS = 0.5  # how often sampled inference records are shipped
RECORDS_PER_MESSAGE = 5000
INSTALL_CONCURRENCY = 2  # artifact downloads and warm-ups at once (memory and bandwidth stay bounded)
UNANSWERED_PROBES = 2  # health checks in a row a control plane may miss before the follower moves on
EndpointState = deployments_pb2.EndpointStatus
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class FollowerSettings:
    addresses: tuple[str, ...]  # the control planes, HOST:PORT each (or a DNS name resolving to several)
    token: str | None
    replica_id: str
    serving_address: str  # where this replica serves inference, reported to the control plane
    heartbeat_seconds: float = 5.0
    max_backoff_seconds: float = 2.0  # with jitter at most 3 s: a restarted control plane is followed again soon
    refused_backoff_seconds: float = 30.0  # a refused token: retrying soon would not help
    # A state older than the one routed (a replica behind on propagation, after a failover) waits
    # this long for a newer one before it is applied (a store that was reset stays behind).
    stale_grace_seconds: float = 2.0
    tls: ClientTLS | None = None


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ControlPlaneUnresponsive(Exception):
    """The attached control plane stopped answering health checks (a hung process or host)."""


@dataclass
class _InstallTask:
    target: Target
    task: asyncio.Task[None]


class ControlPlaneFollower:
    def __init__(
        self,
        settings: FollowerSettings,
        repository: ModelRepository,
        router: Router,
        root: Path,
        on_change: Callable[[], Awaitable[None]],
        shadows: ShadowMirror | None = None,
        on_features: Callable[[str, str], None] | None = None,
        records: RecordBuffer | None = None,
        element_names: Callable[[str, str], list[str] | None] = lambda model, tensor: None,
    ) -> None:
        self._records = records
        self._element_names = element_names
        self._on_features = on_features
        self._features_applied: tuple[str, str] | None = None
        self._shadows = shadows
        self._router = router
        self._settings = settings
        self._repository = repository
        self._root = root
        self._on_change = on_change
        self._link = RegistryLink()
        self._installer = Installer(root, repository, self._link, settings.token)
        self._install_slots = asyncio.Semaphore(INSTALL_CONCURRENCY)
        self._desired: deployments_pb2.DesiredState | None = None
        self._served: dict[str, Target] = {}
        self._installs: dict[str, _InstallTask] = {}
        self._failed: dict[str, tuple[Target, str]] = {}
        self._unloads: dict[str, asyncio.Task[None]] = {}
        self._statuses: dict[str, deployments_pb2.EndpointStatus] = {}
        self._applied_revision = 0
        self.routed_revision = 0  # the last desired state whose routes and flags are in effect
        self._held: asyncio.TimerHandle | None = None  # an older state waiting for a newer one
        self._outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage] | None = None
        self._changed = asyncio.Event()
        self.attached = asyncio.Event()  # set while a stream is open (tests and readiness logs)
        self._attaches = 0  # attaches that received a desired state

    # --- start-up ----------------------------------------------------------------------------------

    async def load_last_known_good(self) -> None:
        """Serve what the managed directory holds (variant models and the routes saved with them)
        before the control plane is reachable."""
        (self._root / ARTIFACTS_DIR).mkdir(parents=True, exist_ok=True)
        for model_dir in sorted(p for p in self._root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            model = model_dir.name
            target = read_served_marker(model_dir)
            if target is None and not (model_dir / "config.pbtxt").is_file():
                continue  # an install that never finished: the next one of that variant starts afresh
            try:
                await self._repository.load(model)
            except WeirError as error:
                log.error("last-known-good model failed to load", extra={"model": model, "reason": error.message})
                continue
            if target is None:
                continue  # a model not installed by a control plane: served by its name, never routed
            self._served[model] = target
            endpoint, _, variant = model.partition(SEPARATOR)
            self._statuses[model] = EndpointState(
                endpoint=endpoint, variant=variant, state=EndpointState.READY, serving=target.ref()
            )
        self._router.swap(_load_routes(self._root / ROUTES_FILE, set(self._served)))
        await self._on_change()

    # --- the attach loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Attach, follow, and fail over with backoff forever (until cancelled)."""
        notifier = asyncio.create_task(self._notify_changes(), name="weir-follower-notify")
        try:
            await self._attach_forever()
        finally:
            pending = [notifier, *(entry.task for entry in self._installs.values()), *self._unloads.values()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _attach_forever(self) -> None:
        addresses = self._settings.addresses
        delay, index, failed_in_a_row = 0.2, random.randrange(len(addresses)), 0
        while True:
            address = addresses[index % len(addresses)]
            index += 1  # whatever happens, the next attach tries the next control plane
            attaches_before = self._attaches
            refused = False
            try:
                await self._session(address)
                log.warning("the control plane ended the attach stream", extra={"control_plane": address})
            except asyncio.CancelledError:
                raise
            except Exception as error:  # grpc.aio.AioRpcError, OSError...: keep serving, fail over
                refused = isinstance(error, grpc.aio.AioRpcError) and error.code() in _REFUSED
                if refused:  # retrying soon will not help: say what is wrong
                    log.error(
                        "the control plane refused this data plane's token: attaching needs a token of role "
                        "'replica' (WEIR_CONTROL_PLANE_TOKEN; `weir token --role replica` makes one)",
                        extra={"control_plane": address, "reason": _short(error)},
                    )
                else:
                    log.warning(
                        "control plane unreachable; serving the last-known-good state",
                        extra={"control_plane": address, "reason": _short(error)},
                    )
            finally:
                self.attached.clear()
                self._link.down()
            if self._attaches > attaches_before:  # it was followed: the next one (almost) at once
                delay, failed_in_a_row = 0.2, 0
                await asyncio.sleep(0.05 * random.random())
                continue
            failed_in_a_row += 1
            if failed_in_a_row % len(addresses) and not refused:
                continue  # another control plane of the list is still to be tried in this round
            pause = self._settings.refused_backoff_seconds if refused else delay
            log.info("retrying the control planes", extra={"retry_in_s": pause, "control_planes": list(addresses)})
            await asyncio.sleep(pause * (0.5 + random.random()))  # jitter: replicas do not reconnect in step
            delay = min(delay * 2, self._settings.max_backoff_seconds)

    async def _session(self, address: str) -> None:
        """One attach: ends (raising) when the stream breaks or the control plane stops answering.
        Every task it starts is cancelled and awaited before it returns."""
        settings = self._settings
        async with _channel(settings, address) as channel:
            sync = deployments_pb2_grpc.DataPlaneSyncStub(channel)
            # The stream is written with call.write from a task of ours, not from a request iterator:
            # gRPC's task consuming an iterator is not cancelled with the call, and when the stream
            # failed it was left pending inside our generator (asyncio: "Task was destroyed but it is
            # pending", "aclose(): asynchronous generator is already running").
            call = sync.Attach(metadata=client_metadata(settings.token))
            outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage] = asyncio.Queue()
            hello = deployments_pb2.Hello(
                replica_id=settings.replica_id,
                address=settings.serving_address,
                weir_version=__version__,
                status=self._status(),
            )
            outbox.put_nowait(deployments_pb2.DataPlaneMessage(hello=hello))
            self._outbox = outbox
            helpers = [
                asyncio.create_task(_write(call, outbox)),
                asyncio.create_task(self._heartbeat(outbox)),
            ]
            if self._records is not None:
                helpers.append(asyncio.create_task(self._ship_records(outbox)))
            reader = asyncio.create_task(self._follow(call, address, registry_pb2_grpc.RegistryStub(channel)))
            watcher = asyncio.create_task(self._watch(channel, address))
            try:
                done, _ = await asyncio.wait([reader, watcher], return_when=asyncio.FIRST_COMPLETED)
                for task in (reader, watcher):  # the reader's ending says most: it goes first
                    if task in done:
                        task.result()
            finally:
                self._outbox = None
                self._release_held()  # the next attach sends its own current state
                call.cancel()
                tasks = [reader, watcher, *helpers]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(
        self, call: grpc.aio.StreamStreamCall, address: str, registry: registry_pb2_grpc.RegistryStub
    ) -> None:
        first = True
        async for message in call:
            if message.WhichOneof("body") != "desired_state":
                continue
            if first:
                first = False
                self._attaches += 1
                log.info("attached to the control plane", extra={"control_plane": address})
                self.attached.set()
                await self._link.up(registry)
            self._take(message.desired_state)

    def _take(self, state: deployments_pb2.DesiredState) -> None:
        """Apply a state at once, unless it is older than the one routed: control-plane replicas learn
        of a change within a fraction of a second of each other, and one behind would undo it for that
        long. Such a state is held; a newer one replaces it, and after the grace it is applied."""
        self._release_held()
        if self._desired is None or state.revision >= self.routed_revision:
            self.apply(state)
            return
        log.warning(
            "desired state older than the one routed: held",
            extra={"revision": state.revision, "routed_revision": self.routed_revision,
                   "grace_s": self._settings.stale_grace_seconds},
        )  # fmt: skip
        self._held = asyncio.get_running_loop().call_later(self._settings.stale_grace_seconds, self._apply_held, state)

    def _apply_held(self, state: deployments_pb2.DesiredState) -> None:
        self._held = None
        log.warning("older desired state applied: no newer one came", extra={"revision": state.revision})
        self.apply(state)

    def _release_held(self) -> None:
        if self._held is not None:
            self._held.cancel()
            self._held = None

    async def _watch(self, channel: grpc.aio.Channel, address: str) -> None:
        """Health-check the control plane every heartbeat: a hung one (process stopped, host gone
        without closing the connection) is left after UNANSWERED_PROBES misses. With several
        control planes, one that says it is not serving (its database is away) is left too."""
        health = health_pb2_grpc.HealthStub(channel)
        interval = self._settings.heartbeat_seconds
        missed = 0
        while True:
            await asyncio.sleep(interval)
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=max(interval, 1.0))
                serving = answer.status == health_pb2.HealthCheckResponse.SERVING
                missed = 0 if serving or len(self._settings.addresses) == 1 else missed + 1
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue  # it answered (e.g. no health service): alive
                missed += 1
            if missed >= UNANSWERED_PROBES:
                raise ControlPlaneUnresponsive(f"{address} did not answer {missed} health checks in a row")

    async def _heartbeat(self, outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage]) -> None:
        """Each beat carries the full status: the control plane's statistics (shadow comparisons)
        stay at most one interval old."""
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            outbox.put_nowait(deployments_pb2.DataPlaneMessage(status=self._status()))

    async def _ship_records(self, outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage]) -> None:
        """Sampled requests, as records, every RECORDS_SECONDS while attached (converted in a worker
        thread: the samples are references to arrays nothing writes to any more)."""
        buffer = self._records
        assert buffer is not None
        while True:
            await asyncio.sleep(RECORDS_SECONDS)
            samples = buffer.drain(RECORDS_PER_MESSAGE)
            if not samples and not buffer.dropped:
                continue
            records = await asyncio.to_thread(to_records, samples, self._element_names)
            message = monitoring_pb2.InferenceRecords(records=records, dropped=buffer.dropped)
            outbox.put_nowait(deployments_pb2.DataPlaneMessage(records=message))

    async def _notify_changes(self) -> None:
        """Readiness and health follow what serves (coalesced: one refresh for a burst of changes)."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._on_change()
            except Exception:  # a refresh that failed is retried on the next change
                log.exception("refreshing readiness after a change failed")

    def _status(self) -> deployments_pb2.ReplicaStatus:
        status = deployments_pb2.ReplicaStatus(
            applied_revision=self._applied_revision,
            endpoints=[self._statuses[name] for name in sorted(self._statuses)],
        )
        for name, route in sorted(self._router.table().items()):
            for variant in route.variants:
                try:
                    loaded = self._repository.resolve(variant.model, "")
                except WeirError:
                    continue
                metrics = loaded.metrics
                status.variants.add(
                    endpoint=name, variant=variant.name, version=loaded.version,
                    succeeded=int(metrics.request_success.value), failed=int(metrics.request_failures.value),
                    latency_bounds_seconds=metrics.request_duration.bounds,
                    latency_counts=list(metrics.request_duration.counts),
                )  # fmt: skip
        if self._shadows is not None:
            for (endpoint, shadow), stats in sorted(self._shadows.stats.items()):
                status.shadows.add(
                    endpoint=endpoint, shadow=shadow, mirrored=stats.mirrored, errors=stats.errors,
                    dropped=stats.dropped, rows=stats.rows, rows_agreeing=stats.rows_agreeing,
                    max_abs_diff=stats.max_abs_diff, rows_within_tolerance=stats.rows_within_tolerance,
                )  # fmt: skip
        return status

    def _report(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(deployments_pb2.DataPlaneMessage(status=self._status()))

    # --- reconciling -------------------------------------------------------------------------------

    def apply(self, state: deployments_pb2.DesiredState) -> None:
        """Take a desired state: everything but installs is in effect when this returns."""
        features = (state.feature_definitions_toml, state.online_store)
        if state.feature_definitions_toml and features != self._features_applied and self._on_features is not None:
            try:
                self._on_features(*features)
                self._features_applied = features
            except Exception as error:  # bad definitions keep the previous ones in use
                log.error("feature definitions from the control plane not applied", extra={"reason": str(error)})
        self._desired = state
        self._failed.clear()  # a new state (or the same after a reattach) tries failed versions again
        self._reconcile()
        self.routed_revision = state.revision
        log.info(
            "desired state routed",
            extra={"revision": state.revision, "installs_pending": len(self._installs)},
        )

    def _reconcile(self) -> None:
        """Carry out plan(desired, observed) (synchronously: routes, flags and statuses at once)."""
        state = self._desired
        if state is None:
            return
        observed = Observed(
            served=dict(self._served),
            installing={model: entry.target for model, entry in self._installs.items()},
            failed=dict(self._failed),
            routes=self._router.table(),
        )
        actions = plan(state, observed)
        self._router.swap(actions.routes)
        self._statuses = actions.statuses
        for model in actions.cancels:
            self._installs[model].task.cancel()  # its entry goes when it has stopped
            log.info("install superseded", extra={"model": model, "source": _source(self._installs[model].target)})
        for install in actions.installs:
            self._start_install(install)
        for model in actions.unloads:
            self._start_unload(model)
        for name in set(observed.routes) - set(actions.routes):
            log.info("endpoint undeployed", extra={"model": name})
        for name, route in actions.routes.items():
            before = observed.routes.get(name)
            if before is None or dict(before.flags) != dict(route.flags):  # what bench/propagation.py waits for
                log.info("endpoint flags applied", extra={"endpoint": name, "flags": dict(route.flags),
                                                          "revision": state.revision})  # fmt: skip
        try:
            _save_routes(self._root / ROUTES_FILE, actions.routes)
        except OSError as error:  # the routes serve from memory; only a restart without a control plane loses
            log.error("routes not saved for a restart", extra={"reason": str(error)})
        if actions.converged and self._applied_revision != state.revision:
            self._applied_revision = state.revision
            log.info("desired state applied", extra={"revision": state.revision})
        self._changed.set()
        self._report()

    def _start_install(self, install: Install) -> None:
        previous = self._installs.get(install.model)
        if previous is not None:
            previous.task.cancel()
        waits = [task for task in (previous.task if previous else None, self._unloads.get(install.model)) if task]
        task = asyncio.create_task(self._install(install, waits), name=f"weir-install-{install.model}")
        self._installs[install.model] = _InstallTask(install.target, task)

    async def _install(self, install: Install, after: list[asyncio.Task[None]]) -> None:
        model, target = install.model, install.target
        try:
            await asyncio.gather(*after, return_exceptions=True)  # the install or unload it replaces
            async with self._install_slots:
                await self._installer.install(model, install.variant)
        except asyncio.CancelledError:
            if model not in self._served:
                self._installer.forget(model)  # nothing served from there: no half-installed copy stays
            log.info("install stopped", extra={"model": model, "source": _source(target)})
            raise
        except (WeirError, grpc.aio.AioRpcError, OSError) as error:
            message = error.message if isinstance(error, WeirError) else _short(error)
            log.error("desired version failed to load; the previous one keeps serving",
                      extra={"model": model, "source": _source(target), "reason": message})  # fmt: skip
            self._failed[model] = (target, message)
        else:
            self._served[model] = target
            log.info("variant now serves", extra={"model": model, "source": _source(target)})
        finally:
            entry = self._installs.get(model)
            if entry is not None and entry.task is asyncio.current_task():
                del self._installs[model]
        self._reconcile()

    def _start_unload(self, model: str) -> None:
        self._served.pop(model, None)  # from now on nothing plans with it

        async def unload() -> None:
            try:
                with contextlib.suppress(WeirError):
                    await self._repository.unload(model)
                await asyncio.to_thread(self._installer.forget, model)
            finally:
                if self._unloads.get(model) is asyncio.current_task():
                    del self._unloads[model]

        self._unloads[model] = asyncio.create_task(unload(), name=f"weir-unload-{model}")


async def _write(call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage]) -> None:
    while True:
        message = await outbox.get()
        try:
            await call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the stream is over: the reader says why


@contextlib.asynccontextmanager
async def _channel(settings: FollowerSettings, address: str) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if settings.tls is not None:
        channel = grpc.aio.secure_channel(address, settings.tls.credentials(), options=options)
    else:
        channel = grpc.aio.insecure_channel(address, options=options)
    try:
        yield channel
    finally:
        await channel.close()


def _save_routes(path: Path, table: Mapping[str, EndpointRoute]) -> None:
    document = {
        name: {
            "variants": [[variant.name, variant.model, variant.weight] for variant in route.variants],
            "shadows": [[shadow.name, shadow.model, shadow.percent] for shadow in route.shadows],
            "flags": dict(route.flags),
            "key_parameter": route.key_parameter,
            "key_header": route.key_header,
        }
        for name, route in table.items()
    }
    write_atomically(path, json.dumps(document, sort_keys=True))


def _load_routes(path: Path, loaded_models: set[str]) -> dict[str, EndpointRoute]:
    if not path.is_file():
        return {}
    routes = {}
    for name, item in json.loads(path.read_text()).items():
        variants = tuple(
            VariantRoute(v, model, weight) for v, model, weight in item["variants"] if model in loaded_models
        )
        if variants:
            shadows = tuple(
                ShadowRoute(shadow, model, percent)
                for shadow, model, percent in item.get("shadows", [])
                if model in loaded_models
            )
            routes[name] = EndpointRoute(
                name, variants, flags=item.get("flags", {}), key_parameter=item.get("key_parameter") or
                DEFAULT_KEY_PARAMETER, key_header=item.get("key_header", ""), shadows=shadows,
            )  # fmt: skip
    return routes


def _source(target: Target) -> str:
    return f"{target.model_name}:{target.version}"


def _short(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"
