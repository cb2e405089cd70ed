"""Readiness that reflects the database: the gRPC health service says NOT_SERVING while this control
plane cannot reach its database, and SERVING again once it can.

A control-plane replica without its database answers every RPC with an error and pushes nothing new
to its data planes, so a load balancer, a Kubernetes readiness probe (`grpc: {port: 8011}`) or a data
plane choosing among several control planes should send nobody to it meanwhile. The process itself
stays up (liveness is a separate question): the database usually comes back, and the replica with it.

The probe is a trivial query (``SELECT 1``) on a connection of its own, opened for each probe, so that
it measures whether a new connection to the database works now, not whether a pooled one still
looks alive. Every blocking step is bounded: the driver's connect timeout, and ``timeout_seconds`` on
the whole probe, which runs in a worker thread so that a database that hangs (a network partition
drops packets rather than refusing them) never blocks the event loop. At most one probe is in flight:
one that outlives its timeout counts as a failure and is waited for before the next starts, so a
partition never piles up threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from grpc_health.v1 import health, health_pb2
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ReadinessSettings:
    period_seconds: float = 2.0  # time between the end of one probe and the start of the next
    timeout_seconds: float = 3.0  # a probe slower than this counts as "database unreachable"

    def __post_init__(self) -> None:
        for name in ("period_seconds", "timeout_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"readiness {name}: expected a positive number of seconds, got {value!r}")


def probe_engine(database_url: str, timeout_seconds: float) -> Engine:
    """An engine that opens a fresh connection per probe (no pool), with a bounded connect."""
    if "://" not in database_url:  # a plain path is a SQLite file, as for the store
        database_url = f"sqlite:///{database_url}"
    if database_url.startswith("postgresql"):
        # libpq's connect_timeout is whole seconds and at least 2; statement_timeout bounds the
        # query on the server side (the thread's own wait bounds everything else).
        seconds = max(2, math.ceil(timeout_seconds))
        options = f"-c statement_timeout={int(timeout_seconds * 1000)}"
        return create_engine(
            database_url, poolclass=NullPool, connect_args={"connect_timeout": seconds, "options": options}
        )
    return create_engine(database_url, poolclass=NullPool, connect_args={"timeout": timeout_seconds})


class DatabaseReadiness:
    """Flips ``health_servicer``'s ``services`` between SERVING and NOT_SERVING with the database.

    ``start()`` after the server has set them SERVING; ``stop()`` before the server stops.
    """

    def __init__(
        self,
        database_url: str,
        health_servicer: health.aio.HealthServicer,
        services: Sequence[str],
        settings: ReadinessSettings | None = None,
    ) -> None:
        self.settings = settings or ReadinessSettings()
        self._engine = probe_engine(database_url, self.settings.timeout_seconds)
        self._health = health_servicer
        self._services = tuple(services)
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self.reachable = True  # what the services were last set to (the server starts them SERVING)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="weir-database-readiness")

    async def stop(self) -> None:
        for task in (self._task, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._probe = None
        # a probe thread still blocked in the driver ends at its connect timeout; NullPool keeps
        # nothing else open
        await asyncio.to_thread(self._engine.dispose)

    async def check_once(self) -> bool:
        """Run (or keep waiting for) one probe; set the health status from its outcome."""
        if self._probe is None:
            self._probe = asyncio.create_task(asyncio.to_thread(self._select_one), name="weir-database-probe")
        done, _ = await asyncio.wait({self._probe}, timeout=self.settings.timeout_seconds)
        if not done:
            await self._set(False, f"no answer within {self.settings.timeout_seconds:g} s")
            return False  # the same probe is waited for next time: one in flight at most
        probe, self._probe = self._probe, None
        error = probe.exception()
        await self._set(error is None, f"{type(error).__name__}: {error}" if error is not None else "")
        return error is None

    def _select_one(self) -> None:
        with self._engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    async def _set(self, reachable: bool, reason: str) -> None:
        if reachable == self.reachable:
            return
        self.reachable = reachable
        status = SERVING if reachable else NOT_SERVING
        for name in self._services:
            await self._health.set(name, status)
        if reachable:
            log.warning("database reachable again: health SERVING")
        else:
            log.warning("database unreachable: health NOT_SERVING", extra={"reason": reason[:500]})

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.settings.period_seconds)
