"""Monitoring policies: defaults, and the checks at the API edge. Every number is finite and within a
range before the monitor uses it (a NaN window once made every record batch of its endpoint fail), and
a webhook goes only where the operator allows (``monitoring.webhook``)."""

from __future__ import annotations

import math

from weir_control.monitoring import statistics
from weir_control.monitoring.webhook import WebhookAllowList
from weir_proto.control.v1 import monitoring_pb2
from weir_proto.errors import InvalidArgumentError

DEFAULT_WINDOW_SECONDS = 300.0
DEFAULT_MIN_RECORDS = 200
DEFAULT_COOLDOWN_SECONDS = 3600.0
DEFAULT_MAX_WINDOWS = 288

MAX_ENDPOINT_CHARS = 256
MIN_WINDOW_SECONDS = 1.0
MAX_WINDOW_SECONDS = 7 * 86400.0  # a week
MAX_COOLDOWN_SECONDS = 365 * 86400.0  # a year
MAX_MIN_RECORDS = 1_000_000_000
MAX_WINDOWS_KEPT = 100_000
# Statistics bounded by 1 (KS distance, Jensen-Shannon distance, a share change) cannot have a threshold
# above 1; PSI and the normalized Wasserstein distance are unbounded, their thresholds are capped generously.
THRESHOLD_CEILINGS = {"psi": 1000.0, "ks": 1.0, "jsd": 1.0, "prediction": 1.0, "wasserstein_normalized": 1000.0}


def resolved_policy(policy: monitoring_pb2.MonitoringPolicy) -> monitoring_pb2.MonitoringPolicy:
    """The policy with defaults filled in (what the report shows and the monitor uses)."""
    resolved = monitoring_pb2.MonitoringPolicy()
    resolved.CopyFrom(policy)
    resolved.window_seconds = policy.window_seconds or DEFAULT_WINDOW_SECONDS
    resolved.min_records = policy.min_records or DEFAULT_MIN_RECORDS
    resolved.cooldown_seconds = policy.cooldown_seconds or DEFAULT_COOLDOWN_SECONDS
    resolved.max_windows = policy.max_windows or DEFAULT_MAX_WINDOWS
    for name, (warning, critical) in statistics.DEFAULT_THRESHOLDS.items():
        if name not in resolved.thresholds:
            resolved.thresholds[name].CopyFrom(monitoring_pb2.Thresholds(warning=warning, critical=critical))
    return resolved


def check_endpoint(endpoint: str) -> None:
    if not endpoint:
        raise InvalidArgumentError("endpoint: expected an endpoint name, got ''")
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        raise InvalidArgumentError(
            f"endpoint: expected at most {MAX_ENDPOINT_CHARS} characters, got {len(endpoint)} ({endpoint[:40]!r}...)"
        )


def _check_seconds(name: str, value: float, low: float, high: float) -> None:
    if value == 0:
        return  # the default
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgumentError(f"{name}: expected 0 (default) or {low:g} to {high:g} seconds, got {value}")


def _check_count(name: str, value: int, high: int) -> None:
    if not 0 <= value <= high:
        raise InvalidArgumentError(f"{name}: expected 0 (default) to {high:,}, got {value}")


def check_policy_numbers(policy: monitoring_pb2.MonitoringPolicy) -> None:
    """Every number of the policy: finite and in range; the message names the field, the bounds, the value."""
    check_endpoint(policy.endpoint)
    _check_seconds("window_seconds", policy.window_seconds, MIN_WINDOW_SECONDS, MAX_WINDOW_SECONDS)
    _check_seconds("cooldown_seconds", policy.cooldown_seconds, 0.0, MAX_COOLDOWN_SECONDS)
    _check_count("min_records", policy.min_records, MAX_MIN_RECORDS)
    _check_count("max_windows", policy.max_windows, MAX_WINDOWS_KEPT)
    known = [*statistics.DEFAULT_THRESHOLDS, "wasserstein_normalized"]
    for name, threshold in policy.thresholds.items():
        if name not in known:
            raise InvalidArgumentError(f"thresholds: expected keys among {known}, got '{name[:100]}'")
        ceiling = THRESHOLD_CEILINGS[name]
        warning, critical = threshold.warning, threshold.critical
        if not (math.isfinite(warning) and math.isfinite(critical) and 0 <= warning <= critical <= ceiling):
            raise InvalidArgumentError(
                f"thresholds['{name}']: expected finite 0 <= warning <= critical <= {ceiling:g}, "
                f"got {warning} and {critical}"
            )


def check_policy(policy: monitoring_pb2.MonitoringPolicy, webhooks: WebhookAllowList) -> None:
    check_policy_numbers(policy)
    if policy.webhook_url:
        webhooks.check_url(policy.webhook_url)
