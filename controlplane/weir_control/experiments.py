"""A/B tests: a sticky split between arms, outcomes attributed by routing key, and each arm's
difference from the control (the first arm) with a confidence interval and a p-value.

RATE outcomes (0/1): two-proportion z-test (pooled standard error for the test, unpooled for the
interval). MEAN outcomes: Welch's t-test from each arm's count, mean and variance, with the
Welch-Satterthwaite degrees of freedom for the interval. Attribution uses the same weighted
rendezvous hashing as the data planes (``weir_proto.routing``), so an outcome lands on the arm that
served the key.
"""

from __future__ import annotations

import asyncio
import math

import grpc
from scipy import stats

from weir_control.attach import DesiredStateHub
from weir_control.services import Auditor, _read, refuse_if_protected
from weir_control.store import Store
from weir_control.store.store import MAX_NAME_LENGTH, check_name
from weir_proto.control.v1 import deployments_pb2, experiments_pb2, experiments_pb2_grpc
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, WeirError
from weir_proto.routing import variant_for_key

Kind = experiments_pb2.StartABTestRequest.Kind
MAX_OUTCOME_MAGNITUDE = 1e12  # |value| of a MEAN outcome: squares stay far inside float range
MAX_ROUTING_KEY = 1024
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
            test = _new_test(request)
        except WeirError as error:
            await self._auditor.refuse(context, "Experiments/StartABTest", f"endpoint/{request.endpoint}", error)
        variants = [_variant(arm) for arm in request.arms]
        routing = deployments_pb2.RoutingPolicy(key_parameter=request.key_parameter, key_header=request.key_header)
        identity = self._auditor.identity(context)
        try:
            existing = [await asyncio.to_thread(self._store.get_deployment, request.endpoint)]
        except WeirError:
            existing = []
        await refuse_if_protected(
            self._auditor, context, "Experiments/StartABTest", f"endpoint/{request.endpoint}", existing
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
            _check_outcome(request.routing_key, request.value, Kind.MEAN, "")  # bounds before the lookup
            test = self._running_test(request.endpoint, request.metric)
            _check_outcome(request.routing_key, request.value, test.kind, "")
            variant = variant_for_key(request.routing_key, [(arm.variant, arm.weight) for arm in test.arms])
            self._store.record_outcome(request.endpoint, variant, test.metric, request.routing_key, request.value)
            return variant

        variant = await self._auditor.run(
            context,
            "Experiments/RecordOutcome",
            f"endpoint/{request.endpoint}",
            lambda: None,
            record,
            lambda chosen: experiments_pb2.RecordOutcomeResponse(variant=chosen),
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
            test = self._running_test(request.endpoint, request.metric)
            arms = [(arm.variant, arm.weight) for arm in test.arms]
            rows = []
            for index, outcome in enumerate(request.outcomes):
                _check_outcome(outcome.routing_key, outcome.value, test.kind, f"outcomes[{index}].")
                rows.append((variant_for_key(outcome.routing_key, arms), outcome.routing_key, outcome.value))
            self._store.record_outcomes(request.endpoint, test.metric, rows)
            response = experiments_pb2.RecordOutcomesResponse(recorded=len(rows))
            for variant, _, _ in rows:
                response.per_variant[variant] = response.per_variant.get(variant, 0) + 1
            return response

        return await self._auditor.run(
            context, "Experiments/RecordOutcomes", f"endpoint/{request.endpoint}", lambda: None, record
        )

    def _running_test(self, endpoint: str, metric: str) -> experiments_pb2.ABTest:
        test = self._store.get_ab_test(endpoint)
        if not test.running:
            raise FailedPreconditionError(f"endpoint '{endpoint}': the A/B test was stopped")
        if metric and metric != test.metric:
            raise InvalidArgumentError(f"metric: expected '{test.metric}', got '{metric}'")
        return test

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
            test = self._store.get_ab_test(request.endpoint)
            test.running = False
            self._store.save_ab_test(test)
            return test

        return await self._auditor.run(
            context, "Experiments/StopABTest", f"endpoint/{request.endpoint}", lambda: None, stop
        )


def _check_outcome(key: str, value: float, kind: int, prefix: str) -> None:
    """One outcome's key and value (``prefix`` names it within a batch: ``outcomes[3].``)."""
    if not math.isfinite(value) or abs(value) > MAX_OUTCOME_MAGNITUDE:
        raise InvalidArgumentError(
            f"{prefix}value: expected a finite number within +-{MAX_OUTCOME_MAGNITUDE:g}, got {value}"
        )
    if len(key) > MAX_ROUTING_KEY:
        raise InvalidArgumentError(
            f"{prefix}routing_key: expected at most {MAX_ROUTING_KEY} characters, got {len(key)}"
        )
    if not key:
        raise InvalidArgumentError(f"{prefix}routing_key: expected the key the request was routed by, got none")
    if kind == Kind.RATE and value not in (0.0, 1.0):
        raise InvalidArgumentError(f"{prefix}value: expected 0 or 1 for a rate, got {value}")


def _new_test(request: experiments_pb2.StartABTestRequest) -> experiments_pb2.ABTest:
    if len(request.arms) < 2:
        raise InvalidArgumentError(f"arms: expected at least two (the first is the control), got {len(request.arms)}")
    if request.kind not in (Kind.RATE, Kind.MEAN):
        raise InvalidArgumentError("kind: expected RATE or MEAN, got neither")
    if not request.metric:
        raise InvalidArgumentError("metric: expected a name for the outcome, got none")
    check_name("metric", request.metric)
    check_name("endpoint", request.endpoint)
    for field in ("key_parameter", "key_header"):
        if len(getattr(request, field)) > MAX_NAME_LENGTH:
            raise InvalidArgumentError(
                f"{field}: expected at most {MAX_NAME_LENGTH} characters, got {len(getattr(request, field))}"
            )
    confidence = request.confidence or 0.95
    if not math.isfinite(confidence) or not 0.5 <= confidence < 1:
        raise InvalidArgumentError(f"confidence: expected 0.5 <= confidence < 1, got {confidence}")
    if any(arm.weight == 0 for arm in request.arms):
        raise InvalidArgumentError("arms weight: expected every arm to get traffic, got a weight of 0")
    return experiments_pb2.ABTest(
        endpoint=request.endpoint,
        metric=request.metric,
        kind=request.kind,
        confidence=confidence,
        running=True,
        arms=request.arms,
        test="two-proportion z-test" if request.kind == Kind.RATE else "Welch's t-test",
    )


def _variant(arm: experiments_pb2.ABArm) -> deployments_pb2.Variant:
    variant = deployments_pb2.Variant(name=arm.variant, model_name=arm.model_name, weight=arm.weight)
    if arm.WhichOneof("target") == "alias":
        variant.alias = arm.alias
    else:
        variant.version = arm.version
    return variant
