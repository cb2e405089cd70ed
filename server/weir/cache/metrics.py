"""Prometheus metrics of the response cache, on an injected CollectorRegistry.

Labels stay low-cardinality on purpose: per-model hit counts belong to ModelStatistics (the data
plane counts them there), so nothing here is labelled by model.

Who counts what: ``ResponseCache.lookup`` counts hits (by the tier that answered) and misses (a
lookup no tier answered), so one lookup counts exactly once. ``LocalResponseCache`` keeps the size
gauges and counts evictions; ``RedisResponseCache`` counts its errors and bypasses;
``ResponseCache.store`` counts Redis writes it dropped because too many were pending.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

TIERS = ("local", "redis")
REDIS_OPERATIONS = ("get", "put")
REDIS_FAILURE_REASONS = ("timeout", "error")


@dataclass(frozen=True)
class CacheMetrics:
    registry: CollectorRegistry
    hits: Counter
    misses: Counter
    evictions: Counter
    local_bytes: Gauge
    local_entries: Gauge
    redis_errors: Counter
    redis_bypassed: Counter
    redis_writes_dropped: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CacheMetrics:
        metrics = cls(
            registry=registry,
            hits=Counter(
                "weir_cache_hits", "Response cache lookups answered, by the tier that answered.", ("tier",),
                registry=registry,
            ),
            misses=Counter("weir_cache_misses", "Response cache lookups no tier could answer.", registry=registry),
            evictions=Counter(
                "weir_cache_evictions", "Entries evicted from the in-process cache to make room.", registry=registry,
            ),
            local_bytes=Gauge(
                "weir_cache_bytes", "Bytes held by the in-process cache (keys plus values).", registry=registry,
            ),
            local_entries=Gauge("weir_cache_entries", "Entries held by the in-process cache.", registry=registry),
            redis_errors=Counter(
                "weir_cache_redis_errors", "Redis calls that failed or timed out (the request went on uncached).",
                ("operation", "reason"), registry=registry,
            ),
            redis_bypassed=Counter(
                "weir_cache_redis_bypassed",
                "Redis calls skipped because a recent failure opened the circuit breaker.", registry=registry,
            ),
            redis_writes_dropped=Counter(
                "weir_cache_redis_writes_dropped",
                "Background Redis writes not started because too many were already pending.", registry=registry,
            ),
        )  # fmt: skip
        # Children created up front so every series reads 0 from the first scrape, not "absent".
        for tier in TIERS:
            metrics.hits.labels(tier)
        for operation in REDIS_OPERATIONS:
            for reason in REDIS_FAILURE_REASONS:
                metrics.redis_errors.labels(operation, reason)
        return metrics
