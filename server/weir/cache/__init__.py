"""The response cache: an in-process LRU in front of an optional Redis shared by replicas.

Entries live in a namespace per model version (e.g. ``"mlp_classifier/3"``), in both tiers, so a
new version never answers with an old version's entries. Keys come from
``weir.cache.keys.response_cache_key``; values are opaque bytes (the data plane decides their
encoding).

Hits and misses are counted here, once per lookup; see ``weir.cache.metrics`` for the rest.
"""

from __future__ import annotations

import asyncio
import logging
import struct

from weir.cache.keys import response_cache_key
from weir.cache.local import LocalResponseCache
from weir.cache.metrics import CacheMetrics
from weir.cache.redis_cache import RedisResponseCache

__all__ = [
    "CacheMetrics",
    "LocalResponseCache",
    "RedisResponseCache",
    "ResponseCache",
    "response_cache_key",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_WRITES = 1000

_NAMESPACE_LENGTH = struct.Struct("<I")


class ResponseCache:
    """Both tiers behind one ``lookup`` / ``store``. It owns them: ``aclose`` closes the Redis
    client. Metrics go to the local tier's ``CacheMetrics``. Used from the event loop thread only,
    like the local tier."""

    def __init__(
        self,
        local: LocalResponseCache,
        redis: RedisResponseCache | None,
        *,
        max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES,
    ) -> None:
        if max_pending_writes < 1:
            raise ValueError(f"max_pending_writes: expected at least 1, got {max_pending_writes}")
        self.local = local
        self.redis = redis
        self.metrics = local.metrics
        self.max_pending_writes = max_pending_writes
        self._local_hits = self.metrics.hits.labels("local")  # bound once: no label lookup per hit
        self._redis_hits = self.metrics.hits.labels("redis")
        # Strong references: the event loop keeps only weak ones to tasks, and an unreferenced
        # write could be garbage-collected mid-flight.
        self._pending_writes: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending_writes(self) -> int:
        """Background Redis writes started and not yet finished."""
        return len(self._pending_writes)

    def lookup_local(self, namespace: str, key: bytes) -> bytes | None:
        """The in-process tier alone, without a coroutine: a local hit is the hot path. On None,
        finish with ``lookup_shared`` (which counts the miss)."""
        value = self.local.get(_local_key(namespace, key))
        if value is not None:
            self._local_hits.inc()
        return value

    async def lookup_shared(self, namespace: str, key: bytes) -> bytes | None:
        """After a local miss: Redis, if configured. Counts the hit or the miss of the lookup."""
        if self.redis is not None:
            value = await self.redis.get(namespace, key)
            if value is not None:
                # Keep it close: the next identical request on this replica skips the network.
                self.local.put(_local_key(namespace, key), value)
                self._redis_hits.inc()
                return value
        self.metrics.misses.inc()
        return None

    async def lookup(self, namespace: str, key: bytes) -> bytes | None:
        """Both tiers, local first."""
        value = self.lookup_local(namespace, key)
        return value if value is not None else await self.lookup_shared(namespace, key)

    def store(self, namespace: str, key: bytes, value: bytes) -> None:
        """Store locally at once and write to Redis in the background: the response that produced
        ``value`` must not wait for Redis. Needs a running event loop when Redis is configured."""
        self.local.put(_local_key(namespace, key), value)
        if self.redis is None or self._closed:
            return
        if len(self._pending_writes) >= self.max_pending_writes:
            # Redis is slower than the traffic: dropping a write only costs a future miss, while
            # queuing without bound would cost memory and tasks for as long as Redis stays slow.
            self.metrics.redis_writes_dropped.inc()
            return
        task = asyncio.create_task(self.redis.put(namespace, key, value), name="weir-cache-redis-put")
        self._pending_writes.add(task)
        task.add_done_callback(self._pending_writes.discard)

    async def aclose(self) -> None:
        """Let pending Redis writes finish (each is bounded by the Redis timeout), cancel any that
        still have not, then close the Redis client. Stores after this stay local."""
        self._closed = True
        if self._pending_writes:
            pending = set(self._pending_writes)
            grace = self.redis.timeout_seconds + 1.0 if self.redis is not None else 1.0
            _, unfinished = await asyncio.wait(pending, timeout=grace)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if unfinished:
                log.warning("cancelled %d Redis cache writes still pending at shutdown", len(unfinished))
        if self.redis is not None:
            await self.redis.aclose()


def _local_key(namespace: str, key: bytes) -> bytes:
    # Length-prefixed, so ("a", b"bc") and ("ab", b"c") stay different local keys.
    encoded = namespace.encode("utf-8")
    return _NAMESPACE_LENGTH.pack(len(encoded)) + encoded + key
