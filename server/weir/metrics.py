"""Prometheus metrics, on an injected CollectorRegistry (never the global one).

Names follow Triton's (nv_inference_*) with a ``weir_`` prefix, but latencies are histograms, which
Triton users have asked for for years (triton#2685, #3060, #7672). Stages are those of the latency
budget: decode (proto -> numpy + validation), queue (waiting for a model instance), infer (the
model) and encode (numpy -> proto).

The per-request series of a model version (``VersionMetrics``) are plain Python counters that the
event loop thread alone updates, read by a collector only when Prometheus scrapes. prometheus_client's
own Counter/Histogram take a lock and walk several checks per update: with a dozen updates per
request that was a quarter of Weir's Python time per request (measured with cProfile). Rare series
(failures by reason, model readiness) stay ordinary prometheus_client metrics.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Sub-millisecond resolution at the bottom: a small model on the raw path answers in ~100 us.
LATENCY_BUCKETS_SECONDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGES = ("decode", "queue", "infer", "encode")
UNKNOWN_MODEL_LABEL = "_unknown"  # requests for models that do not exist: bounded label cardinality


class Count:
    """A counter or gauge value, updated from the event loop thread only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class Distribution:
    """A histogram with fixed upper bounds (Prometheus' ``le``, inclusive), updated from the event
    loop thread only; the last slot counts what lies above every bound (+Inf)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative_buckets(self) -> list[tuple[str, float]]:
        counts = list(self.counts)  # a snapshot: the loop thread may be adding while we read
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return buckets


@dataclass
class VersionMetrics:
    """The per-request series of one model version."""

    request_success: Count = field(default_factory=Count)
    request_failures: Count = field(default_factory=Count)  # also by reason in weir_inference_request_failure
    request_duration: Distribution = field(default_factory=lambda: Distribution(LATENCY_BUCKETS_SECONDS))
    stage_duration: dict[str, Distribution] = field(
        default_factory=lambda: {stage: Distribution(LATENCY_BUCKETS_SECONDS) for stage in STAGES}
    )
    inference_count: Count = field(default_factory=Count)
    execution_count: Count = field(default_factory=Count)
    pending_requests: Count = field(default_factory=Count)
    queue_depth: Count = field(default_factory=Count)
    batch_rows: Distribution = field(default_factory=lambda: Distribution(BATCH_SIZE_BUCKETS))
    rejected: Count = field(default_factory=Count)
    expired: Count = field(default_factory=Count)
    cache_hits: Count = field(default_factory=Count)
    cache_misses: Count = field(default_factory=Count)

    @classmethod
    def bind(cls, metrics: Metrics, model: str, version: str) -> VersionMetrics:
        """The series of (model, version): the same object again when a version is reloaded, so its
        counters keep counting as Prometheus expects."""
        return metrics.versions.get_or_create(model, version)


class VersionMetricsCollector(Collector):
    """Turns every version's ``VersionMetrics`` into Prometheus families at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the dict between loads (loop thread) and scrapes
        self._by_version: dict[tuple[str, str], VersionMetrics] = {}

    def get_or_create(self, model: str, version: str) -> VersionMetrics:
        with self._lock:
            return self._by_version.setdefault((model, version), VersionMetrics())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            versions = list(self._by_version.items())
        labels = ["model", "version"]
        success = CounterMetricFamily(
            "weir_inference_request_success", "Inference requests answered successfully.", labels=labels
        )
        duration = HistogramMetricFamily(
            "weir_inference_request_duration_seconds", "End-to-end server-side request latency.", labels=labels
        )
        stages = HistogramMetricFamily(
            "weir_inference_stage_duration_seconds", "Latency of each stage of a request.", labels=[*labels, "stage"]
        )
        inferences = CounterMetricFamily(
            "weir_inference_count", "Inferences performed (a batch of N rows counts N).", labels=labels
        )
        executions = CounterMetricFamily(
            "weir_inference_exec_count", "Model executions (one per batch).", labels=labels
        )
        pending = GaugeMetricFamily(
            "weir_inference_pending_request_count", "Requests received and not yet answered.", labels=labels
        )
        depth = GaugeMetricFamily("weir_queue_depth", "Requests waiting in the scheduler queue.", labels=labels)
        batch_rows = HistogramMetricFamily(
            "weir_batch_size", "Rows per model execution (a dynamic batch of requests counts all rows).", labels=labels
        )
        rejected = CounterMetricFamily(
            "weir_queue_rejected", "Requests refused at once because the queue was full.", labels=labels
        )
        expired = CounterMetricFamily(
            "weir_queue_expired",
            "Requests dropped from the queue, uncomputed, when their deadline or queue timeout passed.",
            labels=labels,
        )
        cache = CounterMetricFamily(
            "weir_cache_requests", "Response cache lookups by model version and result.", labels=[*labels, "result"]
        )
        for (model, version), series in versions:
            values = [model, version]
            success.add_metric(values, series.request_success.value)
            _add_histogram(duration, values, series.request_duration)
            for stage, distribution in series.stage_duration.items():
                _add_histogram(stages, [*values, stage], distribution)
            inferences.add_metric(values, series.inference_count.value)
            executions.add_metric(values, series.execution_count.value)
            pending.add_metric(values, series.pending_requests.value)
            depth.add_metric(values, series.queue_depth.value)
            _add_histogram(batch_rows, values, series.batch_rows)
            rejected.add_metric(values, series.rejected.value)
            expired.add_metric(values, series.expired.value)
            cache.add_metric([*values, "hit"], series.cache_hits.value)
            cache.add_metric([*values, "miss"], series.cache_misses.value)
        yield from (
            success, duration, stages, inferences, executions, pending, depth, batch_rows, rejected, expired, cache
        )  # fmt: skip


def _add_histogram(family: HistogramMetricFamily, labels: list[str], distribution: Distribution) -> None:
    buckets = distribution.cumulative_buckets()
    family.add_metric(labels, buckets, distribution.sum)


@dataclass(frozen=True)
class TransportMetrics:
    """The gRPC transport's own series: what it refused before any model saw a request, and the
    streams it holds back because their clients do not read their answers."""

    refused: Counter
    streams_paused: Gauge
    stream_backlog_bytes: Gauge
    memory_trims: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> TransportMetrics:
        return cls(
            refused=Counter(
                "weir_request_refused", "Requests the transport refused before decoding them, by reason "
                "(undecodable, too_large_decompressed, shutting_down).", ("reason",), registry=registry,
            ),
            streams_paused=Gauge(
                "weir_stream_backpressure_paused", "ModelStreamInfer streams whose requests are not being read "
                "because their unsent answers exceed the stream backlog limit.", registry=registry,
            ),
            stream_backlog_bytes=Gauge(
                "weir_stream_backlog_bytes", "Bytes held for ModelStreamInfer streams: requests being computed "
                "and answers not yet sent.", registry=registry,
            ),
            memory_trims=Counter(
                "weir_memory_trims", "Times freed memory was given back to the system after large requests "
                "(glibc malloc_trim).", registry=registry,
            ),
        )  # fmt: skip


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    request_failure: Counter
    model_ready: Gauge
    versions: VersionMetricsCollector
    transport: TransportMetrics

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        model_labels = ("model", "version")
        versions = VersionMetricsCollector()
        registry.register(versions)
        return cls(
            registry=registry,
            request_failure=Counter(
                "weir_inference_request_failure", "Inference requests that failed, by error kind.",
                (*model_labels, "reason"), registry=registry,
            ),
            model_ready=Gauge(
                "weir_model_ready", "1 when the model version is loaded and ready.", model_labels, registry=registry,
            ),
            versions=versions,
            transport=TransportMetrics.create(registry),
        )  # fmt: skip
