"""Sweep planning as pure functions: grid and random trials, the median stopping rule, the best trial."""

from __future__ import annotations

import pytest

from weir_control.training import sweeps
from weir_proto.control.v1 import training_pb2
from weir_proto.errors import InvalidArgumentError

Value = training_pb2.ParamValue


def sweep(method: str = "grid", **space: training_pb2.ParamSpace) -> training_pb2.SweepSpec:
    spec = training_pb2.SweepSpec(method=method, metric="val_loss", trials=20, seed=7)
    for name, values in space.items():
        spec.space[name].CopyFrom(values)
    return spec


def test_a_grid_has_every_combination_once() -> None:
    plan = sweeps.trial_parameters(
        sweep(
            lr=training_pb2.ParamSpace(values=[Value(number=0.1), Value(number=0.01)]),
            hidden=training_pb2.ParamSpace(values=[Value(text="32"), Value(text="64,32"), Value(text="128")]),
        )
    )
    pairs = {(trial["lr"].number, trial["hidden"].text) for trial in plan}
    assert len(plan) == 6 and len(pairs) == 6


def test_random_search_is_seeded_and_stays_in_its_ranges() -> None:
    spec = sweep(
        "random",
        lr=training_pb2.ParamSpace(low=1e-4, high=1e-1, log=True),
        layers=training_pb2.ParamSpace(low=1, high=4, integer=True),
    )
    plan = sweeps.trial_parameters(spec)
    assert plan == sweeps.trial_parameters(spec)  # the same seed, the same trials
    assert all(1e-4 <= trial["lr"].number <= 1e-1 for trial in plan)
    assert all(1 <= trial["layers"].integer <= 4 for trial in plan)
    assert sum(trial["lr"].number < 1e-2 for trial in plan) >= 8  # log-uniform: most draws are small


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (sweep("bayes", lr=training_pb2.ParamSpace(values=[Value(number=1)])), "sweep.method"),
        (sweep("grid"), "sweep.space: expected at least one"),
        (sweep("grid", lr=training_pb2.ParamSpace(low=0.1, high=1)), "a grid needs the values"),
        (sweep("random", lr=training_pb2.ParamSpace(low=1, high=0.1)), "expected low < high"),
        (sweep("random", lr=training_pb2.ParamSpace(low=0, high=1, log=True)), "a log range must be above 0"),
    ],
)
def test_bad_spaces_name_the_field(spec: training_pb2.SweepSpec, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        sweeps.trial_parameters(spec)


def test_the_median_rule_stops_only_trials_worse_than_the_median_of_two_or_more_others() -> None:
    assert sweeps.worse_than_median(0.9, [0.5, 0.6, 0.7], maximize=False)
    assert not sweeps.worse_than_median(0.55, [0.5, 0.6, 0.7], maximize=False)
    assert sweeps.worse_than_median(0.2, [0.5, 0.6], maximize=True)
    assert not sweeps.worse_than_median(0.9, [0.1], maximize=False)  # one other trial is no median


def test_the_best_trial_is_the_succeeded_one_with_the_best_metric() -> None:
    def job(state: int, value: float) -> training_pb2.Job:
        return training_pb2.Job(state=state, metrics={"val_loss": value})  # type: ignore[arg-type]

    trials = {
        "a": job(training_pb2.Job.SUCCEEDED, 0.4),
        "b": job(training_pb2.Job.SUCCEEDED, 0.2),
        "c": job(training_pb2.Job.CANCELLED, 0.1),  # stopped early: not a candidate
    }
    assert sweeps.best_trial(trials, "val_loss", maximize=False) == ("b", 0.2)
    assert sweeps.best_trial(trials, "val_loss", maximize=True) == ("a", 0.4)
    assert sweeps.best_trial({}, "val_loss", maximize=False) is None
