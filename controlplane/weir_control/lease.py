"""A lease for the singleton work of several control-plane replicas, with a fencing token.

Every replica serves every RPC; the work that must happen once (rollout analysis and steps, the
training job queue, drift windows and actions) runs only on the replica holding the lease. The
lease is a row of ``leases``: its holder, its fencing token and when it expires. A holder renews it
every ttl/3; a replica that finds it expired takes it over with a conditional UPDATE, which also
increments the token (a new term). A killed holder is replaced within ttl + ttl/3.

Holding the lease is not enough to act: a holder that stalls (GC pause, a stuck disk, a network
partition) may wake up after another replica took over. So every singleton side effect is written
in one store transaction that starts with ``fence(connection)``: it locks the lease row (PostgreSQL
``FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` already serialises writers) and checks that this
holder's term (holder and token) is still the current, unexpired one, else raises ``LostLease`` and
nothing of the transaction commits. A takeover's UPDATE waits for that row lock, so a fenced change
either commits before the new term begins or not at all.

Time: expiry is decided on the database's clock (``db_now``), never on the replicas' own clocks:
replicas on different hosts may disagree by seconds, and a lease judged on two clocks can be held by
two replicas at once. The holder's own belief that it still holds the lease runs on its monotonic
clock, from *before* it sent the renewal, for less than the ttl: it gives the lease up locally
before the database lets anyone else take it (assuming the clocks tick at the same rate, which NTP
slews do not break at this scale), and the fence catches whatever slips through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Connection, case, literal_column, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.elements import ColumnElement

from weir_control.store import Store
from weir_control.store.schema import LEASES
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError

log = logging.getLogger(__name__)

SINGLETON = "singleton"  # the one lease all singleton work of a control plane runs under
DEFAULT_TTL_SECONDS = 6.0  # a dead holder is replaced within 6 + 2 s (issue 16: within 10 s)
MIN_TTL_SECONDS = 0.5
MAX_TTL_SECONDS = 600.0
LOCAL_SHARE = 0.8  # the holder believes in its lease for this share of the ttl after a renewal began


class LostLease(FailedPreconditionError):
    """This replica does not hold the lease (any more): the singleton side effect was not applied."""


def default_replica_id() -> str:
    """Unique per process: two replicas on one host (or a restarted one) never share a term by accident."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def check_ttl(seconds: float) -> float:
    if not MIN_TTL_SECONDS <= seconds <= MAX_TTL_SECONDS:
        raise InvalidArgumentError(
            f"lease_seconds: expected {MIN_TTL_SECONDS:g} to {MAX_TTL_SECONDS:g} seconds, got {seconds:g}"
        )
    return seconds


def db_now(connection: Connection) -> ColumnElement[Any]:
    """Seconds since the epoch on the database server's clock (float), as an SQL expression.
    PostgreSQL: ``clock_timestamp()``, the time of the statement (``now()`` is the transaction's start)."""
    if connection.dialect.name == "postgresql":
        return literal_column("extract(epoch from clock_timestamp())::float8")
    return literal_column("((julianday('now') - 2440587.5) * 86400.0)")


def read_lease(connection: Connection, name: str) -> tuple[str, int, float, float] | None:
    """(holder, token, expires_at, database now) of a lease, None when it was never taken."""
    row = connection.execute(
        select(LEASES.c.holder, LEASES.c.token, LEASES.c.expires_at, db_now(connection)).where(LEASES.c.name == name)
    ).first()
    return None if row is None else (row[0], int(row[1]), float(row[2]), float(row[3]))


def try_acquire(connection: Connection, name: str, holder: str, token: int, ttl: float) -> int | None:
    """Take or renew the lease in one conditional UPDATE; the token of the term held, or None.

    Renewal keeps the token only when this holder's own term (``token``) is still current and
    unexpired; anything else that succeeds (a free or expired lease, or this holder's expired term)
    starts a new term with the next token."""
    insert = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
    connection.execute(
        insert(LEASES)
        .values(name=name, holder="", token=0, expires_at=0.0)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    now = db_now(connection)
    renewing = (LEASES.c.holder == holder) & (LEASES.c.token == token) & (LEASES.c.expires_at > now)
    result = connection.execute(
        update(LEASES)
        .where(LEASES.c.name == name, renewing | (LEASES.c.expires_at <= now))
        .values(
            holder=holder,
            token=case((renewing, LEASES.c.token), else_=LEASES.c.token + 1),
            expires_at=now + ttl,
        )
        .returning(LEASES.c.token)
    )
    row = result.first()
    return None if row is None else int(row[0])


def take_from(connection: Connection, name: str, holder: str, dead: str, dead_token: int, ttl: float) -> int | None:
    """Start a new term now, over the unexpired term ``dead_token`` of ``dead`` (a holder known dead:
    see ``LeaseKeeper.take_over_from``); the new token, or None when the lease changed meanwhile."""
    now = db_now(connection)
    row = connection.execute(
        update(LEASES)
        .where(LEASES.c.name == name, LEASES.c.holder == dead, LEASES.c.token == dead_token)
        .values(holder=holder, token=LEASES.c.token + 1, expires_at=now + ttl)
        .returning(LEASES.c.token)
    ).first()
    return None if row is None else int(row[0])


def release(connection: Connection, name: str, holder: str, token: int) -> bool:
    """End this holder's term now (a clean stop): another replica takes over at its next try."""
    result = connection.execute(
        update(LEASES)
        .where(LEASES.c.name == name, LEASES.c.holder == holder, LEASES.c.token == token)
        .values(expires_at=0.0)
    )
    return bool(result.rowcount)


def check_term(connection: Connection, name: str, holder: str, token: int) -> None:
    """Lock the lease row and check the term is current and unexpired (LostLease otherwise)."""
    query = select(LEASES.c.token).where(
        LEASES.c.name == name,
        LEASES.c.holder == holder,
        LEASES.c.token == token,
        LEASES.c.expires_at > db_now(connection),
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    if connection.execute(query).first() is None:
        found = read_lease(connection, name)
        now = found[3] if found else 0.0
        who = "nobody" if found is None else f"'{found[0]}' term {found[1]} (expires in {found[2] - now:.1f} s)"
        raise LostLease(
            f"lease '{name}': replica '{holder}' term {token} is no longer current (now held by {who}); "
            "the change was not applied"
        )


class LeaseKeeper:
    """Acquires and renews one lease for this replica (``run``), says whether it holds it (``held``,
    ``token``, ``changed`` callbacks), fences singleton side effects (``fence``) and runs singleton
    work only while held (``singleton``)."""

    def __init__(
        self,
        store: Store,
        holder: str,
        name: str = SINGLETON,
        ttl: float = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.holder = holder
        self.name = name
        self.ttl = check_ttl(ttl)
        self._clock = clock
        self.token = 0  # the current term's fencing token while held (the last one after a loss)
        self._valid_until = 0.0  # local monotonic deadline of the belief
        self._held = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost.set()
        self._listeners: list[Callable[[bool], None]] = []
        self.terms = 0  # terms this keeper began (for logs and tests)

    # --- state -----------------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Held now: taken or renewed less than ``LOCAL_SHARE`` x ttl ago (local monotonic clock)."""
        return self._held.is_set() and self._clock() < self._valid_until

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """``listener(held)`` on the event loop whenever the lease is gained or lost."""
        self._listeners.append(listener)

    async def wait_held(self) -> None:
        await self._held.wait()

    async def wait_lost(self) -> None:
        await self._lost.wait()

    def fence(self, connection: Connection) -> None:
        """Call first inside the store transaction of a singleton side effect: raises LostLease
        (nothing of the transaction commits) unless this replica's term is still the current one."""
        if not self.held:
            raise LostLease(
                f"lease '{self.name}': replica '{self.holder}' does not hold it; the change was not applied"
            )
        check_term(connection, self.name, self.holder, self.token)

    # --- the loop --------------------------------------------------------------------------------

    async def acquire_once(self) -> bool:
        """One try at taking or renewing the lease; whether it is held afterwards."""
        began = self._clock()
        try:
            token = await asyncio.to_thread(self._try, self.token if self._held.is_set() else -1)
        except Exception:  # the database did not answer: the local deadline decides
            log.exception("lease renewal failed (database unreachable?)", extra={"lease": self.name})
            if self._held.is_set() and self._clock() >= self._valid_until:
                self._set(False)
            return self.held
        if token is None:  # the database answered: the lease is another replica's (or this term expired)
            if self._held.is_set():
                self._set(False)
            return False
        gained = not self._held.is_set() or token != self.token
        self.token, self._valid_until = token, began + self.ttl * LOCAL_SHARE
        if gained:
            self._set(True)
        return self.held

    async def take_over_from(self, dead: str, dead_token: int) -> bool:
        """Take the lease now from a holder known to be dead (a replica restarted after kill -9 finds
        its previous process's term, on this host, with its port closed) instead of waiting out its
        ttl. The fence still guards: were it alive after all, its writes would be refused."""
        began = self._clock()

        def take() -> int | None:
            with self._store.engine.begin() as connection:
                return take_from(connection, self.name, self.holder, dead, dead_token, self.ttl)

        token = await asyncio.to_thread(take)
        if token is None:
            return False
        self.token, self._valid_until = token, began + self.ttl * LOCAL_SHARE
        log.warning("lease taken from a dead holder", extra={"lease": self.name, "dead": dead, "token": token})
        self._set(True)
        return True

    def current(self) -> tuple[str, int, float, float] | None:
        """(holder, token, expires_at, database now) of the lease (worker thread)."""
        with self._store.engine.begin() as connection:
            return read_lease(connection, self.name)

    def _try(self, token: int) -> int | None:
        with self._store.engine.begin() as connection:  # its own transaction, never a caller's
            return try_acquire(connection, self.name, self.holder, token, self.ttl)

    async def run(self) -> None:
        """Acquire and renew until cancelled (then release the lease if held, so another replica
        takes over at once)."""
        try:
            while True:
                await self.acquire_once()
                pause = self.ttl / 3
                if self._held.is_set():  # wake for the local deadline too, if renewals keep failing
                    pause = max(0.01, min(pause, self._valid_until - self._clock()))
                await asyncio.sleep(pause)
                if self._held.is_set() and self._clock() >= self._valid_until:
                    self._set(False)
        finally:
            if self._held.is_set():
                self._set(False, stopping=True)
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.to_thread(self._release))

    def _release(self) -> None:
        with self._store.engine.begin() as connection:
            if release(connection, self.name, self.holder, self.token):
                log.info("lease released", extra={"lease": self.name, "holder": self.holder, "token": self.token})

    def _set(self, held: bool, stopping: bool = False) -> None:
        if held:
            self.terms += 1
            self._lost.clear()
            self._held.set()
            log.info("lease acquired", extra={"lease": self.name, "holder": self.holder, "token": self.token})
        else:
            self._held.clear()
            self._lost.set()
            if not stopping:  # a clean stop says "lease released" instead
                log.warning("lease lost", extra={"lease": self.name, "holder": self.holder, "token": self.token})
        for listener in list(self._listeners):
            try:
                listener(held)
            except Exception:
                log.exception("lease listener failed", extra={"lease": self.name})

    async def singleton(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work()`` while the lease is held: started on every gain, cancelled (and awaited) on
        every loss, until this coroutine is cancelled. ``work`` returning or failing ends it for this
        term (a failure is logged)."""
        while True:
            await self._held.wait()
            task = asyncio.ensure_future(work())
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lost
                with contextlib.suppress(asyncio.CancelledError):
                    try:
                        await task
                    except Exception:
                        log.exception("singleton work failed", extra={"work": name})
            if self._held.is_set():  # it returned by itself: wait for the next term
                await self._lost.wait()
