"""weir_control.rollouts: interval deltas over replicas (restarts included), p99 interpolated within
histogram buckets, and the verdicts."""

from __future__ import annotations

import pytest

from weir.metrics import LATENCY_BUCKETS_SECONDS
from weir_control.rollouts import Look, VariantWindow, interval_totals, judge, robust_verdict, with_defaults
from weir_proto.control.v1 import rollouts_pb2

BOUNDS = [0.001, 0.01, 0.1]


def window(ok: int, failed: int, counts: list[int]) -> VariantWindow:
    return VariantWindow(ok, failed, counts, BOUNDS)


def look(windows: dict[tuple[str, str], VariantWindow], identities: dict[str, str] | None = None) -> Look:
    streams = {stream for stream, _ in windows}
    return Look(
        {(stream, variant, 1): value for (stream, variant), value in windows.items()},
        identities or dict.fromkeys(streams, "replicas"),
    )


def test_interval_totals_subtract_the_previous_look_per_stream() -> None:
    before = look({("r1", "canary"): window(10, 1, [5, 5, 1, 0]), ("r2", "canary"): window(50, 0, [50, 0, 0, 0])})
    now = look({("r1", "canary"): window(30, 2, [20, 10, 2, 0]), ("r2", "canary"): window(54, 0, [54, 0, 0, 0])})
    total = interval_totals(now, before)["replicas"]["canary"]
    assert (total.succeeded, total.failed) == (20 + 4, 1 + 0)
    assert total.counts == [15 + 4, 5, 1, 0]


def test_a_new_stream_counts_nothing_in_its_first_interval_and_a_new_variant_counts_from_zero() -> None:
    before = look({("r1", "primary"): window(10, 0, [10, 0, 0, 0])})
    now = look(
        {
            ("r1", "primary"): window(12, 0, [12, 0, 0, 0]),
            ("r1", "canary"): window(5, 0, [5, 0, 0, 0]),  # sent to r1 after the last look
            ("r9", "canary"): window(10**6, 0, [10**6, 0, 0, 0]),  # attached since: a starting point only
        }
    )
    totals = interval_totals(now, before)
    assert (totals["replicas"]["primary"].requests, totals["replicas"]["canary"].requests) == (2, 5)
    same = look({("r1", "primary"): window(12, 0, [12, 0, 0, 0])}, {"r1": "a", "r2": "b"})
    quiet = interval_totals(same, same)
    assert set(quiet) == {"a", "b"}  # r2 reported nothing: its identity still counts as attached


def test_one_identity_alone_does_not_decide_while_another_reports() -> None:
    thresholds = with_defaults(rollouts_pb2.AnalysisThresholds(min_requests=20))
    honest = {"canary": window(3, 0, [3, 0, 0, 0]), "primary": window(60, 0, [60, 0, 0, 0])}
    invented = {"canary": window(1000, 0, [1000, 0, 0, 0]), "primary": window(10, 0, [10, 0, 0, 0])}
    verdict, reason, _, _ = robust_verdict({"node": honest, "fake": invented}, "canary", "primary", thresholds)
    assert verdict == "INCONCLUSIVE" and "without those of 'fake'" in reason
    failing = {"canary": window(0, 1000, [1000, 0, 0, 0]), "primary": window(10, 0, [10, 0, 0, 0])}
    assert robust_verdict({"node": honest, "fake": failing}, "canary", "primary", thresholds)[0] == "INCONCLUSIVE"
    # one identity (one replica, or every replica on one token): its reports decide
    assert robust_verdict({"node": invented}, "canary", "primary", thresholds)[0] == "PASS"
    # an attached identity that served nothing disagrees with one that claims everything
    idle = {"canary": window(0, 0, [0, 0, 0, 0]), "primary": window(0, 0, [0, 0, 0, 0])}
    assert robust_verdict({"node": idle, "fake": invented}, "canary", "primary", thresholds)[0] == "INCONCLUSIVE"
    assert robust_verdict({"node": {}, "fake": invented}, "canary", "primary", thresholds)[0] == "INCONCLUSIVE"
    # two honest identities that agree: decided
    healthy = {"canary": window(40, 0, [40, 0, 0, 0]), "primary": window(40, 0, [40, 0, 0, 0])}
    assert robust_verdict({"a": healthy, "b": healthy}, "canary", "primary", thresholds)[0] == "PASS"


def test_p99_is_interpolated_within_the_bucket_holding_it() -> None:
    assert window(100, 0, [98, 1, 1, 0]).p99_ms() == pytest.approx(10.0)  # the 99th is the 10 ms bucket's last
    assert window(100, 0, [100, 0, 0, 0]).p99_ms() == pytest.approx(0.99)  # the first bucket starts at 0
    assert window(200, 0, [0, 100, 100, 0]).p99_ms() == pytest.approx(10 + 90 * 98 / 100)
    assert window(100, 0, [0, 0, 0, 100]).p99_ms() == pytest.approx(100.0)  # +Inf: the last bound
    assert window(0, 0, [0, 0, 0, 0]).p99_ms() == 0.0


def test_a_canary_alike_its_baseline_passes_with_their_p99_either_side_of_a_bucket_bound() -> None:
    """Issue 15 (the MLOps loop): the same latency, the 99th percentile near 10 ms, one variant's in
    the 5-10 ms bucket and the other's in the 10-25 ms one. The buckets' upper bounds read 10 and 25 ms
    (limit 10 x 1.5 + 5 = 20): a healthy canary was rolled back on noise."""
    bounds = list(LATENCY_BUCKETS_SECONDS)

    def latency(per_bucket: dict[float, int]) -> VariantWindow:
        counts = [per_bucket.get(bound, 0) for bound in bounds] + [0]
        return VariantWindow(sum(counts), 0, counts, bounds)

    thresholds = with_defaults(rollouts_pb2.AnalysisThresholds())
    baseline = latency({0.005: 500, 0.01: 491, 0.025: 9})
    canary = latency({0.005: 500, 0.01: 489, 0.025: 11})
    verdict, reason = judge(canary, baseline, thresholds)
    assert verdict == "PASS", reason
    assert canary.p99_ms() == pytest.approx(10 + 15 / 11) and baseline.p99_ms() == pytest.approx(5 + 5 * 490 / 491)
    # a canary really slower (5% of its requests above 10 ms): still a failure
    verdict, reason = judge(latency({0.005: 500, 0.01: 450, 0.025: 50}), baseline, thresholds)
    assert verdict == "FAIL" and "p99 22.0 ms vs baseline 10.0 ms" in reason
    # a baseline that served fewer than min_requests (at 100%: leftovers) is no latency reference
    verdict, reason = judge(latency({0.005: 500, 0.01: 450, 0.025: 50}), latency({0.001: 19}), thresholds)
    assert verdict == "PASS" and "not compared (the baseline served 19 requests, fewer than 20)" in reason


def test_verdicts() -> None:
    thresholds = with_defaults(rollouts_pb2.AnalysisThresholds(min_requests=10))
    healthy = window(100, 0, [100, 0, 0, 0])
    assert judge(window(5, 0, [5, 0, 0, 0]), healthy, thresholds)[0] == "INCONCLUSIVE"
    assert judge(window(100, 0, [100, 0, 0, 0]), healthy, thresholds)[0] == "PASS"
    verdict, reason = judge(window(90, 10, [100, 0, 0, 0]), healthy, thresholds)
    assert verdict == "FAIL" and "error rate 0.100" in reason
    verdict, reason = judge(window(100, 0, [0, 0, 100, 0]), healthy, thresholds)  # 100 ms vs 1 ms
    assert verdict == "FAIL" and "p99 99.1 ms" in reason
    assert judge(window(100, 0, [0, 100, 0, 0]), healthy, thresholds)[0] == "FAIL"  # 10 > 1*1.5 + 5
    assert judge(window(0, 0, [0, 0, 0, 0]), healthy, rollouts_pb2.AnalysisThresholds())[0] == "INCONCLUSIVE"
