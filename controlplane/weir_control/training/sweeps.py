"""Sweeps as pure functions: the trials' parameters (grid or random search over a declared space), the
median stopping rule, and the best trial."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Mapping

from weir_proto.control.v1 import training_pb2
from weir_proto.errors import InvalidArgumentError

MAX_TRIALS = 1000


def _value(space: training_pb2.ParamSpace, rng: random.Random) -> training_pb2.ParamValue:
    if space.values:
        chosen = training_pb2.ParamValue()
        chosen.CopyFrom(rng.choice(list(space.values)))
        return chosen
    low, high = space.low, space.high
    number = math.exp(rng.uniform(math.log(low), math.log(high))) if space.log else rng.uniform(low, high)
    if space.integer:
        return training_pb2.ParamValue(integer=round(number))
    return training_pb2.ParamValue(number=number)


def check_space(sweep: training_pb2.SweepSpec) -> None:
    if sweep.method not in ("grid", "random"):
        raise InvalidArgumentError(f"sweep.method: expected 'grid' or 'random', got {sweep.method!r}")
    if not sweep.space:
        raise InvalidArgumentError("sweep.space: expected at least one parameter, got none")
    if not sweep.metric:
        raise InvalidArgumentError("sweep.metric: expected the metric that ranks trials, got ''")
    for name, space in sweep.space.items():
        where = f"sweep.space['{name}']"
        if sweep.method == "grid" and not space.values:
            raise InvalidArgumentError(f"{where}.values: a grid needs the values to try, got none")
        if not space.values:
            if not space.low < space.high:
                raise InvalidArgumentError(f"{where}: expected low < high, got {space.low} and {space.high}")
            if space.log and space.low <= 0:
                raise InvalidArgumentError(f"{where}.low: a log range must be above 0, got {space.low}")
    if sweep.method == "random" and not 0 < sweep.trials <= MAX_TRIALS:
        raise InvalidArgumentError(f"sweep.trials: expected 1 to {MAX_TRIALS} for a random search, got {sweep.trials}")


def trial_parameters(sweep: training_pb2.SweepSpec) -> list[dict[str, training_pb2.ParamValue]]:
    """Each trial's overrides: every combination for a grid, ``trials`` draws (seeded) for random."""
    check_space(sweep)
    names = sorted(sweep.space)
    if sweep.method == "grid":
        combinations = list(itertools.product(*[list(sweep.space[name].values) for name in names]))
        if len(combinations) > MAX_TRIALS:
            raise InvalidArgumentError(f"sweep.space: the grid has {len(combinations)} trials, more than {MAX_TRIALS}")
        return [dict(zip(names, combination, strict=True)) for combination in combinations]
    rng = random.Random(sweep.seed)
    return [{name: _value(sweep.space[name], rng) for name in names} for _ in range(sweep.trials)]


def worse_than_median(value: float, others: list[float], maximize: bool) -> bool:
    """The median stopping rule (as in Vizier / Ray Tune's median stopping): stop a trial whose metric
    at a step is worse than the median of the other trials at that step. Needs at least two others."""
    if len(others) < 2:
        return False
    median = statistics.median(others)
    return value < median if maximize else value > median


def best_trial(trials: Mapping[str, training_pb2.Job], metric: str, maximize: bool) -> tuple[str, float] | None:
    """The succeeded trial with the best last value of ``metric``."""
    scored = [
        (job.metrics[metric], trial_id)
        for trial_id, job in trials.items()
        if job.state == training_pb2.Job.SUCCEEDED and metric in job.metrics
    ]
    if not scored:
        return None
    value, trial_id = (max if maximize else min)(scored)
    return trial_id, value
