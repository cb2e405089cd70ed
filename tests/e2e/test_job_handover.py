"""A training job survives the death of the control-plane replica that launched it (issue 16, item 3),
end to end: two `weir control` replicas on one PostgreSQL database and one shared state directory.

A job submitted through the replica that does not hold the lease is QUEUED in the database and
launched by the holder; the holder is killed with SIGKILL mid-run. The other replica takes the lease
over and adopts the running job (not launched again: one attempt, one "training job launched" line
over both replicas); the job keeps reporting (it was told every replica's address), so every metric
step arrives, and it ends SUCCEEDED once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import free_port
from tests.e2e.test_control_plane import ControlProcess, cli, start_control, wait_until
from tests.e2e.test_rollout_handover import LEASE_SECONDS, holds, records
from tests.e2e.test_training import TRAIN_SCRIPT
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import training_pb2, training_pb2_grpc

pytestmark = pytest.mark.timeout(600)
Job = training_pb2.Job
EPOCHS = 16


@pytest.fixture
def replicas(store_url: str, tmp_path: Path) -> Iterator[tuple[ControlProcess, ControlProcess]]:
    state_dir = tmp_path / "control"
    first = start_control(state_dir, store_url, free_port(), "--replica-id", "first", "--lease-seconds", LEASE_SECONDS)
    wait_until(lambda: holds(first), message="the first replica to take the lease")
    second = start_control(
        state_dir, store_url, free_port(), "--replica-id", "second", "--lease-seconds", LEASE_SECONDS
    )
    try:
        yield first, second
    finally:
        for control in (first, second):
            if control.process.poll() is None:
                control.process.terminate()
                control.process.wait(timeout=30)


def job(control: ControlProcess, job_id: str) -> dict:
    return cli(control, "train", "status", job_id, token="t-replica")


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_running_job_is_adopted_by_the_next_lease_holder(replicas, tmp_path: Path) -> None:
    first, second = replicas
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(TRAIN_SCRIPT)
    submitted = cli(second, "train", "submit", "outlives", "--script", "train.py", "--code", str(code),
                    "--param", f"epochs={EPOCHS}", "--param", "epoch_sleep=0.5")  # fmt: skip
    assert submitted["state"] in ("QUEUED", "RUNNING")
    wait_until(lambda: int(job(second, "outlives").get("progress", {}).get("epoch", 0)) >= 2, 120, "the job running")
    assert [record["job"] for record in records(first, "training job launched")] == ["outlives"]

    first.process.send_signal(signal.SIGKILL)  # the launcher's replica dies; the job runs on
    first.process.wait(timeout=30)
    wait_until(lambda: job(second, "outlives")["state"] in ("SUCCEEDED", "FAILED"), 180, "the job to end")
    ended = job(second, "outlives")
    assert ended["state"] == "SUCCEEDED" and int(ended.get("attempt", 0)) == 1, ended
    assert holds(second)
    assert records(second, "re-attached a running training job"), "adopted by the new holder"
    assert not records(second, "training job launched")  # never launched again
    with grpc.insecure_channel(second.address) as channel:
        events = training_pb2_grpc.TrainingStub(channel).StreamMetrics(
            training_pb2.StreamMetricsRequest(id="outlives"), metadata=client_metadata("t-replica"), timeout=10
        )
        steps = [event.metric.step for event in events if event.WhichOneof("event") == "metric"]
    assert steps == list(range(EPOCHS)), steps  # every report arrived, through the survivor too
