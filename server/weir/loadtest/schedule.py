"""Open-loop arrival schedules and how a level's load is split over worker processes.

An open-loop worker sends each request at its scheduled time whatever the server is doing, and a
request's latency is measured from that scheduled time, so a stalled server is charged for the
requests it delayed (no coordinated omission).

- ``constant``: one arrival every 1/rate seconds. Worker ``i`` of ``n`` is shifted by ``i/rate_total``
  so the merged stream stays evenly spaced.
- ``poisson``: exponential gaps with mean 1/rate, from a seeded generator. The merged streams of
  independent Poisson workers are a Poisson stream at the total rate.
"""

from __future__ import annotations

import numpy as np

ARRIVAL_KINDS = ("constant", "poisson")


def arrival_offsets(kind: str, rate: float, duration_s: float, *, seed: int = 0, phase_s: float = 0.0) -> np.ndarray:
    """Sorted send times, in seconds from the start, of every arrival in ``[0, duration_s)``."""
    if rate <= 0 or duration_s <= 0:
        return np.empty(0, dtype=np.float64)
    if kind == "constant":
        start = phase_s % (1.0 / rate)
        return start + np.arange(int(np.ceil((duration_s - start) * rate)), dtype=np.float64) / rate
    if kind == "poisson":
        rng = np.random.default_rng(seed)
        expected = rate * duration_s
        # Draw enough gaps in one go (mean + 6 sigma + slack), then top up in the rare case it was short.
        gaps = rng.exponential(1.0 / rate, size=int(expected + 6 * np.sqrt(expected) + 16))
        times = np.cumsum(gaps)
        while times[-1] < duration_s:
            more = np.cumsum(rng.exponential(1.0 / rate, size=max(16, int(expected / 4)))) + times[-1]
            times = np.concatenate([times, more])
        return times[times < duration_s]
    raise ValueError(f"arrival kind must be one of {', '.join(ARRIVAL_KINDS)}, got {kind!r}")


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` integers that differ by at most one, larger first: concurrency per worker."""
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def worker_seed(seed: int, stream: int, worker_index: int) -> int:
    """Independent, reproducible random streams per (run seed, stream, worker). Stream 0 is a worker's
    input data; stream ``1 + level index`` its Poisson arrivals in that level."""
    return int(np.random.SeedSequence([seed, stream, worker_index]).generate_state(1)[0])
