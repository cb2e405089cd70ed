"""The attach stream: data planes follow the desired state the control plane pushes.

Each data plane opens one ``DataPlaneSync.Attach`` stream, says hello (who it is, what it serves),
then sends heartbeats and a status after every change. The control plane answers with the complete
desired state at once, and again whenever a deployment or an alias changes. States are coalesced per
replica: a slow replica gets the latest state, never a backlog of stale ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from weir_control.metrics import ControlMetrics
from weir_control.store import Store
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc, monitoring_pb2

log = logging.getLogger(__name__)


class _Replica:
    def __init__(self, hello: deployments_pb2.Hello) -> None:
        self.info = deployments_pb2.ReplicaInfo(replica_id=hello.replica_id, address=hello.address, status=hello.status)
        now = datetime.datetime.now(datetime.UTC)
        self.info.attached_at.FromDatetime(now)
        self.info.last_heartbeat.FromDatetime(now)
        self.pending: deployments_pb2.DesiredState | None = None
        self.wakeup = asyncio.Event()

    def offer(self, state: deployments_pb2.DesiredState) -> None:
        self.pending = state
        self.wakeup.set()

    def take(self) -> deployments_pb2.DesiredState | None:
        state, self.pending = self.pending, None
        self.wakeup.clear()
        return state


class DesiredStateHub:
    """The current desired state and the replicas that follow it (event loop thread only)."""

    def __init__(self, store: Store, metrics: ControlMetrics | None = None, online_store: str = "") -> None:
        self._store = store
        self._metrics = metrics
        self._online_store = online_store  # told to data planes with the feature definitions
        self._state: deployments_pb2.DesiredState | None = None
        self._replicas: dict[int, _Replica] = {}
        self._lock = asyncio.Lock()

    async def current(self) -> deployments_pb2.DesiredState:
        async with self._lock:
            if self._state is None:
                self._state = await self._read()
            return self._state

    async def _read(self) -> deployments_pb2.DesiredState:
        state = await asyncio.to_thread(self._store.desired_state)
        state.online_store = self._online_store
        return state

    async def changed(self) -> None:
        """Re-read the desired state and offer it to every attached replica."""
        async with self._lock:
            self._state = await self._read()
            if self._metrics is not None:
                self._metrics.desired_state_changes.inc()
            for replica in self._replicas.values():
                replica.offer(self._state)

    def register(self, replica: _Replica) -> None:
        self._replicas[id(replica)] = replica

    def unregister(self, replica: _Replica) -> None:
        self._replicas.pop(id(replica), None)

    def replicas(self) -> list[deployments_pb2.ReplicaInfo]:
        return sorted((replica.info for replica in self._replicas.values()), key=lambda info: info.replica_id)


class DataPlaneSyncService(deployments_pb2_grpc.DataPlaneSyncServicer):
    def __init__(
        self,
        hub: DesiredStateHub,
        on_records: Callable[[str, monitoring_pb2.InferenceRecords], Awaitable[None]] | None = None,
    ) -> None:
        self._hub = hub
        self._on_records = on_records  # sampled inference records, for drift monitoring

    async def Attach(
        self, request_iterator: AsyncIterator[deployments_pb2.DataPlaneMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[deployments_pb2.ControlPlaneMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "body: expected the first message to be a hello, got something else"
            )
        assert first is not None  # abort raised otherwise
        replica = _Replica(first.hello)
        self._hub.register(replica)
        log.info("data plane attached", extra={"replica": replica.info.replica_id, "address": replica.info.address})
        reader = asyncio.create_task(self._read(replica, request_iterator))
        try:
            yield deployments_pb2.ControlPlaneMessage(desired_state=await self._hub.current())
            while True:
                waiter = asyncio.create_task(replica.wakeup.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if reader.done():
                    return  # the replica closed its side (or went away)
                state = replica.take()
                if state is not None:
                    yield deployments_pb2.ControlPlaneMessage(desired_state=state)
        finally:
            self._hub.unregister(replica)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            log.info("data plane detached", extra={"replica": replica.info.replica_id})

    async def _read(self, replica: _Replica, request_iterator: AsyncIterator[deployments_pb2.DataPlaneMessage]) -> None:
        async for message in request_iterator:
            replica.info.last_heartbeat.FromDatetime(datetime.datetime.now(datetime.UTC))
            body = message.WhichOneof("body")
            if body == "status":
                replica.info.status.CopyFrom(message.status)
            elif body == "records" and self._on_records is not None:
                await self._on_records(replica.info.replica_id, message.records)
