"""The attach stream: data planes follow the desired state the control plane pushes.

Each data plane opens one ``DataPlaneSync.Attach`` stream, says hello (who it is, what it serves),
then sends heartbeats and a status after every change. The control plane answers with the complete
desired state at once, and again whenever its revision moves in the database (whoever changed it).
States are coalesced per replica: a slow replica gets the latest state, never a backlog of stale ones.

What a replica reports is bounded before anyone reads it: counters only for the variants it was
sent, never going back within a stream, growing at most MAX_REPORTED_REQUESTS_PER_SECOND; drift
records at most MAX_RECORDS_PER_MESSAGE a message and MAX_RECORDS_PER_SECOND per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from weir_control.metrics import ControlMetrics
from weir_control.store import Store
from weir_control.store.changes import POLL_SECONDS, RevisionWatch
from weir_proto.auth import TokenTable, identity_of
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc, monitoring_pb2

log = logging.getLogger(__name__)


# What one replica may claim (a replica token is a credential like any other: bound what it buys).
MAX_REPORTED_REQUESTS_PER_SECOND = 100_000  # per variant per replica: a counter's plausible growth rate
REPORT_BURST_SECONDS = 5.0  # growth allowed beyond the rate (report intervals, clock skew)
MAX_STATUS_ENTRIES = 1024  # endpoint, variant and shadow lines per status
MAX_LATENCY_BUCKETS = 64
MAX_RECORDS_PER_MESSAGE = 5_000  # drift records: a data plane ships at most 5000 per 0.5 s
MAX_RECORDS_PER_SECOND = 20_000  # per replica (token bucket, burst of one second)

Key = tuple[str, str, int]  # (endpoint, variant, version): a variant's counters restart with a new version


class ReplicaStream:
    """One attach stream: what it was sent, and what it reported, bounded (clock: monotonic)."""

    _serial = 0

    def __init__(self, hello: deployments_pb2.Hello, identity: str = "", clock: Callable[[], float] = time.monotonic):
        ReplicaStream._serial += 1
        self.stream = f"{hello.replica_id}#{ReplicaStream._serial}"  # unique per attach, for rollouts' looks
        self.identity = identity
        self._clock = clock
        self.info = deployments_pb2.ReplicaInfo(replica_id=hello.replica_id, address=hello.address, identity=identity)
        now = datetime.datetime.now(datetime.UTC)
        self.info.attached_at.FromDatetime(now)
        self.info.last_heartbeat.FromDatetime(now)
        self.pending: deployments_pb2.DesiredState | None = None
        self.wakeup = asyncio.Event()
        self._sent: dict[Key, float] = {}  # variant -> when a desired state first named it to this replica
        self._sent_endpoints: set[str] = set()
        self._accepted: dict[Key, deployments_pb2.VariantStats] = {}
        self._accepted_at: dict[Key, float] = {}
        self._reported = deployments_pb2.ReplicaStatus()
        self.refused_reports = 0  # variant lines refused: implausible, out of the desired state or shape
        self._records_allowance = float(MAX_RECORDS_PER_SECOND)
        self._records_at = clock()
        self.dropped_records = 0
        # What it served already when it attached: accepted as a starting point (a rollout counts
        # nothing from a stream's first look, so these values decide nothing).
        for stats in list(hello.status.variants)[:MAX_STATUS_ENTRIES]:
            if _well_formed(stats):
                key = _key(stats)
                self._accepted[key], self._accepted_at[key] = stats, self._clock()
        self._reported.CopyFrom(hello.status)
        self._rebuild()

    def offer(self, state: deployments_pb2.DesiredState) -> None:
        self.pending = state
        self.wakeup.set()

    def take(self) -> deployments_pb2.DesiredState | None:
        state, self.pending = self.pending, None
        self.wakeup.clear()
        return state

    def sending(self, state: deployments_pb2.DesiredState) -> None:
        """The desired state is about to go to this replica: what it may report on from now."""
        now = self._clock()
        named: dict[Key, float] = {}
        for endpoint in state.endpoints:
            for variant in endpoint.variants:
                key = (endpoint.endpoint, variant.name, variant.model.version)
                named[key] = self._sent.get(key, now)
        self._sent = named
        self._sent_endpoints = {endpoint.endpoint for endpoint in state.endpoints}
        for key in [key for key in self._accepted if key not in named]:  # gone: if it comes back, its
            del self._accepted[key], self._accepted_at[key]  # counters may restart (reloaded) or carry on
        self._rebuild()

    def report(self, status: deployments_pb2.ReplicaStatus) -> None:
        """Take a status: counters only for variants it was sent, monotonic, growing at a plausible rate."""
        now = self._clock()
        for stats in list(status.variants)[:MAX_STATUS_ENTRIES]:
            key = _key(stats)
            since = self._sent.get(key)
            if since is None or not _well_formed(stats):
                self.refused_reports += 1
                continue
            previous = self._accepted.get(key)
            if previous is None:
                growth, elapsed = _total(stats), now - since
            elif _went_back(stats, previous):
                self.refused_reports += 1
                continue
            else:
                growth, elapsed = _total(stats) - _total(previous), now - self._accepted_at[key]
            if growth > MAX_REPORTED_REQUESTS_PER_SECOND * (max(elapsed, 0.0) + REPORT_BURST_SECONDS):
                self.refused_reports += 1  # kept back: judged again against a longer time next report
                continue
            self._accepted[key], self._accepted_at[key] = stats, now
        if self.refused_reports:
            log.debug("replica report lines refused", extra={"replica": self.stream, "count": self.refused_reports})
        self._reported.CopyFrom(status)
        self._rebuild()

    def admit_records(self, records: monitoring_pb2.InferenceRecords) -> monitoring_pb2.InferenceRecords:
        """At most MAX_RECORDS_PER_MESSAGE per message and MAX_RECORDS_PER_SECOND per replica;
        the rest is dropped (counted)."""
        now = self._clock()
        self._records_allowance = min(
            float(MAX_RECORDS_PER_SECOND), self._records_allowance + (now - self._records_at) * MAX_RECORDS_PER_SECOND
        )
        self._records_at = now
        keep = int(min(len(records.records), MAX_RECORDS_PER_MESSAGE, max(self._records_allowance, 0.0)))
        self._records_allowance -= keep
        if keep == len(records.records):
            return records
        self.dropped_records += len(records.records) - keep
        admitted = monitoring_pb2.InferenceRecords(dropped=records.dropped)
        admitted.records.extend(records.records[:keep])
        return admitted

    def _rebuild(self) -> None:
        """The status others see: what was accepted, for what this replica was sent."""
        status = deployments_pb2.ReplicaStatus(applied_revision=self._reported.applied_revision)
        status.endpoints.extend(
            line for line in list(self._reported.endpoints)[:MAX_STATUS_ENTRIES]
            if line.endpoint in self._sent_endpoints
        )  # fmt: skip
        status.shadows.extend(
            line for line in list(self._reported.shadows)[:MAX_STATUS_ENTRIES] if line.endpoint in self._sent_endpoints
        )
        status.variants.extend(stats for key, stats in sorted(self._accepted.items()) if key in self._sent)
        self.info.status.CopyFrom(status)


def _key(stats: deployments_pb2.VariantStats) -> Key:
    return (stats.endpoint, stats.variant, stats.version)


def _total(stats: deployments_pb2.VariantStats) -> int:
    return stats.succeeded + stats.failed


def _well_formed(stats: deployments_pb2.VariantStats) -> bool:
    bounds, counts = stats.latency_bounds_seconds, stats.latency_counts
    return (
        stats.succeeded >= 0
        and stats.failed >= 0
        and len(bounds) <= MAX_LATENCY_BUCKETS
        and len(counts) <= MAX_LATENCY_BUCKETS + 1
        and all(math.isfinite(bound) and bound >= 0 for bound in bounds)
        and all(count >= 0 for count in counts)
    )


def _went_back(stats: deployments_pb2.VariantStats, previous: deployments_pb2.VariantStats) -> bool:
    if stats.succeeded < previous.succeeded or stats.failed < previous.failed:
        return True
    if len(stats.latency_counts) != len(previous.latency_counts):
        return True
    return any(now < before for now, before in zip(stats.latency_counts, previous.latency_counts, strict=True))


class DesiredStateHub:
    """The current desired state and the replicas that follow it (event loop thread only).

    Between ``start()`` and ``stop()`` it follows the desired-state revision in the database
    (``weir_control.store.changes.RevisionWatch``): a change committed through this replica, another
    replica or any other writer (a training job's registration moving an alias) is read once and
    offered to every attached replica. Nobody tells it of a change by hand. When the database is
    down it keeps serving the last state it read and looks again at every poll.
    """

    def __init__(
        self,
        store: Store,
        metrics: ControlMetrics | None = None,
        online_store: str = "",
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._online_store = online_store  # told to data planes with the feature definitions
        self._state: deployments_pb2.DesiredState | None = None
        self._replicas: dict[int, ReplicaStream] = {}
        self._lock = asyncio.Lock()
        self._watch = RevisionWatch(store, poll_seconds)
        self._follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Follow the revision until ``stop()``."""
        if self._follower is None:
            await self._watch.start()
            self._follower = asyncio.create_task(self._follow(), name="weir-desired-state-hub")

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
            await self._watch.stop()

    async def current(self) -> deployments_pb2.DesiredState:
        """The latest committed desired state (a change committed before the call is in it); the
        last one read while the database is down."""
        try:
            await self._refresh(await asyncio.to_thread(self._store.current_revision))
        except Exception:
            if self._state is None:
                raise
        assert self._state is not None
        return self._state

    async def _read(self) -> deployments_pb2.DesiredState:
        state = await asyncio.to_thread(self._store.desired_state)
        state.online_store = self._online_store
        return state

    async def changed(self) -> None:
        """Look at the revision now and, if it moved, offer the new state (the follower does this by
        itself; kept for callers that want the state out before they return)."""
        await self._refresh(await asyncio.to_thread(self._store.current_revision))

    async def _follow(self) -> None:
        failing = False
        while True:
            await self._watch.wait()
            try:
                await self._refresh(await asyncio.to_thread(self._store.current_revision))
            except Exception as error:  # the database is down: serve the last state, look again later
                if not failing:
                    log.warning(
                        "cannot read the desired-state revision; data planes keep the last state until it can",
                        extra={"error": str(error)},
                    )
                    failing = True
                continue
            if failing:
                log.info("reading the desired-state revision again")
                failing = False

    async def _refresh(self, revision: int) -> None:
        """Re-read the desired state if ``revision`` is not the one held, and offer it to every
        attached replica."""
        async with self._lock:
            if self._state is not None and self._state.revision == revision:
                return  # nothing changed: no re-read
            state = await self._read()
            if self._state is not None and state.revision == self._state.revision:
                return
            self._state = state
            if self._metrics is not None:
                self._metrics.desired_state_changes.inc()
            for replica in self._replicas.values():
                replica.offer(state)

    def register(self, replica: ReplicaStream) -> None:
        self._replicas[id(replica)] = replica

    def unregister(self, replica: ReplicaStream) -> None:
        self._replicas.pop(id(replica), None)

    def replicas(self) -> list[deployments_pb2.ReplicaInfo]:
        return sorted((replica.info for replica in self._replicas.values()), key=lambda info: info.replica_id)

    def attached(self) -> list[ReplicaStream]:
        """The attach streams (rollouts weigh their reports per stream and identity)."""
        return list(self._replicas.values())


class DataPlaneSyncService(deployments_pb2_grpc.DataPlaneSyncServicer):
    def __init__(
        self,
        hub: DesiredStateHub,
        on_records: Callable[[str, monitoring_pb2.InferenceRecords], Awaitable[None]] | None = None,
        tokens: TokenTable | None = None,
    ) -> None:
        self._hub = hub
        self._on_records = on_records  # sampled inference records, for drift monitoring
        self._tokens = tokens  # who attached (the interceptor already checked the replica role)

    async def Attach(
        self, request_iterator: AsyncIterator[deployments_pb2.DataPlaneMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[deployments_pb2.ControlPlaneMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "body: expected the first message to be a hello, got something else"
            )
        assert first is not None  # abort raised otherwise
        replica = ReplicaStream(
            first.hello, identity_of(context, self._tokens).name if self._tokens is not None else ""
        )
        self._hub.register(replica)
        log.info(
            "data plane attached",
            extra={"replica": replica.info.replica_id, "address": replica.info.address, "identity": replica.identity},
        )
        reader = asyncio.create_task(self._read(replica, request_iterator))
        waiter: asyncio.Task[bool] | None = None  # cancelled and awaited however the stream ends
        try:
            sent = await self._hub.current()
            replica.sending(sent)
            yield deployments_pb2.ControlPlaneMessage(desired_state=sent)
            while True:
                waiter = asyncio.create_task(replica.wakeup.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if reader.done():
                    return  # the replica closed its side (or went away)
                state = replica.take()
                if state is not None and state.revision != sent.revision:  # one offered as it attached: sent
                    sent = state
                    replica.sending(state)
                    yield deployments_pb2.ControlPlaneMessage(desired_state=state)
        finally:
            self._hub.unregister(replica)
            for task in (reader, waiter):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            log.info("data plane detached", extra={"replica": replica.info.replica_id})

    async def _read(
        self, replica: ReplicaStream, request_iterator: AsyncIterator[deployments_pb2.DataPlaneMessage]
    ) -> None:
        async for message in request_iterator:
            replica.info.last_heartbeat.FromDatetime(datetime.datetime.now(datetime.UTC))
            body = message.WhichOneof("body")
            if body == "status":
                replica.report(message.status)
            elif body == "records" and self._on_records is not None:
                records = replica.admit_records(message.records)
                if records.records or records.dropped:
                    await self._on_records(replica.info.replica_id, records)
