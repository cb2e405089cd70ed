"""The drift monitor's Prometheus metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from weir_proto.control.v1 import monitoring_pb2

if TYPE_CHECKING:
    from weir_control.monitoring.monitor import DriftMonitor

Severity = monitoring_pb2.Severity


class DriftCollector(Collector):
    """Per endpoint and feature, the latest scored window's statistics and severity."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        score = GaugeMetricFamily(
            "weir_drift_score", "A drift statistic of the latest window.", labels=["endpoint", "feature", "statistic"]
        )
        severity = GaugeMetricFamily(
            "weir_drift_severity", "Latest window's severity (0 none, 1 warning, 2 critical; -1 not scored).",
            labels=["endpoint", "feature"],
        )  # fmt: skip
        accuracy = GaugeMetricFamily(
            "weir_drift_labelled_accuracy", "Accuracy of the latest window's labelled predictions.", labels=["endpoint"]
        )
        received = CounterMetricFamily(
            "weir_monitoring_records_received", "Inference records received from data planes.", labels=["endpoint"]
        )
        for endpoint, window, records in self._monitor.latest():
            received.add_metric([endpoint], records)
            if window is None:
                continue
            severity.add_metric([endpoint, "__window__"], _level(window.severity))
            for feature in window.features:
                severity.add_metric([endpoint, feature.name], _level(feature.severity))
                for statistic in ("psi", "ks_statistic", "jensen_shannon", "wasserstein_normalized", "chi_square"):
                    score.add_metric([endpoint, feature.name, statistic], getattr(feature, statistic))
            if window.concept.labelled:
                accuracy.add_metric([endpoint], window.concept.accuracy)
                severity.add_metric([endpoint, "__concept__"], _level(window.concept.severity))
        values, refused, errors = self._monitor.dropped()
        values_dropped = CounterMetricFamily(
            "weir_monitoring_values_dropped",
            "Record values not taken to keep the monitor bounded (reason: features, beyond the features bound "
            "or with too long a name).", labels=["endpoint", "reason"],
        )  # fmt: skip
        for (endpoint, reason), count in sorted(values.items()):
            values_dropped.add_metric([endpoint, reason], count)
        records_refused = CounterMetricFamily(
            "weir_monitoring_records_refused",
            "Inference records not taken (reason: unknown_endpoint, not deployed and without a policy; "
            "endpoints_bound, the monitored endpoints' bound reached).", labels=["reason"],
        )  # fmt: skip
        for reason, count in sorted(refused.items()):
            records_refused.add_metric([reason], count)
        ingest_errors = CounterMetricFamily(
            "weir_monitoring_ingest_errors", "Inference records dropped by an error while taking them.",
            labels=["endpoint"],
        )  # fmt: skip
        for endpoint, count in sorted(errors.items()):
            ingest_errors.add_metric([endpoint], count)
        held = GaugeMetricFamily(
            "weir_monitoring_labels_held", "Feedback labels waiting for their request's record.", labels=["endpoint"]
        )
        unmatched = CounterMetricFamily(
            "weir_monitoring_labels_unmatched",
            "Held feedback labels whose request's record never came (or that the hold's bounds pushed out).",
            labels=["endpoint"],
        )
        for endpoint, waiting, never in self._monitor.labels():
            held.add_metric([endpoint], waiting)
            unmatched.add_metric([endpoint], never)
        yield from (
            score,
            severity,
            accuracy,
            received,
            values_dropped,
            records_refused,
            ingest_errors,
            held,
            unmatched,
        )


def _level(severity: int) -> float:
    return {Severity.NONE: 0.0, Severity.WARNING: 1.0, Severity.CRITICAL: 2.0}.get(severity, -1.0)  # type: ignore[call-overload]
