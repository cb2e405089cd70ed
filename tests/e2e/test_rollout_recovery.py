"""Rollouts and replica states recover from what a user does by hand (issue 15, items 3 and 4), end to
end: `weir control` and two `weir serve --control-plane`, driven with the `weir` CLI.

- A hand deploy after a blue-green switch (before blue retires) or during a canary, or an undeploy
  and deploy while a canary is paused, ends the rollout SUPERSEDED with a reason, audited as the
  rollout controller's; what the hand change set serves, and the endpoint can be rolled out again.
- A version that failed to load, then the serving version desired again: every replica reports the
  endpoint READY again (`weir deployments`, `weir_control_replica_endpoints{state="failed"}` 0).
- A rollout (canary or blue-green) of a version the replicas fail to load ends ROLLED_BACK at once
  with the replica's load failure as reason, the stable variant takes all traffic back (audited as the
  rollout controller's); one whose new variant is never READY (no data plane attached) ends at its
  progress deadline (`--progress-deadline`). Both waited for ever before.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import WeirProcess, free_port
from tests.e2e.test_control_plane import (
    CONFIG,
    ControlProcess,
    cli,
    replica_states,
    scripted,
    serves_factor,
    start_control,
    start_replicas,
    wait_until,
)
from tests.e2e.test_rollouts import stop_planes

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def planes(tmp_path: Path) -> Iterator[tuple[ControlProcess, list[WeirProcess], Path]]:
    control = start_control(
        tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port(), "--metrics-port", "0"
    )
    replicas = start_replicas(control, tmp_path, heartbeat="0.3")
    try:
        yield control, replicas, tmp_path
    finally:
        stop_planes(replicas, control)


def push(control: ControlProcess, tmp_path: Path, factor: float) -> str:
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    pushed = cli(control, "models", "push", "scale", str(scripted(tmp_path, factor)), "--config", str(config))
    return str(pushed["version"])


def serve_everywhere(replicas: list[WeirProcess], factor: float) -> None:
    for replica in replicas:
        wait_until(lambda url=replica.grpc_url: serves_factor(url, factor), message=f"every replica to serve x{factor}")


def status(control: ControlProcess) -> dict:
    return cli(control, "rollout", "status", "scale", token="t-replica")


def ended(control: ControlProcess) -> dict:
    holder: dict = {}

    def done() -> bool:
        holder.update(status(control))
        return holder["state"] not in ("RUNNING", "PAUSED")

    wait_until(done, message="the rollout to end")
    return holder


def superseded_events(control: ControlProcess) -> list[dict]:
    events = cli(control, "audit", "--action", "Rollouts/Step", token="t-replica")
    return [event for event in events if "SUPERSEDED" in event.get("detail", "")]


def green_ready(control: ControlProcess) -> bool:
    return bool(status(control).get("green_ready"))


def test_a_hand_deploy_after_a_blue_green_switch_supersedes_the_rollout(planes) -> None:
    control, replicas, tmp_path = planes
    blue, green, by_hand = push(control, tmp_path, 2.0), push(control, tmp_path, 3.0), push(control, tmp_path, 5.0)
    cli(control, "deploy", "scale", "scale", blue)
    serve_everywhere(replicas, 2.0)

    # blue-green, approved, switched; blue would stay loaded for an hour
    cli(control, "rollout", "blue-green", "scale", f"scale:{green}", "--keep-previous-seconds", "3600")
    wait_until(lambda: green_ready(control), message="green READY on both data planes")
    assert cli(control, "rollout", "approve", "scale", token="t-approver")["approved_by"] == "release"
    switched = cli(control, "rollout", "switch", "scale")
    assert switched["state"] == "RUNNING" and "blue stays loaded for 3600 s" in switched["reason"]
    serve_everywhere(replicas, 3.0)

    # a hand deploy before blue retires: the rollout ends, the hand deploy serves
    cli(control, "deploy", "scale", "scale", by_hand)
    result = ended(control)
    assert result["state"] == "SUPERSEDED", result
    assert "changed by hand (by ci" in result["reason"] and "ended_at" in result
    serve_everywhere(replicas, 5.0)
    events = superseded_events(control)
    assert [(event["actor"], event["result"]) for event in events] == [("rollout-controller", "OK")], events
    for action, token in (("rollback", "t-deployer"), ("promote", "t-deployer"), ("switch", "t-deployer"),
                          ("pause", "t-deployer"), ("approve", "t-approver")):  # fmt: skip
        with pytest.raises(AssertionError, match=r"the rollout already ended \(SUPERSEDED: superseded: "):
            cli(control, "rollout", action, "scale", token=token)

    # the endpoint rolls out again: a new blue-green from the hand-deployed version, to its end
    again = cli(control, "rollout", "blue-green", "scale", f"scale:{green}", "--keep-previous-seconds", "0.5")
    assert again["state"] == "RUNNING" and again["baseline_variant"] == "primary"
    wait_until(lambda: green_ready(control), message="green READY again")
    cli(control, "rollout", "switch", "scale")
    assert ended(control)["state"] == "SUCCEEDED"
    serve_everywhere(replicas, 3.0)
    assert len(superseded_events(control)) == 1


def test_a_hand_deploy_during_a_canary_and_an_undeploy_while_paused_supersede_it(planes) -> None:
    control, replicas, tmp_path = planes
    baseline, canary, by_hand = push(control, tmp_path, 2.0), push(control, tmp_path, 3.0), push(control, tmp_path, 5.0)
    cli(control, "deploy", "scale", "scale", baseline)
    serve_everywhere(replicas, 2.0)

    def start_canary() -> dict:
        # never enough requests to advance: the canary stays at 20% until something ends it
        return cli(control, "rollout", "start", "scale", f"scale:{canary}", "--steps", "20,100",
                   "--interval", "0.5", "--min-requests", "1000000")  # fmt: skip

    # a hand deploy during the canary
    assert start_canary()["state"] == "RUNNING"
    cli(control, "deploy", "scale", "scale", by_hand)
    result = ended(control)
    assert result["state"] == "SUPERSEDED", result
    assert "changed by hand" in result["reason"] and f"canary=scale:{canary}@20" in result["reason"]
    serve_everywhere(replicas, 5.0)

    # paused, then undeployed and deployed again: superseded too, and a new canary starts
    assert start_canary()["state"] == "RUNNING"
    assert cli(control, "rollout", "pause", "scale")["state"] == "PAUSED"
    cli(control, "undeploy", "scale")
    cli(control, "deploy", "scale", "scale", baseline)
    result = ended(control)
    assert result["state"] == "SUPERSEDED", result
    serve_everywhere(replicas, 2.0)
    assert start_canary()["state"] == "RUNNING"
    rolled_back = cli(control, "rollout", "rollback", "scale")
    assert rolled_back["state"] == "ROLLED_BACK"
    deployment = cli(control, "deployments", token="t-replica")["deployments"][0]
    assert [(v["name"], v.get("weight"), v["version"]) for v in deployment["variants"]] == [("primary", 100, baseline)]
    events = superseded_events(control)
    assert len(events) == 2 and {event["actor"] for event in events} == {"rollout-controller"}


def _metrics_port(control: ControlProcess) -> int:
    for line in control.lines:
        if '"control plane started"' in line:
            return int(json.loads(line)["metrics_port"])
    raise AssertionError("no start line")


def _failed_gauges(control: ControlProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{_metrics_port(control)}/metrics", timeout=10) as response:
        text = response.read().decode()
    gauges = {}
    for line in text.splitlines():
        if line.startswith("weir_control_replica_endpoints{") and 'state="failed"' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            gauges[replica] = float(line.rsplit(" ", 1)[1])
    return gauges


def push_corrupt(control: ControlProcess, tmp_path: Path, factor: float) -> str:
    """A version whose stored artifact is corrupt: every data plane fails to load it."""
    pushed = cli(
        control, "models", "push", "scale", str(scripted(tmp_path, factor)), "--config", str(tmp_path / "config.pbtxt")
    )
    blob = tmp_path / "control" / "artifacts" / "blobs" / pushed["artifact_sha256"][:2] / pushed["artifact_sha256"]
    blob.write_bytes(blob.read_bytes()[:-10] + b"corrupted!")
    return str(pushed["version"])


def test_a_failed_version_is_cleared_once_the_serving_version_is_desired_again(planes) -> None:
    control, replicas, tmp_path = planes
    good = push(control, tmp_path, 2.0)
    cli(control, "deploy", "scale", "scale", good)
    serve_everywhere(replicas, 2.0)

    # a version whose stored artifact is corrupt: FAILED on both replicas, the good one keeps serving
    cli(control, "deploy", "scale", "scale", push_corrupt(control, tmp_path, 4.0))
    wait_until(
        lambda: [states for states in replica_states(control).values()] == [[("scale", "FAILED", int(good))]] * 2,
        message="both replicas to report the corrupt version FAILED",
    )
    assert _failed_gauges(control) == {"replica-0": 1.0, "replica-1": 1.0}

    # the good version desired again: READY everywhere, no failure left in the CLI or the metrics
    cli(control, "deploy", "scale", "scale", good)
    wait_until(
        lambda: [states for states in replica_states(control).values()] == [[("scale", "READY", int(good))]] * 2,
        message="both replicas to report the good version READY again",
    )
    listed = cli(control, "deployments", token="t-replica")["replicas"]
    lines = [status for replica in listed for status in replica["status"]["endpoints"]]
    assert [(line["state"], line["desired"]["version"], line.get("message", "")) for line in lines] == [
        ("READY", good, "")
    ] * 2
    assert _failed_gauges(control) == {"replica-0": 0.0, "replica-1": 0.0}
    for replica in replicas:
        assert serves_factor(replica.grpc_url, 2.0)


def rolled_back_events(control: ControlProcess, reason: str) -> list[tuple[str, str]]:
    events = cli(control, "audit", "--action", "Rollouts/Step", token="t-replica")
    return [
        (event["actor"], event.get("result", ""))
        for event in events
        if event.get("detail", "").startswith(f"rolled back: {reason}")
    ]


def primary_only(control: ControlProcess) -> list[tuple[str, int, str]]:
    deployment = cli(control, "deployments", token="t-replica")["deployments"][0]
    return [(v["name"], v.get("weight"), v["version"]) for v in deployment["variants"]]


def test_a_version_that_fails_to_load_rolls_back_a_canary_and_a_blue_green(planes) -> None:
    control, replicas, tmp_path = planes
    good, bad, later = push(control, tmp_path, 2.0), push_corrupt(control, tmp_path, 4.0), push(control, tmp_path, 3.0)
    cli(control, "deploy", "scale", "scale", good)
    serve_everywhere(replicas, 2.0)

    # a canary of the corrupt version (never enough requests to judge it, a deadline far away): the
    # replicas' load failure ends it at once, the baseline takes all traffic back
    started = cli(control, "rollout", "start", "scale", f"scale:{bad}", "--steps", "20,100", "--interval", "0.5",
                  "--min-requests", "1000000")  # fmt: skip
    assert started["state"] == "RUNNING" and started["progress_deadline_seconds"] == 600
    result = ended(control)
    assert result["state"] == "ROLLED_BACK", result
    assert re.match(
        rf"version {bad} failed to load on replica replica-[01]: .*stored bytes are corrupt", result["reason"]
    ), result
    assert primary_only(control) == [("primary", 100, good)]
    assert rolled_back_events(control, f"version {bad} failed to load") == [("rollout-controller", "OK")]
    serve_everywhere(replicas, 2.0)

    # a blue-green of it: green never READY, the rollout does not wait for ever "loading green"
    started = cli(control, "rollout", "blue-green", "scale", f"scale:{bad}")
    assert started["state"] == "RUNNING" and started["canary_variant"] == "green"
    result = ended(control)
    assert result["state"] == "ROLLED_BACK", result
    assert re.match(rf"version {bad} failed to load on replica replica-[01]: ", result["reason"]), result
    assert "green_ready" not in result
    assert primary_only(control) == [("primary", 100, good)]
    assert rolled_back_events(control, f"version {bad} failed to load") == [("rollout-controller", "OK")] * 2
    serve_everywhere(replicas, 2.0)

    # the endpoint rolls out again: a blue-green of a good version, to its end
    cli(control, "rollout", "blue-green", "scale", f"scale:{later}", "--keep-previous-seconds", "0.5")
    wait_until(lambda: green_ready(control), message="green READY on both data planes")
    cli(control, "rollout", "switch", "scale")
    assert ended(control)["state"] == "SUCCEEDED"
    serve_everywhere(replicas, 3.0)


def test_a_rollout_whose_new_version_is_never_ready_ends_at_its_progress_deadline(tmp_path: Path) -> None:
    control = start_control(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port())
    try:
        good, new = push(control, tmp_path, 2.0), push(control, tmp_path, 3.0)
        cli(control, "deploy", "scale", "scale", good)

        # the deadline is bounded, checked before anything changes
        for value, shown in (("100000", "100000.0"), ("-5", "-5.0"), ("nan", "nan")):
            for command in ("start", "blue-green"):
                with pytest.raises(
                    AssertionError,
                    match=rf"progress_deadline_seconds: expected a finite number in 1\.\.86400, got {shown}",
                ):
                    cli(control, "rollout", command, "scale", f"scale:{new}", "--progress-deadline", value)
        assert primary_only(control) == [("primary", 100, good)]

        # no data plane attached: neither the canary nor green ever becomes READY anywhere
        for command, role, variant in (("start", "canary", "canary"), ("blue-green", "green", "green")):
            started = cli(control, "rollout", command, "scale", f"scale:{new}", "--progress-deadline", "1.5")
            assert started["state"] == "RUNNING" and started["progress_deadline_seconds"] == 1.5, started
            result = ended(control)
            assert result["state"] == "ROLLED_BACK", result
            assert result["reason"] == (
                f"progress deadline exceeded: the {role} {variant} (scale:{new}) was not READY on every data plane "
                "within 1.5 s (no data plane attached)"
            ), result
            assert primary_only(control) == [("primary", 100, good)]
        assert rolled_back_events(control, "progress deadline exceeded") == [("rollout-controller", "OK")] * 2
    finally:
        control.process.terminate()
        control.process.wait(timeout=30)
