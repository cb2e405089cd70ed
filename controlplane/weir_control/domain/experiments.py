"""A/B tests: starting one (its arms become the endpoint's variants), recording outcomes against the
arm that served the routing key, stopping it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from weir_control.domain.events import Event
from weir_control.domain.names import MAX_NAME_LENGTH, check_name
from weir_proto.control.v1 import deployments_pb2, experiments_pb2
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError
from weir_proto.routing import variant_for_key

Kind = experiments_pb2.StartABTestRequest.Kind
MAX_OUTCOME_MAGNITUDE = 1e12  # |value| of a MEAN outcome: squares stay far inside float range
MAX_ROUTING_KEY = 1024


def start(request: experiments_pb2.StartABTestRequest) -> tuple[experiments_pb2.ABTest, list[deployments_pb2.Variant]]:
    """A new running test and the variants to deploy at its endpoint (one per arm, the arm's weight);
    deploying them is the deployments' transition (which tells data planes)."""
    return new_test(request), [arm_variant(arm) for arm in request.arms]


def stop(test: experiments_pb2.ABTest) -> tuple[experiments_pb2.ABTest, list[Event]]:
    """The test, stopped (outcomes are refused from now; the endpoint keeps serving its arms)."""
    stopped = experiments_pb2.ABTest()
    stopped.CopyFrom(test)
    stopped.running = False
    return stopped, []


def attribute(
    test: experiments_pb2.ABTest, endpoint: str, metric: str, outcomes: Sequence[tuple[str, float]], batch: bool
) -> list[tuple[str, str, float]]:
    """``(routing key, value)`` outcomes as ``(arm, routing key, value)`` rows: each checked, and
    attributed to the arm that served its key (the data planes' rendezvous hashing)."""
    if not test.running:
        raise FailedPreconditionError(f"endpoint '{endpoint}': the A/B test was stopped")
    if metric and metric != test.metric:
        raise InvalidArgumentError(f"metric: expected '{test.metric}', got '{metric}'")
    arms = [(arm.variant, arm.weight) for arm in test.arms]
    rows = []
    for index, (key, value) in enumerate(outcomes):
        check_outcome(key, value, test.kind, f"outcomes[{index}]." if batch else "")
        rows.append((variant_for_key(key, arms), key, value))
    return rows


def check_outcome(key: str, value: float, kind: int, prefix: str) -> None:
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


def new_test(request: experiments_pb2.StartABTestRequest) -> experiments_pb2.ABTest:
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


def arm_variant(arm: experiments_pb2.ABArm) -> deployments_pb2.Variant:
    variant = deployments_pb2.Variant(name=arm.variant, model_name=arm.model_name, weight=arm.weight)
    if arm.WhichOneof("target") == "alias":
        variant.alias = arm.alias
    else:
        variant.version = arm.version
    return variant
