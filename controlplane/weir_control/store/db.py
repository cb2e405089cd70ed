"""The store's shared machinery: the engine, units of work (transactions every store call on the
thread joins), retries of write conflicts, upsert, paging tokens, name checks and the desired-state
revision with its change signal.

Every change that alters what data planes serve bumps the desired-state revision inside its own
transaction (``bump_revision``). At commit the revision is announced twice: in-process to the
listeners registered with ``Database.add_revision_listener`` (the attach hub of this replica), and,
on PostgreSQL, with ``NOTIFY weir_desired_state`` to every replica's hub (delivered only if the
transaction commits). Callers never notify anyone by hand.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from weir_control.domain.names import MAX_NAME_LENGTH as MAX_NAME_LENGTH
from weir_control.domain.names import check_name as check_name
from weir_control.domain.names import shown
from weir_control.store import migrations
from weir_control.store.schema import COUNTERS
from weir_proto.errors import InvalidArgumentError

_check_name = check_name  # the store's modules' name for it
_shown = shown

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DESIRED_STATE_REVISION = "desired_state_revision"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_store_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            # WAL: readers never wait for the writer; foreign keys are off by default in SQLite.
            # isolation_level None hands transactions to the "begin" hook below.
            connection.isolation_level = None
            cursor = connection.cursor()
            _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # IMMEDIATE: take the write lock at the start, so two writers serialise instead of one
            # failing at commit ("database is locked" after a read-then-write). A read-only look
            # (the revision poll) takes no lock: WAL readers never wait.
            read_only = connection.get_execution_options().get(_READ_ONLY)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _enable_wal(cursor: Any) -> None:
    """WAL persists in the file; switching to it needs a moment alone with the database, which a
    process opening the same new file at the same time may not give at once (no busy handler there)."""
    for attempt in range(50):
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as error:  # sqlite3.OperationalError: database is locked
            if "locked" not in str(error) or attempt == 49:
                raise
            time.sleep(0.05)


REVISION_CHANNEL = "weir_desired_state"  # PostgreSQL NOTIFY channel: payload = the committed revision
_READ_ONLY = "weir_read_only"  # execution option: a SQLite read that takes no write lock
_BUMPED = "weir_bumped_revision"  # connection.info key: the revision this transaction bumped to
_CONFLICT_STATES = {"40001", "40P01"}  # PostgreSQL serialization failure, deadlock detected
_ATTEMPTS = 8


class Database:
    """An engine with units of work. The aggregate record classes (registry, deployments, ...)
    derive from it; ``weir_control.store.Store`` combines them over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ambient = threading.local()  # .connection: the transaction this thread is inside, if any
        self._revision_listeners: list[Callable[[int], None]] = []
        self.schema_version_applied = migrations.migrate(engine.begin)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One unit of work: every Store method this thread calls inside the block joins it, so its
        rows commit together at the end of the block or, on an exception, none do. Nested blocks
        join the outermost one. On SQLite the write lock is taken at the start (BEGIN IMMEDIATE).

        Let errors leave the block: a statement that failed inside it leaves a PostgreSQL
        transaction unusable, so catching a store error and carrying on inside the block fails later.
        A write conflict (PostgreSQL serialization failure or deadlock) leaves the block as a
        DBAPIError: ``atomically`` reruns a block that can be rerun.
        """
        joined = getattr(self._ambient, "connection", None)
        if joined is not None:
            yield joined
            return
        with self.engine.begin() as connection:
            connection.info.pop(_BUMPED, None)  # the pooled connection's info outlives a transaction
            self._ambient.connection = connection
            try:
                yield connection
                bumped = connection.info.pop(_BUMPED, None)
            finally:
                self._ambient.connection = None
        if bumped is not None:  # committed
            self._announce(bumped)

    _transaction = transaction

    def in_transaction(self) -> bool:
        """Whether this thread is inside ``transaction()`` (a retry cannot rerun the caller's block)."""
        return getattr(self._ambient, "connection", None) is not None

    def atomically(self, work: Callable[[Connection], T]) -> T:
        """``work(connection)`` in one unit of work, rerun (a few times, with jittered backoff) when
        it meets a write conflict another transaction caused; inside a caller's transaction it joins
        that one and is not rerun (the caller's block would have to be)."""
        if self.in_transaction():
            with self.transaction() as connection:
                return work(connection)
        for attempt in range(_ATTEMPTS):
            try:
                with self.transaction() as connection:
                    return work(connection)
            except DBAPIError as error:
                if not is_write_conflict(error) or attempt == _ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise AssertionError("unreachable")

    def current_revision(self) -> int:
        """The committed desired-state revision: one single-row read, no write lock (the hubs poll it)."""
        with self.engine.connect().execution_options(**{_READ_ONLY: True}) as connection:
            value = connection.execute(
                select(COUNTERS.c.value).where(COUNTERS.c.name == DESIRED_STATE_REVISION)
            ).scalar()
            connection.rollback()
        return int(value or 0)

    def add_revision_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(revision)`` after each commit through this store that bumped the revision,
        on the committing thread (keep it short; hop to an event loop with call_soon_threadsafe)."""
        self._revision_listeners.append(listener)

    def remove_revision_listener(self, listener: Callable[[int], None]) -> None:
        if listener in self._revision_listeners:
            self._revision_listeners.remove(listener)

    def _announce(self, revision: int) -> None:
        for listener in list(self._revision_listeners):
            try:
                listener(revision)
            except Exception:  # a listener's failure must not fail a committed change
                log.exception("desired-state revision listener failed")

    def _upsert(self, connection: Connection, table: Any, key: dict[str, Any], values: dict[str, Any]) -> None:
        upsert(connection, table, key, values)


def retried(method: Callable[P, T]) -> Callable[P, T]:
    """A store method that is one unit of work by itself: rerun on a write conflict (PostgreSQL
    serialization failure or deadlock, SQLite busy), unless it runs inside a caller's transaction."""

    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        database = args[0]
        assert isinstance(database, Database)
        if database.in_transaction():
            return method(*args, **kwargs)
        for attempt in range(_ATTEMPTS):
            try:
                return method(*args, **kwargs)
            except DBAPIError as error:
                if not is_write_conflict(error) or attempt == _ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise AssertionError("unreachable")

    return run


def is_write_conflict(error: DBAPIError) -> bool:
    """A conflict with another transaction that a rerun resolves (not a broken request)."""
    state = getattr(error.orig, "sqlstate", None)
    return state in _CONFLICT_STATES or "database is locked" in str(error.orig)


def upsert(connection: Connection, table: Any, key: dict[str, Any], values: dict[str, Any]) -> None:
    """Insert the row with ``key`` or update it, in one statement (ON CONFLICT on the key, which
    must be the table's primary key or unique): two writers racing for a new key never collide."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(**key, **values)
    connection.execute(statement.on_conflict_do_update(index_elements=list(key), set_=values))


def bump_revision(connection: Connection) -> int:
    """Advance the desired-state revision in the caller's transaction and return it. The counter
    row's lock orders concurrent changes (revisions strictly increase in commit order); at commit
    the new revision is announced (in-process listeners, and NOTIFY on PostgreSQL)."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(COUNTERS)
        .values(name=DESIRED_STATE_REVISION, value=1)
        .on_conflict_do_update(index_elements=["name"], set_={"value": COUNTERS.c.value + 1})
        .returning(COUNTERS.c.value)
    )
    revision = int(connection.execute(statement).scalar_one())
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_notify(:channel, :revision)"), {"channel": REVISION_CHANNEL, "revision": str(revision)}
        )
    connection.info[_BUMPED] = revision
    return revision


MAX_SEARCH_TEXT = 256  # name_contains and similar search strings
MAX_TAGS = 64  # set in one call
MAX_DESCRIPTION = 65_536  # a model's or version's description


def _check_metrics(metrics: Mapping[str, float]) -> None:
    if len(metrics) > MAX_TAGS:
        raise InvalidArgumentError(f"metrics: expected at most {MAX_TAGS}, got {len(metrics)}")
    for name, value in metrics.items():
        if not name or len(name) > MAX_SEARCH_TEXT or any(ord(c) < 32 for c in name):
            raise InvalidArgumentError(
                f"metrics name: expected 1-{MAX_SEARCH_TEXT} characters without control characters, got {_shown(name)}"
            )
        if not math.isfinite(value):
            raise InvalidArgumentError(f"metrics '{name}': expected a finite number, got {value}")


def _check_description(description: str | None) -> None:
    if description is not None and len(description) > MAX_DESCRIPTION:
        raise InvalidArgumentError(
            f"description: expected at most {MAX_DESCRIPTION} characters, got {len(description)}"
        )


def _check_tag_filters(tags: Mapping[str, str]) -> None:
    if len(tags) > 32 or any(len(key) > MAX_SEARCH_TEXT or len(value) > 1024 for key, value in tags.items()):
        raise InvalidArgumentError(
            f"tags: expected at most 32 tag filters, keys of at most {MAX_SEARCH_TEXT} characters and values of "
            f"at most 1024, got {len(tags)} filter(s)"
        )


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgumentError(f"page_size: expected 0 (default {DEFAULT_PAGE_SIZE}) or more, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_token(position: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def _decode_token(token: str) -> list[Any] | None:
    if not token:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(
            "page_token: expected a token from a previous response, got another string"
        ) from error
    if not isinstance(position, list) or not position:
        raise InvalidArgumentError("page_token: expected a token from a previous response, got another string")
    return position


def _utc(value: datetime.datetime) -> datetime.datetime:
    # SQLite hands timestamps back without their zone; they were stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
