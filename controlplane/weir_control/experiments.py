"""A/B tests: a sticky split between arms, outcomes attributed by routing key, and each arm's
difference from the control (the first arm) with a confidence interval and a p-value.

RATE outcomes (0/1): two-proportion z-test (pooled standard error for the test, unpooled for the
interval). MEAN outcomes: Welch's t-test from each arm's count, mean and variance, with the
Welch-Satterthwaite degrees of freedom for the interval. Attribution uses the same weighted
rendezvous hashing as the data planes (``weir_proto.routing``), so an outcome lands on the arm that
served the key.
"""

from __future__ import annotations

import math

import grpc
from scipy import stats

from weir_control.attach import DesiredStateHub
from weir_control.auditing import read_if_there
from weir_control.domain import experiments as ab
from weir_control.domain.experiments import Kind
from weir_control.services import Auditor, _read, refuse_if_protected
from weir_control.store import Store
from weir_proto.control.v1 import deployments_pb2, experiments_pb2, experiments_pb2_grpc
from weir_proto.errors import InvalidArgumentError, WeirError

MAX_OUTCOMES_PER_CALL = 10_000  # RecordOutcomes: at most ~10 MiB of keys per call, one transaction


def arm_results(
    test: experiments_pb2.ABTest, sums: dict[str, tuple[int, float, float]]
) -> list[experiments_pb2.ArmResult]:
    alpha = 1 - test.confidence
    summaries = []
    for arm in test.arms:
        count, total, squares = sums.get(arm.variant, (0, 0.0, 0.0))
        mean = total / count if count else 0.0
        variance = (squares - count * mean * mean) / (count - 1) if count > 1 else 0.0
        summaries.append((arm.variant, count, mean, max(variance, 0.0)))
    control = summaries[0]
    results = []
    for variant, count, mean, variance in summaries:
        result = experiments_pb2.ArmResult(variant=variant, count=count, mean=mean, stddev=math.sqrt(variance))
        if variant != control[0] and count > 1 and control[1] > 1:
            result.difference = mean - control[2]
            if test.kind == Kind.RATE:
                p_value, low, high = _two_proportions(control[1], control[2], count, mean, alpha)
            else:
                p_value, low, high = _welch(control[1], control[2], control[3], count, mean, variance, alpha)
            result.p_value, result.ci_low, result.ci_high = p_value, low, high
            result.significant = p_value < alpha
        elif variant != control[0]:
            result.p_value = 1.0
        results.append(result)
    return results


def _two_proportions(n1: int, p1: float, n2: int, p2: float, alpha: float) -> tuple[float, float, float]:
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    pooled_se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    difference = p2 - p1
    p_value = 1.0 if pooled_se == 0 else float(2 * stats.norm.sf(abs(difference) / pooled_se))
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    z = float(stats.norm.ppf(1 - alpha / 2))
    return p_value, difference - z * se, difference + z * se


def _welch(
    n1: int, mean1: float, var1: float, n2: int, mean2: float, var2: float, alpha: float
) -> tuple[float, float, float]:
    difference = mean2 - mean1
    se2 = var1 / n1 + var2 / n2
    if se2 == 0:
        return (1.0 if difference == 0 else 0.0), difference, difference
    result = stats.ttest_ind_from_stats(mean2, math.sqrt(var2), n2, mean1, math.sqrt(var1), n1, equal_var=False)
    freedom = se2**2 / ((var1 / n1) ** 2 / (n1 - 1) + (var2 / n2) ** 2 / (n2 - 1))
    t = float(stats.t.ppf(1 - alpha / 2, freedom))
    se = math.sqrt(se2)
    return float(result.pvalue), difference - t * se, difference + t * se


class ExperimentsService(experiments_pb2_grpc.ExperimentsServicer):
    def __init__(self, store: Store, auditor: Auditor, hub: DesiredStateHub) -> None:
        self._store = store
        self._auditor = auditor
        self._hub = hub

    async def StartABTest(
        self, request: experiments_pb2.StartABTestRequest, context: grpc.aio.ServicerContext
    ) -> experiments_pb2.ABTest:
        try:
            test, variants = ab.start(request)
        except WeirError as error:
            await self._auditor.refuse(context, "Experiments/StartABTest", f"endpoint/{request.endpoint}", error)
        routing = deployments_pb2.RoutingPolicy(key_parameter=request.key_parameter, key_header=request.key_header)
        identity = self._auditor.identity(context)
        existing = await read_if_there(context, lambda: self._store.get_deployment(request.endpoint))
        await refuse_if_protected(
            self._auditor,
            context,
            "Experiments/StartABTest",
            f"endpoint/{request.endpoint}",
            [existing] if existing else [],
        )

        def start() -> experiments_pb2.ABTest:
            self._store.deploy(request.endpoint, variants, identity.name, routing)
            self._store.reset_outcomes(request.endpoint)
            self._store.save_ab_test(test)
            return test

        # the deploy, the reset, the test and its audit event: one unit of work (the hub hears the
        # revision the deploy bumped from the database)
        return await self._auditor.run(
            context, "Experiments/StartABTest", f"endpoint/{request.endpoint}", lambda: None, start, atomic=True
        )

    async def RecordOutcome(
        self, request: experiments_pb2.RecordOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> experiments_pb2.RecordOutcomeResponse:
        def record() -> str:
            ab.check_outcome(request.routing_key, request.value, Kind.MEAN, "")  # bounds before the lookup
            test = self._store.get_ab_test(request.endpoint)
            outcome = [(request.routing_key, request.value)]
            [(variant, key, value)] = ab.attribute(test, request.endpoint, request.metric, outcome, batch=False)
            self._store.record_outcome(request.endpoint, variant, test.metric, key, value)
            return variant

        variant = await self._auditor.run(
            context,
            "Experiments/RecordOutcome",
            f"endpoint/{request.endpoint}",
            lambda: None,
            record,
            lambda chosen: experiments_pb2.RecordOutcomeResponse(variant=chosen),
            atomic=True,
        )
        return experiments_pb2.RecordOutcomeResponse(variant=variant)

    async def RecordOutcomes(
        self, request: experiments_pb2.RecordOutcomesRequest, context: grpc.aio.ServicerContext
    ) -> experiments_pb2.RecordOutcomesResponse:
        """Outcomes in bulk (`weir ab outcome E --file`): each checked as RecordOutcome checks one, then
        all recorded in one transaction; one refused outcome (named by its index) refuses the call."""

        def record() -> experiments_pb2.RecordOutcomesResponse:
            if not request.outcomes or len(request.outcomes) > MAX_OUTCOMES_PER_CALL:
                raise InvalidArgumentError(
                    f"outcomes: expected 1 to {MAX_OUTCOMES_PER_CALL} per call, got {len(request.outcomes)}"
                )
            test = self._store.get_ab_test(request.endpoint)
            outcomes = [(outcome.routing_key, outcome.value) for outcome in request.outcomes]
            rows = ab.attribute(test, request.endpoint, request.metric, outcomes, batch=True)
            self._store.record_outcomes(request.endpoint, test.metric, rows)
            response = experiments_pb2.RecordOutcomesResponse(recorded=len(rows))
            for variant, _, _ in rows:
                response.per_variant[variant] = response.per_variant.get(variant, 0) + 1
            return response

        return await self._auditor.run(
            context, "Experiments/RecordOutcomes", f"endpoint/{request.endpoint}", lambda: None, record, atomic=True
        )

    async def GetABTest(
        self, request: experiments_pb2.GetABTestRequest, context: grpc.aio.ServicerContext
    ) -> experiments_pb2.ABTest:
        def status() -> experiments_pb2.ABTest:
            test = self._store.get_ab_test(request.endpoint)
            test.results.extend(arm_results(test, self._store.outcome_sums(request.endpoint, test.metric)))
            return test

        return await _read(context, status)

    async def StopABTest(
        self, request: experiments_pb2.GetABTestRequest, context: grpc.aio.ServicerContext
    ) -> experiments_pb2.ABTest:
        def stop() -> experiments_pb2.ABTest:
            stopped, _ = ab.stop(self._store.get_ab_test(request.endpoint))
            self._store.save_ab_test(stopped)
            return stopped

        return await self._auditor.run(
            context, "Experiments/StopABTest", f"endpoint/{request.endpoint}", lambda: None, stop, atomic=True
        )
