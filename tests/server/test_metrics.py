"""weir.metrics: the per-version series kept as plain counters and exposed at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from weir.metrics import Distribution, Metrics, VersionMetrics


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_distribution_counts_a_value_equal_to_a_bound_in_that_bound_like_prometheus() -> None:
    distribution = Distribution((1, 2, 4))
    for value in (0.5, 1, 1.5, 2, 4, 9):
        distribution.observe(value)
    assert distribution.cumulative_buckets() == [("1.0", 2), ("2.0", 4), ("4.0", 5), ("+Inf", 6)]
    assert distribution.sum == 18


def test_version_series_reach_the_registry_with_prometheus_names_and_labels() -> None:
    registry = CollectorRegistry()
    metrics = Metrics.create(registry)
    series = VersionMetrics.bind(metrics, "m", "1")
    series.request_success.inc()
    series.request_duration.observe(0.0003)
    series.stage_duration["queue"].observe(0.002)
    series.batch_rows.observe(3)
    series.pending_requests.inc(2)
    series.pending_requests.dec()
    series.cache_misses.inc()

    samples = scrape(registry)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"model": "m", "version": "1", **labels}.items())))]

    assert value("weir_inference_request_success_total") == 1
    assert value("weir_inference_request_duration_seconds_bucket", le="0.00025") == 0
    assert value("weir_inference_request_duration_seconds_bucket", le="0.0005") == 1
    assert value("weir_inference_request_duration_seconds_count") == 1
    assert value("weir_inference_stage_duration_seconds_sum", stage="queue") == 0.002
    assert value("weir_inference_stage_duration_seconds_count", stage="decode") == 0
    assert value("weir_batch_size_bucket", le="4.0") == 1
    assert value("weir_inference_pending_request_count") == 1
    assert value("weir_cache_requests_total", result="miss") == 1
    assert value("weir_cache_requests_total", result="hit") == 0


def test_a_reloaded_version_keeps_counting_in_the_same_series() -> None:
    metrics = Metrics.create(CollectorRegistry())
    first = VersionMetrics.bind(metrics, "m", "1")
    first.request_success.inc()
    assert VersionMetrics.bind(metrics, "m", "1") is first
    assert VersionMetrics.bind(metrics, "m", "2") is not first
