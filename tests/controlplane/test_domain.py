"""The domain transitions, pure: (state, command) -> (new state, events). Whether data planes must
hear of a change (ServingChanged: the store bumps the desired-state revision) is decided here."""

from __future__ import annotations

import pytest

from weir_control.domain import aliases, deployments
from weir_control.domain import experiments as ab
from weir_control.domain.events import AliasDeleted, AliasMoved, ServingChanged, serving_changed
from weir_proto.control.v1 import deployments_pb2, experiments_pb2, registry_pb2
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

READY, PENDING = registry_pb2.ModelVersion.READY, registry_pb2.ModelVersion.PENDING


def version(number: int, state: int = READY) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(model_name="mlp", version=number, state=state)


def test_moving_an_alias_is_heard_only_when_it_moves_and_an_endpoint_follows_it() -> None:
    assert aliases.move_alias("champion", None, version(1), []) == (1, [AliasMoved("mlp", "champion", None, 1)])
    after, events = aliases.move_alias("champion", 1, version(2), ["search", "web"])
    assert after == 2 and serving_changed(events)
    assert events[1] == ServingChanged(("search", "web"), "model 'mlp' alias 'champion' moved to 2")
    assert aliases.move_alias("champion", 2, version(2), ["search"]) == (2, [])  # already there


@pytest.mark.parametrize(
    ("alias", "target", "error", "words"),
    [
        ("7", version(1), InvalidArgumentError, "not a number"),
        ("a/b", version(1), InvalidArgumentError, "alias: expected"),
        ("champion", version(3, PENDING), FailedPreconditionError, "expected a READY version"),
    ],
)
def test_an_alias_is_refused_a_bad_name_or_a_version_that_is_not_ready(alias, target, error, words) -> None:
    with pytest.raises(error, match=words):
        aliases.move_alias(alias, None, target, [])


def test_a_followed_alias_is_never_deleted_so_a_deletion_changes_nothing_served() -> None:
    with pytest.raises(FailedPreconditionError, match="followed by endpoint\\(s\\) 'web'"):
        aliases.delete_alias("mlp", "champion", True, ["web"])
    with pytest.raises(NotFoundError, match="has no alias 'gone'"):
        aliases.delete_alias("mlp", "gone", False, [])
    events = aliases.delete_alias("mlp", "champion", True, [])
    assert events == [AliasDeleted("mlp", "champion")] and not serving_changed(events)


def test_flags_change_what_is_served_and_the_kill_switch_must_name_a_serving_variant() -> None:
    current = deployments_pb2.Deployment(endpoint="web", flags={"colour": "blue"})
    current.variants.add(name="primary", model_name="mlp", version=1, weight=90)
    current.variants.add(name="shadow", model_name="mlp", version=2, shadow_percent=10)
    flags, events = deployments.set_flag(current, deployments.KILL_SWITCH, "primary")
    assert flags == {"colour": "blue", "kill_switch": "primary"} and serving_changed(events)
    assert deployments.set_flag(current, "colour", "")[0] == {}  # an empty value removes the flag
    assert dict(current.flags) == {"colour": "blue"}  # the state given is not changed
    with pytest.raises(InvalidArgumentError, match="kill switch must name a variant of 'web' that serves"):
        deployments.set_flag(current, deployments.KILL_SWITCH, "shadow")


def test_variants_are_checked_as_a_whole_before_a_deploy_is_heard() -> None:
    good = [deployments_pb2.Variant(name="primary", model_name="mlp", version=1, weight=1)]
    assert deployments.replace_variants("web", good) == [ServingChanged(("web",), "variants deployed")]
    shadow_only = [deployments_pb2.Variant(name="s", model_name="mlp", version=1, weight=1, shadow_percent=5)]
    twice = good + good
    for variants, words in ((shadow_only, "at least one serving"), (twice, "unique names"), ([], "at least one")):
        with pytest.raises(InvalidArgumentError, match=words):
            deployments.replace_variants("web", variants)


def ab_request(**fields: object) -> experiments_pb2.StartABTestRequest:
    request = experiments_pb2.StartABTestRequest(endpoint="web", metric="ctr", kind=ab.Kind.RATE, **fields)
    request.arms.add(variant="control", model_name="mlp", version=1, weight=50)
    request.arms.add(variant="treatment", model_name="mlp", alias="challenger", weight=50)
    return request


def test_an_ab_test_starts_as_variants_to_deploy_and_attributes_outcomes_to_the_arm_that_served() -> None:
    test, variants = ab.start(ab_request())
    assert test.running and test.confidence == 0.95 and test.test == "two-proportion z-test"
    assert [(v.name, v.WhichOneof("target"), v.weight) for v in variants] == [
        ("control", "version", 50),
        ("treatment", "alias", 50),
    ]
    rows = ab.attribute(test, "web", "ctr", [(f"user-{n}", 1.0) for n in range(40)], batch=True)
    assert {arm for arm, _, _ in rows} == {"control", "treatment"}  # both arms serve some keys
    again = ab.attribute(test, "web", "", [(key, value) for _, key, value in rows], batch=True)
    assert again == rows  # sticky: the same key, the same arm
    with pytest.raises(InvalidArgumentError, match=r"outcomes\[1\]\.value: expected 0 or 1 for a rate"):
        ab.attribute(test, "web", "ctr", [("a", 1.0), ("b", 0.5)], batch=True)
    with pytest.raises(InvalidArgumentError, match="metric: expected 'ctr', got 'clicks'"):
        ab.attribute(test, "web", "clicks", [("a", 1.0)], batch=False)

    stopped, events = ab.stop(test)
    assert not stopped.running and test.running and events == []  # the given state is not changed
    with pytest.raises(FailedPreconditionError, match="the A/B test was stopped"):
        ab.attribute(stopped, "web", "ctr", [("a", 1.0)], batch=False)
    with pytest.raises(InvalidArgumentError, match="arms: expected at least two"):
        ab.start(experiments_pb2.StartABTestRequest(endpoint="web", metric="ctr", kind=ab.Kind.RATE))
