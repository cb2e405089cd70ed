"""weir_control.experiments: the per-arm statistics against the control."""

from __future__ import annotations

import numpy as np

from weir_control.experiments import arm_results
from weir_proto.control.v1 import experiments_pb2

Kind = experiments_pb2.StartABTestRequest.Kind


def ab_test(kind: int) -> experiments_pb2.ABTest:
    return experiments_pb2.ABTest(
        kind=kind, confidence=0.95,
        arms=[experiments_pb2.ABArm(variant="a", weight=50), experiments_pb2.ABArm(variant="b", weight=50)],
    )  # fmt: skip


def sums(values: np.ndarray) -> tuple[int, float, float]:
    return len(values), float(values.sum()), float((values * values).sum())


def test_a_planted_conversion_lift_is_significant_and_no_lift_is_not() -> None:
    control = np.array([1.0] * 200 + [0.0] * 1800)  # 10%
    lifted = np.array([1.0] * 300 + [0.0] * 1700)  # 15%
    same = np.array([1.0] * 204 + [0.0] * 1796)  # 10.2%
    _, b = arm_results(ab_test(Kind.RATE), {"a": sums(control), "b": sums(lifted)})
    assert b.significant and b.p_value < 1e-5 and abs(b.difference - 0.05) < 1e-9
    assert 0.0 < b.ci_low < 0.05 < b.ci_high
    _, b = arm_results(ab_test(Kind.RATE), {"a": sums(control), "b": sums(same)})
    assert not b.significant and b.p_value > 0.5 and b.ci_low < 0 < b.ci_high


def test_a_planted_revenue_difference_is_significant_by_welch_and_none_is_not() -> None:
    rng = np.random.default_rng(0)
    control = rng.normal(10.0, 2.0, 800)
    a, b = arm_results(ab_test(Kind.MEAN), {"a": sums(control), "b": sums(rng.normal(10.6, 3.0, 800))})
    assert a.p_value == 0 and not a.significant  # the control is not tested against itself
    assert b.significant and b.ci_low > 0
    _, b = arm_results(ab_test(Kind.MEAN), {"a": sums(control), "b": sums(rng.normal(10.0, 3.0, 800))})
    assert not b.significant


def test_arms_without_enough_outcomes_are_never_significant() -> None:
    results = arm_results(ab_test(Kind.RATE), {"a": (1, 1.0, 1.0)})
    assert [(r.variant, r.count, r.significant, r.p_value) for r in results] == [
        ("a", 1, False, 0.0),
        ("b", 0, False, 1.0),
    ]
