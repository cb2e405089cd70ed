"""A canary survives the death of the control-plane replica that drives it (issue 16, item 3), end to
end: two `weir control` replicas on one PostgreSQL database and one shared state directory, two
`weir serve` data planes, load on both: attached to the replica that is not killed, or given
both replicas (`--control-plane A,B`: a data plane on the killed one fails over).

The first replica holds the singleton lease and applies the canary's steps (it reads the data planes'
reports the other replica persists); it is killed with SIGKILL after its first automatic step. The
other replica takes the lease over and walks the remaining steps to the promotion: every step is in
the audit log exactly once, each was applied by one replica (their "rollout step applied" lines do
not overlap), the data planes serve the promoted version, and no inference request failed.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import WeirProcess, free_port, start_weir
from tests.e2e.test_control_plane import (
    REPLICA_TOKEN,
    TOKENS,
    ControlProcess,
    cli,
    replica_states,
    start_control,
    start_replicas,
    wait_until,
)
from tests.e2e.test_rollouts import Load, Scale, finished, push, stop_planes

pytestmark = pytest.mark.timeout(600)
LEASE_SECONDS = "3"


class Triple(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3.0


def records(control: ControlProcess, *messages: str) -> list[dict]:
    """The replica's JSON log records with one of these messages."""
    found = []
    for line in list(control.lines):
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("msg") in messages:
                found.append(record)
    return found


def holds(control: ControlProcess) -> bool:
    lines = records(control, "lease acquired", "lease lost", "lease released")
    return bool(lines) and lines[-1]["msg"] == "lease acquired"


def steps_applied(control: ControlProcess) -> list[str]:
    return [record["summary"] for record in records(control, "rollout step applied")]


def start_failing_over(controls: tuple[ControlProcess, ...], tmp_path: Path) -> list[WeirProcess]:
    """Two `weir serve --control-plane A,B`: each attaches to one replica and moves when it dies."""
    addresses = ",".join(control.address for control in controls)
    return [
        start_weir(tmp_path / f"replica-{index}", "--model-control-mode", "explicit", "--control-plane", addresses,
                   "--replica-id", f"replica-{index}", "--heartbeat-seconds", "0.3",
                   env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN})
        for index in range(2)
    ]  # fmt: skip


@pytest.fixture
def planes(
    request: pytest.FixtureRequest, store_url: str, tmp_path: Path
) -> Iterator[tuple[ControlProcess, ControlProcess, list[WeirProcess]]]:
    """``request.param``: "survivor" (data planes attached to the replica not killed) or "both"
    (`--control-plane A,B`: those on the killed replica fail over)."""
    state_dir = tmp_path / "control"  # the shared volume: artifacts (and jobs) of both replicas
    first = start_control(state_dir, store_url, free_port(), "--replica-id", "first", "--lease-seconds", LEASE_SECONDS)
    wait_until(lambda: holds(first), message="the first replica to take the lease")
    second = start_control(
        state_dir, store_url, free_port(), "--replica-id", "second", "--lease-seconds", LEASE_SECONDS
    )
    if request.param == "survivor":
        data_planes = start_replicas(second, tmp_path, heartbeat="0.3")
    else:
        data_planes = start_failing_over((first, second), tmp_path)
    try:
        yield first, second, data_planes
    finally:
        stop_planes(data_planes, first, second)


@pytest.mark.parametrize("planes", ["survivor", "both"], indirect=True)
@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_canary_finishes_on_the_other_replica_when_the_lease_holder_is_killed(planes, tmp_path: Path) -> None:
    first, second, data_planes = planes
    urls = [data_plane.grpc_url for data_plane in data_planes]
    push(second, tmp_path, Scale(), "baseline")
    cli(second, "deploy", "scale", "scale", "1")
    for url in urls:
        wait_until(lambda url=url: _serves(url, 2.0), message="the baseline on every data plane")
    canary = push(second, tmp_path, Triple(), "canary")
    assert not holds(second)
    # the data planes attached to the second replica are listed through the first too (persisted reports)
    wait_until(lambda: set(replica_states(first)) == {"replica-0", "replica-1"}, message="ListReplicas on the first")

    with Load(urls) as load:
        # p99 is not what this test judges (a loaded shared machine's is noise): only errors would fail it
        started = cli(second, "rollout", "start", "scale", f"scale:{canary}", "--steps", "20,40,60,80,100",
                      "--interval", "1.5", "--min-requests", "5", "--max-p99-slack-ms", "1000")  # fmt: skip
        assert started["state"] == "RUNNING"
        # the holder analyses the reports the other replica persists, and takes the first step
        wait_until(lambda: steps_applied(first), timeout=120, message="the holder's first automatic step")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
        killed_after = steps_applied(first)
        result = finished(second)
        for url in urls:
            wait_until(lambda url=url: _serves(url, 3.0), message="the promoted canary on every data plane")
    assert result["state"] == "SUCCEEDED", result
    assert holds(second)
    assert load.failed == 0 and load.ok > 0, (load.ok, load.failed)

    # each step once: in the audit log, and applied by one replica or the other, never both
    expected = [f"canary at {percent}%" for percent in (20, 40, 60, 80, 100)] + ["promoted: every step passed"]
    audited = [event["detail"] for event in cli(second, "audit", "--action", "Rollouts/Step", token="t-replica")]
    assert sorted(audited) == sorted(expected), audited
    by_second = steps_applied(second)  # the start (its RPC came through the second) and what it took over
    assert sorted(killed_after + by_second) == sorted(expected), (killed_after, by_second)
    assert killed_after and by_second[0] == "canary at 20%" and len(by_second) > 1, (killed_after, by_second)


def _serves(url: str, factor: float) -> bool:
    from tests.e2e.test_control_plane import infer

    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    return bool(np.allclose(infer(url, x), x * factor))
