"""Prometheus metrics, on an injected CollectorRegistry (never the global one).

Names follow Triton's (nv_inference_*) with a ``weir_`` prefix, but latencies are histograms, which
Triton users have asked for for years (triton#2685, #3060, #7672). Stages are those of the latency
budget: decode (proto -> numpy + validation), queue (waiting for a model instance), infer (the
model) and encode (numpy -> proto).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sub-millisecond resolution at the bottom: a small model on the raw path answers in ~100 us.
LATENCY_BUCKETS_SECONDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGES = ("decode", "queue", "infer", "encode")
UNKNOWN_MODEL_LABEL = "_unknown"  # requests for models that do not exist: bounded label cardinality


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    request_success: Counter
    request_failure: Counter
    request_duration: Histogram
    stage_duration: Histogram
    inference_count: Counter
    execution_count: Counter
    pending_requests: Gauge
    model_ready: Gauge
    queue_depth: Gauge
    batch_rows: Histogram
    rejected: Counter
    expired: Counter
    cache_requests: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        model_labels = ("model", "version")
        return cls(
            registry=registry,
            request_success=Counter(
                "weir_inference_request_success", "Inference requests answered successfully.", model_labels,
                registry=registry,
            ),
            request_failure=Counter(
                "weir_inference_request_failure", "Inference requests that failed, by error kind.",
                (*model_labels, "reason"), registry=registry,
            ),
            request_duration=Histogram(
                "weir_inference_request_duration_seconds", "End-to-end server-side request latency.",
                model_labels, buckets=LATENCY_BUCKETS_SECONDS, registry=registry,
            ),
            stage_duration=Histogram(
                "weir_inference_stage_duration_seconds", "Latency of each stage of a request.",
                (*model_labels, "stage"), buckets=LATENCY_BUCKETS_SECONDS, registry=registry,
            ),
            inference_count=Counter(
                "weir_inference_count", "Inferences performed (a batch of N rows counts N).", model_labels,
                registry=registry,
            ),
            execution_count=Counter(
                "weir_inference_exec_count", "Model executions (one per batch).", model_labels, registry=registry,
            ),
            pending_requests=Gauge(
                "weir_inference_pending_request_count", "Requests received and not yet answered.", model_labels,
                registry=registry,
            ),
            model_ready=Gauge(
                "weir_model_ready", "1 when the model version is loaded and ready.", model_labels, registry=registry,
            ),
            queue_depth=Gauge(
                "weir_queue_depth", "Requests waiting in the scheduler queue.", model_labels, registry=registry,
            ),
            batch_rows=Histogram(
                "weir_batch_size", "Rows per model execution (a dynamic batch of requests counts all rows).",
                model_labels, buckets=BATCH_SIZE_BUCKETS, registry=registry,
            ),
            rejected=Counter(
                "weir_queue_rejected", "Requests refused at once because the queue was full.", model_labels,
                registry=registry,
            ),
            expired=Counter(
                "weir_queue_expired", "Requests dropped from the queue, uncomputed, when their deadline or "
                "queue timeout passed.", model_labels, registry=registry,
            ),
            cache_requests=Counter(
                "weir_cache_requests", "Response cache lookups by model version and result.",
                (*model_labels, "result"), registry=registry,
            ),
        )  # fmt: skip


@dataclass(frozen=True)
class VersionMetrics:
    """The metric children of one model version, bound once at load time so the request path does
    no label lookups."""

    request_success: Any
    request_duration: Any
    stage_duration: dict[str, Any]
    inference_count: Any
    execution_count: Any
    pending_requests: Any
    queue_depth: Any
    batch_rows: Any
    rejected: Any
    expired: Any
    cache_hits: Any
    cache_misses: Any

    @classmethod
    def bind(cls, metrics: Metrics, model: str, version: str) -> VersionMetrics:
        return cls(
            request_success=metrics.request_success.labels(model, version),
            request_duration=metrics.request_duration.labels(model, version),
            stage_duration={stage: metrics.stage_duration.labels(model, version, stage) for stage in STAGES},
            inference_count=metrics.inference_count.labels(model, version),
            execution_count=metrics.execution_count.labels(model, version),
            pending_requests=metrics.pending_requests.labels(model, version),
            queue_depth=metrics.queue_depth.labels(model, version),
            batch_rows=metrics.batch_rows.labels(model, version),
            rejected=metrics.rejected.labels(model, version),
            expired=metrics.expired.labels(model, version),
            cache_hits=metrics.cache_requests.labels(model, version, "hit"),
            cache_misses=metrics.cache_requests.labels(model, version, "miss"),
        )
