"""weir_control.rollouts: interval deltas over replicas (restarts included), p99 from histogram
buckets, and the verdicts."""

from __future__ import annotations

from weir_control.rollouts import VariantWindow, interval_totals, judge, with_defaults
from weir_proto.control.v1 import rollouts_pb2

BOUNDS = [0.001, 0.01, 0.1]


def window(ok: int, failed: int, counts: list[int]) -> VariantWindow:
    return VariantWindow(ok, failed, counts, BOUNDS)


def test_interval_totals_subtract_the_previous_look_and_restart_counting_after_a_restart() -> None:
    before = {("r1", "canary"): window(10, 1, [5, 5, 1, 0]), ("r2", "canary"): window(50, 0, [50, 0, 0, 0])}
    now = {("r1", "canary"): window(30, 2, [20, 10, 2, 0]), ("r2", "canary"): window(4, 0, [4, 0, 0, 0])}
    total = interval_totals(now, before)["canary"]
    assert (total.succeeded, total.failed) == (20 + 4, 1 + 0)  # r2 went back to 4: it restarted
    assert total.counts == [15 + 4, 5, 1, 0]


def test_p99_is_the_upper_bound_of_the_bucket_holding_it() -> None:
    assert window(100, 0, [98, 1, 1, 0]).p99_ms() == 10.0
    assert window(100, 0, [100, 0, 0, 0]).p99_ms() == 1.0
    assert window(0, 0, [0, 0, 0, 0]).p99_ms() == 0.0


def test_verdicts() -> None:
    thresholds = with_defaults(rollouts_pb2.AnalysisThresholds(min_requests=10))
    healthy = window(100, 0, [100, 0, 0, 0])
    assert judge(window(5, 0, [5, 0, 0, 0]), healthy, thresholds)[0] == "INCONCLUSIVE"
    assert judge(window(100, 0, [100, 0, 0, 0]), healthy, thresholds)[0] == "PASS"
    verdict, reason = judge(window(90, 10, [100, 0, 0, 0]), healthy, thresholds)
    assert verdict == "FAIL" and "error rate 0.100" in reason
    verdict, reason = judge(window(100, 0, [0, 0, 100, 0]), healthy, thresholds)  # 100 ms vs 1 ms
    assert verdict == "FAIL" and "p99 100.0 ms" in reason
    assert judge(window(100, 0, [0, 100, 0, 0]), healthy, thresholds)[0] == "FAIL"  # 10 > 1*1.5 + 5
