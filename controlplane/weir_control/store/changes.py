"""Hearing of desired-state revisions committed by any process on the database.

A change that alters what data planes serve bumps the desired-state revision inside its own
transaction (``db.bump_revision``). ``RevisionWatch`` wakes whoever waits on it when the revision
may have moved:

- at once for a commit through this process (the store's after-commit listener);
- within milliseconds for a commit through another process on PostgreSQL (``LISTEN
  weir_desired_state``; the bumping transaction's ``NOTIFY`` is delivered at its commit);
- at the latest after ``poll_seconds`` whatever happens (polling the revision counter: the fallback
  when a notification is lost or the listening connection is down, and the only way on SQLite).

It never reads the revision itself: the waiter does (one single-row read, ``Store.current_revision``)
and re-reads the desired state only when that changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from weir_control.store.db import REVISION_CHANNEL, Database

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # the longest a change through another replica waits to be seen without NOTIFY
LISTEN_RETRY_SECONDS = 1.0  # after the listening connection fails
_LISTEN_TIMEOUT = 0.25  # how often the listening thread checks whether it should stop


class RevisionWatch:
    """Wakes ``wait()`` when the desired-state revision may have changed (event loop thread only,
    between ``start()`` and ``stop()``)."""

    def __init__(self, store: Database, poll_seconds: float = POLL_SECONDS) -> None:
        self._store = store
        self._poll_seconds = poll_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nudged: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._nudged = asyncio.Event()
        self._stopping.clear()
        self._store.add_revision_listener(self._committed)
        if self._store.engine.dialect.name == "postgresql":
            self._listener = threading.Thread(target=self._listen, name="weir-revision-listen", daemon=True)
            self._listener.start()

    async def stop(self) -> None:
        self._store.remove_revision_listener(self._committed)
        self._stopping.set()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join)  # it checks _stopping every _LISTEN_TIMEOUT
            self._listener = None

    async def wait(self) -> None:
        """Return when nudged (a commit here, a notification) or after the poll interval."""
        assert self._nudged is not None, "RevisionWatch.start() first"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._nudged.wait(), self._poll_seconds)
        self._nudged.clear()

    def nudge(self) -> None:
        """Wake the waiter now (event loop thread)."""
        if self._nudged is not None:
            self._nudged.set()

    def _committed(self, _revision: int) -> None:
        """The store's after-commit listener: runs on the committing thread."""
        self._from_thread()

    def _from_thread(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self.nudge)

    def _listen(self) -> None:
        """PostgreSQL LISTEN in a thread of its own (psycopg, autocommit): every notification on the
        channel nudges the waiter. A failed connection is logged once and retried; polling covers
        the gap."""
        import psycopg  # only PostgreSQL stores come here

        url = self._store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        failing = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f"LISTEN {REVISION_CHANNEL}")
                    if failing:
                        log.info("listening for desired-state revisions again")
                        failing = False
                    self._from_thread()  # anything committed while not listening: the waiter looks
                    while not self._stopping.is_set():
                        for _ in connection.notifies(timeout=_LISTEN_TIMEOUT):
                            self._from_thread()
            except Exception as error:
                if not failing:
                    log.warning(
                        "cannot listen for desired-state revisions; polling every %.1f s until it can",
                        self._poll_seconds,
                        extra={"error": str(error)},
                    )
                    failing = True
                self._stopping.wait(LISTEN_RETRY_SECONDS)
