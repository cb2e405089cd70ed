"""Per-level numbers from the merged per-request latencies: exact percentiles over every request.

Percentiles use ``numpy.percentile`` with linear interpolation (as bench/latency.py does); with at most
a few million requests per level the arrays are small enough to keep whole instead of in a histogram.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def latency_summary_ms(latencies_ns: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/p999/max/mean/min in milliseconds; every value None when there is no latency."""
    keys = (*PERCENTILES, "max", "mean", "min")
    if latencies_ns.size == 0:
        return dict.fromkeys(keys, None)
    values_ms = latencies_ns.astype(np.float64) / 1e6
    points = np.percentile(values_ms, list(PERCENTILES.values()))
    summary: dict[str, float | None] = {key: float(point) for key, point in zip(PERCENTILES, points, strict=True)}
    summary["max"] = float(values_ms.max())
    summary["mean"] = float(values_ms.mean())
    summary["min"] = float(values_ms.min())
    return summary


def merge_counts(counts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for mapping in counts:
        for key, value in mapping.items():
            merged[key] = merged.get(key, 0) + value
    return dict(sorted(merged.items()))


def level_summary(
    latencies_ns: np.ndarray, errors: Mapping[str, int], dropped: int, elapsed_s: float
) -> dict[str, Any]:
    """One level's results. ``latencies_ns`` holds the successful requests; ``errors`` counts failed
    ones by gRPC status code name; ``dropped`` counts open-loop arrivals not sent because the in-flight
    bound was reached. Throughput is successful requests over ``elapsed_s``."""
    succeeded = int(latencies_ns.size)
    errored = sum(errors.values())
    failed = errored + dropped
    requests = succeeded + failed
    return {
        "requests": requests,
        "succeeded": succeeded,
        "failed": failed,
        "errors": dict(sorted(errors.items())),
        "dropped": dropped,
        "error_rate": failed / requests if requests else 0.0,
        "elapsed_s": elapsed_s,
        "throughput_rps": succeeded / elapsed_s if elapsed_s > 0 else 0.0,
        "latency_ms": latency_summary_ms(latencies_ns),
    }
