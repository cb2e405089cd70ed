"""The feature store's online side, shared by both planes: the control plane writes it
(materialize, push), the data plane reads it to enrich requests. One format, two backends:

- Redis: one hash per (feature view, entity key), ``weir:fs:<view>:<entity key>``, a field per
  feature plus ``__event_ts`` (epoch seconds); reading a feature service for an entity is one
  pipelined round trip (an HMGET per view).
- Embedded SQLite (when no Redis is configured): one row per (view, entity key) with the values as
  JSON and the event time.

Values are kept as text in Redis (``int``/``float`` round-trip exactly through ``repr``) and decoded
by the view's declared dtypes on read. A write never replaces a newer value with an older one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import redis
import redis.asyncio

EVENT_TS = "__event_ts"
_DECODERS: dict[str, Callable[[str], object]] = {
    "INT64": int,
    "INT32": int,
    "FLOAT64": float,
    "FLOAT32": float,
    "BOOL": lambda text: text in ("1", "true", "True"),
    "STRING": str,
}


def entity_key(values: Sequence[object]) -> str:
    """The text of an entity's join-key values (one key: its value; several: joined by '|')."""
    return "|".join(str(value) for value in values)


def redis_key(view: str, key: str) -> str:
    return f"weir:fs:{view}:{key}"


def _encode(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


class OnlineStore(Protocol):
    def write(self, view: str, rows: Sequence[tuple[str, float, Mapping[str, object]]]) -> int: ...

    def read(
        self, key: str, views: Mapping[str, Mapping[str, str]]
    ) -> dict[str, tuple[float | None, dict[str, object]]]: ...

    def get_watermark(self, view: str) -> float | None: ...

    def set_watermark(self, view: str, until: float) -> None: ...

    def newest(self, view: str) -> float | None:
        """The latest event time written for ``view`` (its freshness)."""
        ...

    def ages(self, view: str, older_than: float) -> tuple[int, int, float | None]:
        """(entities of ``view`` online, how many have an event time before ``older_than``, the oldest
        event time): freshness across entities, not only the newest row."""
        ...

    def close(self) -> None: ...


class RedisOnlineStore:
    # Writes only when newer than what is stored: compare and set in one server-side step.
    _WRITE_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], '__event_ts')
if current and tonumber(current) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], '__event_ts', ARGV[1], unpack(ARGV, 2))
local newest = redis.call('GET', KEYS[2])
if not newest or tonumber(newest) < tonumber(ARGV[1]) then redis.call('SET', KEYS[2], ARGV[1]) end
if KEYS[3] then redis.call('ZADD', KEYS[3], ARGV[1], KEYS[1]) end
return 1
"""

    def __init__(self, url: str, timeout_seconds: float = 0.5) -> None:
        self._url = url
        self._timeout = timeout_seconds
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds)
        self._write_if_newer = self._client.register_script(self._WRITE_IF_NEWER)
        self._async_client: redis.asyncio.Redis | None = None  # made in the event loop that first reads

    async def read_async(
        self, key: str, views: Mapping[str, Mapping[str, str]]
    ) -> dict[str, tuple[float | None, dict[str, object]]]:
        """``read`` for an event loop (the data plane's): the same round trip without a thread hop."""
        if self._async_client is None:
            self._async_client = redis.asyncio.Redis.from_url(
                self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
            )
        pipeline = self._async_client.pipeline(transaction=False)
        for view, features in views.items():
            pipeline.hmget(redis_key(view, key), [EVENT_TS, *features])
        return self._decode(views, await pipeline.execute())

    async def aclose(self) -> None:
        """Close the event loop's client (``close`` closes the blocking one)."""
        if self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None

    def write(self, view: str, rows: Sequence[tuple[str, float, Mapping[str, object]]]) -> int:
        """(entity key, event time, values) rows; returns how many were newer and written."""
        pipeline = self._client.pipeline(transaction=False)
        for key, event_ts, values in rows:
            fields = [item for name, value in values.items() if value is not None for item in (name, _encode(value))]
            self._write_if_newer(
                keys=[redis_key(view, key), f"weir:fs:newest:{view}", f"weir:fs:ages:{view}"],
                args=[repr(float(event_ts)), *fields],
                client=pipeline,
            )
        return sum(int(result) for result in pipeline.execute())

    def read(
        self, key: str, views: Mapping[str, Mapping[str, str]]
    ) -> dict[str, tuple[float | None, dict[str, object]]]:
        """``views``: view -> {feature: dtype}. One round trip for every view."""
        return self.read_many([key], views)[0]

    def read_many(
        self, keys: Sequence[str], views: Mapping[str, Mapping[str, str]]
    ) -> list[dict[str, tuple[float | None, dict[str, object]]]]:
        """Several entities in one round trip (a batch of requests)."""
        pipeline = self._client.pipeline(transaction=False)
        for key in keys:
            for view, features in views.items():
                pipeline.hmget(redis_key(view, key), [EVENT_TS, *features])
        replies = iter(pipeline.execute())
        return [self._decode(views, [next(replies) for _ in views]) for _ in keys]

    @staticmethod
    def _decode(
        views: Mapping[str, Mapping[str, str]], replies: list[list[bytes | None]]
    ) -> dict[str, tuple[float | None, dict[str, object]]]:
        result = {}
        for (view, features), values in zip(views.items(), replies, strict=True):
            event_ts = float(values[0]) if values[0] is not None else None
            decoded = {
                name: (_DECODERS[dtype](raw.decode()) if raw is not None else None)
                for (name, dtype), raw in zip(features.items(), values[1:], strict=True)
            }
            result[view] = (event_ts, decoded)
        return result

    def get_watermark(self, view: str) -> float | None:
        value = self._client.get(f"weir:fs:watermark:{view}")
        return float(value) if value is not None else None

    def set_watermark(self, view: str, until: float) -> None:
        self._client.set(f"weir:fs:watermark:{view}", repr(float(until)))

    def newest(self, view: str) -> float | None:
        value = self._client.get(f"weir:fs:newest:{view}")
        return float(value) if value is not None else None

    def ages(self, view: str, older_than: float) -> tuple[int, int, float | None]:
        """From a sorted set of the view's keys by event time, kept by the write script (one round trip)."""
        ages = f"weir:fs:ages:{view}"
        pipeline = self._client.pipeline(transaction=False)
        pipeline.zcard(ages)
        pipeline.zcount(ages, "-inf", f"({older_than!r}" if older_than != float("-inf") else "-inf")
        pipeline.zrange(ages, 0, 0, withscores=True)
        count, stale, first = pipeline.execute()
        if older_than == float("-inf"):
            stale = 0
        return int(count), int(stale), float(first[0][1]) if first else None

    def close(self) -> None:
        self._client.close()


class SqliteOnlineStore:
    """The embedded online store: a SQLite file, for a setup without Redis."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS online (view TEXT NOT NULL, entity_key TEXT NOT NULL, "
                "event_ts REAL NOT NULL, value_json TEXT NOT NULL, PRIMARY KEY (view, entity_key))"
            )
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS watermarks (view TEXT PRIMARY KEY, until REAL NOT NULL)"
            )
            # ages() (freshness across entities) counts and finds the oldest from the index alone
            self._connection.execute("CREATE INDEX IF NOT EXISTS online_view_event_ts ON online (view, event_ts)")

    def write(self, view: str, rows: Sequence[tuple[str, float, Mapping[str, object]]]) -> int:
        written = 0
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                for key, event_ts, values in rows:
                    current = self._connection.execute(
                        "SELECT event_ts, value_json FROM online WHERE view = ? AND entity_key = ?", (view, key)
                    ).fetchone()
                    if current is not None and current[0] > event_ts:
                        continue
                    merged = {**(json.loads(current[1]) if current else {}), **{
                        name: value for name, value in values.items() if value is not None
                    }}  # fmt: skip
                    self._connection.execute(
                        "INSERT INTO online (view, entity_key, event_ts, value_json) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (view, entity_key) DO UPDATE SET event_ts = excluded.event_ts, "
                        "value_json = excluded.value_json",
                        (view, key, float(event_ts), json.dumps(merged, default=_json_default)),
                    )
                    written += 1
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
        return written

    def read(
        self, key: str, views: Mapping[str, Mapping[str, str]]
    ) -> dict[str, tuple[float | None, dict[str, object]]]:
        names = list(views)
        with self._lock:
            rows = self._connection.execute(
                f"SELECT view, event_ts, value_json FROM online WHERE entity_key = ? AND view IN "
                f"({', '.join('?' for _ in names)})",
                (key, *names),
            ).fetchall()
        found = {view: (event_ts, json.loads(text)) for view, event_ts, text in rows}
        result: dict[str, tuple[float | None, dict[str, object]]] = {}
        for view, features in views.items():
            event_ts, values = found.get(view, (None, {}))
            result[view] = (event_ts, {name: values.get(name) for name in features})
        return result

    def get_watermark(self, view: str) -> float | None:
        with self._lock:
            row = self._connection.execute("SELECT until FROM watermarks WHERE view = ?", (view,)).fetchone()
        return float(row[0]) if row else None

    def set_watermark(self, view: str, until: float) -> None:
        with self._lock:
            self._connection.execute(
                "INSERT INTO watermarks (view, until) VALUES (?, ?) ON CONFLICT (view) DO UPDATE SET until = "
                "excluded.until",
                (view, float(until)),
            )

    def newest(self, view: str) -> float | None:
        with self._lock:
            row = self._connection.execute("SELECT max(event_ts) FROM online WHERE view = ?", (view,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def ages(self, view: str, older_than: float) -> tuple[int, int, float | None]:
        with self._lock:
            row = self._connection.execute(
                "SELECT count(*), coalesce(sum(event_ts < ?), 0), min(event_ts) FROM online WHERE view = ?",
                (older_than, view),
            ).fetchone()
        return int(row[0]), int(row[1]), float(row[2]) if row[2] is not None else None

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the online store")


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_online_store(target: str) -> tuple[OnlineStore, str]:
    """A Redis URL or a SQLite file path -> the store, and a name for messages."""
    if target.startswith(REDIS_SCHEMES):
        return RedisOnlineStore(target), "Redis"
    return SqliteOnlineStore(Path(target)), f"SQLite {target}"
