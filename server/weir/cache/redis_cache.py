"""The shared tier: Redis, so that replicas reuse each other's answers, with a TTL.

Redis is an optimisation, never a dependency of a request: every call is bounded by a timeout,
and any failure is a miss (or a skipped write), a metric, and at most one log line per outage.
After a failure a circuit breaker skips Redis outright for ``retry_after_seconds`` (doubling on
each failed retry, up to ``max_retry_after_seconds``), so a dead Redis costs nothing per request
instead of a timeout per request. The first call after the interval is the probe; a success
closes the breaker.

``redis`` is imported when a RedisResponseCache is built, so a server without a Redis URL does not
need the package.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from weir.cache.metrics import CacheMetrics

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "weir:response-cache"
DEFAULT_RETRY_AFTER_SECONDS = 1.0
DEFAULT_MAX_RETRY_AFTER_SECONDS = 30.0

_Result = TypeVar("_Result")


class RedisResponseCache:
    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        timeout_seconds: float,
        metrics: CacheMetrics,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        *,
        retry_after_seconds: float = DEFAULT_RETRY_AFTER_SECONDS,
        max_retry_after_seconds: float = DEFAULT_MAX_RETRY_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """No I/O happens here: the client connects on its first call. ``clock`` is a monotonic
        clock in seconds (tests pass a fake one to step through the breaker's intervals)."""
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds: expected a positive number of seconds, got {ttl_seconds}")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds: expected a positive number of seconds, got {timeout_seconds}")
        if retry_after_seconds <= 0:
            raise ValueError(f"retry_after_seconds: expected a positive number of seconds, got {retry_after_seconds}")
        if max_retry_after_seconds < retry_after_seconds:
            raise ValueError(
                f"max_retry_after_seconds: expected at least retry_after_seconds ({retry_after_seconds}), "
                f"got {max_retry_after_seconds}"
            )
        try:
            import redis.asyncio
            import redis.exceptions
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError as error:
            raise RuntimeError("a Redis response cache needs the 'redis' package (pip install 'redis>=5')") from error

        self.ttl_seconds = ttl_seconds
        self.timeout_seconds = timeout_seconds
        self.metrics = metrics
        self.key_prefix = key_prefix
        self.retry_after_seconds = retry_after_seconds
        self.max_retry_after_seconds = max_retry_after_seconds
        self._clock = clock
        self._ttl_milliseconds = max(1, round(ttl_seconds * 1000))
        self._timeout_errors: tuple[type[BaseException], ...] = (TimeoutError, redis.exceptions.TimeoutError)
        self._client: Redis = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            # No client-side retries: a retry inside one call only spends that call's time budget,
            # and the breaker below is what decides when Redis is worth trying again.
            retry=Retry(NoBackoff(), 0),
        )
        connection = self._client.connection_pool.connection_kwargs
        # Where, without the URL's credentials, for the outage log line.
        self._location = str(connection.get("path") or f"{connection.get('host')}:{connection.get('port')}")

        self._breaker_open = False
        self._retry_at = 0.0
        self._retry_interval = retry_after_seconds

    def key_for(self, namespace: str, key: bytes) -> str:
        """The Redis key of an entry. The key's hex digits come last and hold no ':', so a namespace
        containing ':' cannot make two entries share a Redis key."""
        return f"{self.key_prefix}:{namespace}:{key.hex()}"

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        """The stored value, or None on a miss, an error, a timeout or an open breaker."""
        redis_key = self.key_for(namespace, key)
        value = await self._call("get", lambda: self._client.get(redis_key))
        # Always bytes from a client built without decode_responses; anything else is no value of ours.
        return value if isinstance(value, bytes) else None

    async def put(self, namespace: str, key: bytes, value: bytes) -> None:
        """Store ``value`` with the TTL; failures are counted, never raised."""
        redis_key = self.key_for(namespace, key)
        await self._call("put", lambda: self._client.set(redis_key, value, px=self._ttl_milliseconds))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, operation: str, command: Callable[[], Awaitable[_Result]]) -> _Result | None:
        is_probe = False
        if self._breaker_open:
            now = self._clock()
            if now < self._retry_at:
                self.metrics.redis_bypassed.inc()
                return None
            # This call probes Redis. Re-arm the breaker at once so that the calls arriving while
            # the probe waits keep bypassing: one request pays for the probe, not all of them.
            is_probe = True
            self._retry_at = now + self._retry_interval
        try:
            result = await asyncio.wait_for(command(), self.timeout_seconds)
        except Exception as error:  # CancelledError is not an Exception: a cancelled caller still unwinds
            self._record_failure(operation, error, is_probe)
            return None
        self._record_success()
        return result

    def _record_failure(self, operation: str, error: Exception, is_probe: bool) -> None:
        reason = "timeout" if isinstance(error, self._timeout_errors) else "error"
        self.metrics.redis_errors.labels(operation, reason).inc()
        now = self._clock()
        if not self._breaker_open:
            self._breaker_open = True
            self._retry_interval = self.retry_after_seconds
            self._retry_at = now + self._retry_interval
            log.warning(
                "Redis response cache at %s failed (%s on %s: %r); serving without it, retrying in %.1f s",
                self._location, reason, operation, error, self._retry_interval,
            )  # fmt: skip
        elif is_probe:
            self._retry_interval = min(self._retry_interval * 2, self.max_retry_after_seconds)
            self._retry_at = now + self._retry_interval
        # Otherwise a call that was already in flight when the outage was noticed failed too: the
        # same outage, nothing new to back off from.

    def _record_success(self) -> None:
        if self._breaker_open:
            log.info("Redis response cache at %s answers again; using it", self._location)
        self._breaker_open = False
        self._retry_interval = self.retry_after_seconds
