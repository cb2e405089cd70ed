"""What the data planes attached to every control-plane replica report, in the database.

Data planes attach to any replica, but rollout analysis runs only on the lease holder. So every
replica writes, about once a second, the accepted status of each of its attach streams (the bounded
counters ``attach.ReplicaStream`` keeps, with the stream's name and the token identity it attached
as) to ``replica_reports``, and the holder's rollout controller reads every replica's rows: the
per-stream and per-identity weighting of ``rollout_analysis.interval_totals`` / ``robust_verdict`` stays as
it was, over the streams of all replicas. A row not refreshed for ``STALE_AFTER_SECONDS`` (its
replica died, or the stream closed and the replica with it) is ignored and deleted; a data plane
that moves to another replica is a new stream there, whose first look counts nothing (as a
reattach always did).

Each replica also records itself in ``control_replicas`` (its address, refreshed with the reports):
training jobs are told every live replica's address, so they keep reporting when the replica that
launched them dies.

Times are the database's clock (``lease.db_now``): replicas' clocks may differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update

from weir_control.attach import ReplicaStream
from weir_control.lease import db_now
from weir_control.store import Store
from weir_control.store.schema import CONTROL_REPLICAS, REPLICA_REPORTS
from weir_proto.control.v1 import deployments_pb2

log = logging.getLogger(__name__)

PUBLISH_SECONDS = 1.0
STALE_AFTER_SECONDS = 5.0


@dataclass(frozen=True)
class ReportedStream:
    """One attach stream as persisted: what ``rollout_analysis.collect`` reads of a ReplicaStream."""

    stream: str
    identity: str
    info: deployments_pb2.ReplicaInfo


class ReplicaReports:
    def __init__(
        self,
        store: Store,
        control_replica: str,
        streams: Callable[[], list[ReplicaStream]],
        address: str = "",
    ) -> None:
        self._store = store
        self.control_replica = control_replica
        self._streams = streams  # the hub's attach streams (event loop thread only)
        self.address = address

    # --- writing ---------------------------------------------------------------------------------

    def snapshot(self) -> list[ReportedStream]:
        """This replica's streams now (on the event loop: the hub is not thread-safe)."""
        snapshot = []
        for replica in self._streams():
            info = deployments_pb2.ReplicaInfo()
            info.CopyFrom(replica.info)
            snapshot.append(ReportedStream(f"{self.control_replica}/{replica.stream}", replica.identity, info))
        return snapshot

    def publish(self, streams: list[ReportedStream]) -> None:
        """Replace this replica's rows with ``streams``, refresh its presence, drop anyone's stale rows."""
        with self._store.transaction() as connection:
            now = db_now(connection)
            connection.execute(delete(REPLICA_REPORTS).where(REPLICA_REPORTS.c.control_replica == self.control_replica))
            connection.execute(delete(REPLICA_REPORTS).where(REPLICA_REPORTS.c.updated_at < now - STALE_AFTER_SECONDS))
            for stream in streams:
                connection.execute(
                    insert(REPLICA_REPORTS).values(
                        stream=stream.stream, control_replica=self.control_replica, identity=stream.identity,
                        info=stream.info.SerializeToString(), updated_at=now,
                    )
                )  # fmt: skip
            if self.address:
                found = connection.execute(
                    update(CONTROL_REPLICAS)
                    .where(CONTROL_REPLICAS.c.replica == self.control_replica)
                    .values(address=self.address, updated_at=now)
                )
                if not found.rowcount:
                    connection.execute(
                        insert(CONTROL_REPLICAS).values(
                            replica=self.control_replica, address=self.address, updated_at=now
                        )
                    )
            connection.execute(
                delete(CONTROL_REPLICAS).where(CONTROL_REPLICAS.c.updated_at < now - STALE_AFTER_SECONDS)
            )

    def forget(self) -> None:
        """A clean stop: this replica's rows go at once (its data planes reattach elsewhere)."""
        with self._store.transaction() as connection:
            connection.execute(delete(REPLICA_REPORTS).where(REPLICA_REPORTS.c.control_replica == self.control_replica))
            connection.execute(delete(CONTROL_REPLICAS).where(CONTROL_REPLICAS.c.replica == self.control_replica))

    async def run(self, period: float = PUBLISH_SECONDS) -> None:
        """Publish every ``period`` until cancelled, then forget this replica's rows."""
        try:
            while True:
                try:
                    await asyncio.to_thread(self.publish, self.snapshot())
                except Exception:  # the database may be away for a while: try again next period
                    log.exception("could not publish the data planes' reports")
                await asyncio.sleep(period)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.to_thread(self.forget))

    # --- reading ---------------------------------------------------------------------------------

    def read(self) -> list[ReportedStream]:
        """Every replica's fresh streams (worker thread)."""
        with self._store.transaction() as connection:
            rows = connection.execute(
                select(REPLICA_REPORTS.c.stream, REPLICA_REPORTS.c.identity, REPLICA_REPORTS.c.info)
                .where(REPLICA_REPORTS.c.updated_at >= db_now(connection) - STALE_AFTER_SECONDS)
                .order_by(REPLICA_REPORTS.c.stream)
            ).all()
        return [ReportedStream(row[0], row[1], deployments_pb2.ReplicaInfo.FromString(row[2])) for row in rows]

    def address_of(self, replica: str) -> str:
        """A replica's published address ("" when it has none) (worker thread)."""
        with self._store.transaction() as connection:
            found = connection.execute(
                select(CONTROL_REPLICAS.c.address).where(CONTROL_REPLICAS.c.replica == replica)
            ).scalar()
        return str(found or "")

    def other_replicas(self) -> list[deployments_pb2.ReplicaInfo]:
        """The data planes attached to the other control-plane replicas, as they last published them
        (ListReplicas: this replica's own come from its hub, live) (worker thread)."""
        with self._store.transaction() as connection:
            rows = connection.execute(
                select(REPLICA_REPORTS.c.info).where(
                    REPLICA_REPORTS.c.control_replica != self.control_replica,
                    REPLICA_REPORTS.c.updated_at >= db_now(connection) - STALE_AFTER_SECONDS,
                )
            ).all()
        return [deployments_pb2.ReplicaInfo.FromString(row[0]) for row in rows]

    def others_alive(self, timeout: float = 0.5) -> bool:
        """Whether another replica published within STALE_AFTER_SECONDS and still accepts connections
        at its address (a replica killed a moment ago still has a fresh row; its port is closed)
        (worker thread)."""
        with self._store.transaction() as connection:
            rows = connection.execute(
                select(CONTROL_REPLICAS.c.address).where(
                    CONTROL_REPLICAS.c.replica != self.control_replica,
                    CONTROL_REPLICAS.c.updated_at >= db_now(connection) - STALE_AFTER_SECONDS,
                )
            ).all()
        return any(_reachable(row[0], timeout) for row in rows)

    def addresses(self) -> list[str]:
        """The live replicas' addresses, this one first (worker thread)."""
        with self._store.transaction() as connection:
            rows = connection.execute(
                select(CONTROL_REPLICAS.c.replica, CONTROL_REPLICAS.c.address)
                .where(CONTROL_REPLICAS.c.updated_at >= db_now(connection) - STALE_AFTER_SECONDS)
                .order_by(CONTROL_REPLICAS.c.replica)
            ).all()
        mine = [self.address] if self.address else []
        return mine + [address for replica, address in rows if replica != self.control_replica and address not in mine]


def dead_here(address: str) -> bool:
    """A replica address on this host (loopback) whose port refuses connections: its process is gone
    (on another host a refused or unanswered connection proves nothing: a partition looks the same)."""
    host = address.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost") and not _reachable(address, 0.5)


def _reachable(address: str, timeout: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
