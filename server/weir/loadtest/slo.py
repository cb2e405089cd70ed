"""Service-level objectives: ``p99<=50ms``, ``throughput>=500``, ``errors<=0.1%``.

Grammar: METRIC OP VALUE with OP one of ``<= < >= >``.

- latency metrics ``p50 p90 p99 p999 max mean``: VALUE with a unit ``us`` (or ``µs``), ``ms`` or ``s``;
- ``throughput``: completed requests per second, optionally suffixed ``rps``, ``req/s`` or ``/s``;
- ``errors``: a rate with ``%`` (failed + dropped over attempted) or, without ``%``, a count.

Each SLO is evaluated against one level's summary (``summary.level_summary``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

LATENCY_METRICS = ("p50", "p90", "p99", "p999", "max", "mean")
_UNIT_TO_MS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0}
_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
_PATTERN = re.compile(r"^\s*([a-z0-9]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(\S*)\s*$")


class SloError(ValueError):
    """An --slo that does not parse; the message names the text and what was expected."""


@dataclass(frozen=True)
class Slo:
    text: str
    metric: str  # one of LATENCY_METRICS, "throughput", "error_rate", "error_count"
    comparison: str
    threshold: float  # ms for latencies, req/s for throughput, a fraction for error_rate, a count for error_count

    def holds(self, observed: float) -> bool:
        return _COMPARISONS[self.comparison](observed, self.threshold)


@dataclass(frozen=True)
class SloOutcome:
    slo: str
    observed: float | None  # None: nothing to measure (no successful request for a latency SLO)
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"slo": self.slo, "observed": self.observed, "passed": self.passed}


def parse_slo(text: str) -> Slo:
    match = _PATTERN.match(text.lower())
    if match is None:
        raise SloError(f"--slo {text!r}: expected METRIC OP VALUE, e.g. 'p99<=50ms', 'throughput>=500', 'errors<=0.1%'")
    metric, comparison, number, unit = match.groups()
    value = float(number)
    if metric in LATENCY_METRICS:
        if unit not in _UNIT_TO_MS:
            raise SloError(f"--slo {text!r}: a latency needs a unit us, ms or s, got {unit or 'none'!r}")
        return Slo(text, metric, comparison, value * _UNIT_TO_MS[unit])
    if metric == "throughput":
        if unit not in ("", "rps", "req/s", "/s"):
            raise SloError(f"--slo {text!r}: throughput is in requests per second (rps, req/s or none), got {unit!r}")
        return Slo(text, metric, comparison, value)
    if metric == "errors":
        if unit == "%":
            return Slo(text, "error_rate", comparison, value / 100.0)
        if unit:
            raise SloError(f"--slo {text!r}: errors take a rate with % or a plain count, got unit {unit!r}")
        return Slo(text, "error_count", comparison, value)
    known = ", ".join((*LATENCY_METRICS, "throughput", "errors"))
    raise SloError(f"--slo {text!r}: unknown metric {metric!r}; expected one of {known}")


def observed_value(slo: Slo, level: Mapping[str, Any]) -> float | None:
    if slo.metric in LATENCY_METRICS:
        value = level["latency_ms"].get(slo.metric)
        return None if value is None else float(value)
    if slo.metric == "throughput":
        return float(level["throughput_rps"])
    if slo.metric == "error_rate":
        return float(level["error_rate"])
    return float(level["failed"])


def evaluate(slos: list[Slo], level: Mapping[str, Any]) -> list[SloOutcome]:
    """Every SLO against one level. A latency SLO on a level with no successful request fails."""
    outcomes = []
    for slo in slos:
        observed = observed_value(slo, level)
        outcomes.append(SloOutcome(slo.text, observed, observed is not None and slo.holds(observed)))
    return outcomes
