"""A protected endpoint changes only through an approved rollout, or by an admin, whichever RPC a
deployer tries (issue 14, findings 13 and 14), against a real `weir control` with a real data plane
following it, driven by the `weir` CLI:

- undeploy then deploy (the protection would go with the deployment row),
- move the alias the endpoint follows,
- set a kill switch (to the canary) while a rollout is in progress,
- delete the alias the endpoint follows (refused for everyone while an endpoint follows it),
- an A/B test over it, a canary that starts above 50% (steps above wait for the approval);

each refused with PERMISSION_DENIED naming the protection, audited as a refusal, and nothing changed:
the endpoint keeps serving the same version.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import WeirProcess, free_port, start_weir
from tests.e2e.test_control_plane import (
    CONFIG,
    REPLICA_TOKEN,
    TOKENS,
    ControlProcess,
    cli,
    scripted,
    serves_factor,
    start_control,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[tuple[ControlProcess, WeirProcess]]:
    control = start_control(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port())
    replica = start_weir(
        tmp_path / "replica", "--model-control-mode", "explicit", "--control-plane", control.address,
        "--replica-id", "replica-0", "--heartbeat-seconds", "0.5",
        env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},
    )  # fmt: skip
    try:
        config = tmp_path / "config.pbtxt"
        config.write_text(CONFIG)
        for factor in (2.0, 3.0):
            cli(control, "models", "push", "scale", str(scripted(tmp_path, factor)), "--config", str(config))
        cli(control, "models", "alias", "scale", "champion", "1")
        cli(control, "deploy", "scale", "scale", "champion")  # the endpoint follows the alias
        wait_until(lambda: serves_factor(replica.grpc_url, 2.0), message="the replica to serve version 1")
        cli(control, "flags", "set", "scale", "protected", "true", token="t-admin")
        yield control, replica
    finally:
        replica.terminate_and_wait()
        control.process.terminate()
        control.process.wait(timeout=30)


def refused(control: ControlProcess, *args: str, token: str = "t-deployer") -> str:
    with pytest.raises(AssertionError) as failure:
        cli(control, *args, token=token)
    return str(failure.value)


def variants(control: ControlProcess) -> list[tuple[str, str, int]]:
    deployment = cli(control, "deployments", token="t-replica")["deployments"][0]
    return [(v["name"], v.get("alias") or v.get("version", ""), v.get("weight", 0)) for v in deployment["variants"]]


def test_every_way_around_a_protected_endpoint_is_refused(protected) -> None:
    control, replica = protected
    before = variants(control)
    assert before == [("primary", "champion", 100)]

    attempts = {
        "Deployments/Undeploy": ("undeploy", "scale"),
        "Registry/SetAlias": ("models", "alias", "scale", "champion", "2"),
        "Registry/DeleteAlias": ("models", "alias", "scale", "champion", "--delete"),
        "Deployments/Deploy": ("deploy", "scale", "scale", "2"),
        "Deployments/SetFlag": ("flags", "set", "scale", "kill_switch", "primary"),
        "Experiments/StartABTest": ("ab", "start", "scale", "--metric", "clicks", "--kind", "rate",
                                    "--key-parameter", "user", "--arm", "a=scale:1:1", "--arm", "b=scale:2:1"),
    }  # fmt: skip
    for action, args in attempts.items():
        text = refused(control, *args)
        assert "PERMISSION_DENIED" in text and "'scale' is protected" in text, (action, text)
    for steps in ("100", "60,100"):  # more than half the traffic without an approval
        text = refused(control, "rollout", "start", "scale", "scale:2", "--steps", steps)
        assert "PERMISSION_DENIED" in text and "first step must be at most 50%" in text

    # nothing changed: same variants, same alias target, the replica still serves version 1
    assert variants(control) == before
    assert cli(control, "models", "show", "scale", token="t-replica")["aliases"] == {"champion": "1"}
    assert serves_factor(replica.grpc_url, 2.0)

    # a kill switch while a rollout is in progress (it would wait for approval before 100%)
    cli(control, "rollout", "start", "scale", "scale:2", "--steps", "5,100", "--interval", "3600")
    with_canary = variants(control)
    assert [(name, weight) for name, _, weight in with_canary] == [("primary", 95), ("canary", 5)]
    text = refused(control, "flags", "set", "scale", "kill_switch", "canary")
    assert "PERMISSION_DENIED" in text and "'scale' is protected" in text
    assert "kill_switch" not in cli(control, "flags", "list", "scale", token="t-replica")
    assert variants(control) == with_canary
    cli(control, "rollout", "rollback", "scale")  # rolling back is always allowed
    assert variants(control) == before

    # every refusal is in the audit log as a refusal, with who and why
    events = cli(control, "audit", "--outcome", "refused", "--limit", "100", token="t-replica")
    refusals = {(event["actor"], event["action"]) for event in events if event.get("result") == "PERMISSION_DENIED"}
    assert {("ci", action) for action in attempts} <= refusals
    assert all("protected" in event["detail"] for event in events if event["actor"] == "ci")

    # an admin may change a protected endpoint directly
    cli(control, "deploy", "scale", "scale", "2", token="t-admin")
    wait_until(lambda: serves_factor(replica.grpc_url, 3.0), message="the admin's deploy to serve")


def test_an_alias_endpoints_follow_cannot_be_deleted_even_by_an_admin(protected) -> None:
    control, replica = protected
    for token in ("t-admin",):
        text = refused(control, "models", "alias", "scale", "champion", "--delete", token=token)
        assert "FAILED_PRECONDITION" in text and "followed by endpoint(s) 'scale'" in text
    cli(control, "flags", "set", "scale", "protected", "", token="t-admin")  # unprotected: the same refusal
    text = refused(control, "models", "alias", "scale", "champion", "--delete")
    assert "FAILED_PRECONDITION" in text and "followed by endpoint(s) 'scale'" in text
    assert serves_factor(replica.grpc_url, 2.0)
    deployment = cli(control, "deployments", token="t-replica")["deployments"][0]
    assert [r.get("version") for r in deployment["resolved"]] == ["1"]  # still resolves (version 0: lost)
    # pinned to a version first, the alias may go
    cli(control, "deploy", "scale", "scale", "1")
    cli(control, "models", "alias", "scale", "champion", "--delete")
    assert serves_factor(replica.grpc_url, 2.0)
