"""The retraining the drift monitor submits (issue 15, item 2): `weir control` + a following `weir serve`;
a shifted feature makes windows CRITICAL; the policy's retraining job is in the audit log (actor
drift-monitor, naming the job and the window), exactly once per cool-down, also across a restart of the
control plane; the version the job registers names, in its lineage, the job and the drift window
(endpoint, start, end, the CRITICAL features), as `weir models show` prints it; the alias it moves is
audited too."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import free_port, start_weir
from tests.e2e.test_control_plane import REPLICA_TOKEN, TOKENS, ControlProcess, cli, start_control, wait_until
from tests.e2e.test_drift import (
    CONFIG,
    _next_window,
    _ready,
    deploy_scorer,
    monitoring,
    reference_from_traffic,
    report,
    rows,
    send,
)
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import monitoring_pb2, training_pb2, training_pb2_grpc

Severity = monitoring_pb2.Severity
WINDOW_SECONDS = 3.0
TRAIN = b"""import os, shutil
output = os.path.join(os.environ["WEIR_JOB_DIR"], "output")
os.makedirs(output, exist_ok=True)
here = os.path.dirname(os.path.abspath(__file__))
for name in ("model.pt", "config.pbtxt"):
    shutil.copy(os.path.join(here, name), os.path.join(output, name))
print("retrained")
"""


def retrain_spec(model: Path) -> training_pb2.JobSpec:
    """A job that 'retrains' by exporting the given model, registered as scorer."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("train.py", TRAIN), ("model.pt", model.read_bytes()), ("config.pbtxt", CONFIG.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = training_pb2.JobSpec(entrypoint="script:train.py", code_archive=buffer.getvalue())
    spec.register.model_name = "scorer"
    spec.register.aliases.append("candidate")
    return spec


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "control"


def start(state_dir: Path, port: int) -> ControlProcess:
    return start_control(state_dir, str(state_dir / "control.db"), port)


def jobs(control: ControlProcess) -> list[training_pb2.Job]:
    with grpc.insecure_channel(control.address) as channel:
        return list(
            training_pb2_grpc.TrainingStub(channel)
            .ListJobs(training_pb2.ListJobsRequest(), metadata=client_metadata("t-replica"), timeout=10)
            .jobs
        )


def retrain_events(control: ControlProcess) -> list[dict]:
    return cli(control, "audit", "--actor", "drift-monitor")  # type: ignore[return-value]


def shifted_windows(control: ControlProcess, url: str, data: object, prefix: str, count: int) -> list[float]:
    """``count`` windows in a row of shifted traffic; returns their starts once all are closed."""
    starts = []
    for index in range(count):
        starts.append(_next_window())
        send(url, data, f"{prefix}-{index}", batch=8)  # type: ignore[arg-type]
    last = starts[-1] + WINDOW_SECONDS
    wait_until(lambda: any(w.end.ToNanoseconds() / 1e9 >= last for w in report(control).windows), 30, "closed")
    return starts


@pytest.fixture
def planes(tmp_path: Path, state: Path) -> Iterator[tuple[list[ControlProcess], str, int]]:
    port = free_port()
    controls = [start(state, port)]
    replica = start_weir(
        tmp_path / "replica", "--model-control-mode", "explicit", "--control-plane", controls[0].address,
        "--replica-id", "replica-0", "--heartbeat-seconds", "0.5",
        env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},
    )  # fmt: skip
    try:
        yield controls, replica.grpc_url, port
    finally:
        replica.terminate_and_wait()
        for control in controls:
            if control.process.poll() is None:
                control.process.terminate()
                control.process.wait(timeout=30)


def test_the_retraining_is_audited_once_per_cool_down_across_restarts_and_its_version_names_the_window(
    planes: tuple[list[ControlProcess], str, int], tmp_path: Path, state: Path
) -> None:
    controls, url, port = planes
    control = controls[0]
    model = deploy_scorer(control, url, tmp_path)
    policy = monitoring_pb2.MonitoringPolicy(
        endpoint="scorer", window_seconds=WINDOW_SECONDS, min_records=100, retrain=True, cooldown_seconds=3600
    )
    policy.retrain_spec.CopyFrom(retrain_spec(model))
    monitoring(control, "SetMonitoringPolicy", policy)

    # the reference: a window of normal traffic
    reference_rows, _ = reference_from_traffic(control, url)

    # two CRITICAL windows in a row: one retraining, audited with the window that caused it
    shifted = reference_rows.copy()
    shifted[:, 2] += 3.0
    shifted_windows(control, url, shifted, "shifted", 2)
    wait_until(lambda: any(action.kind == "retrain" for action in report(control).actions), 30, "the retraining")
    (action,) = [action for action in report(control).actions if action.kind == "retrain"]
    critical = [window for window in report(control).windows if window.severity == Severity.CRITICAL]
    cause = critical[0]
    assert action.job_id == action.detail and action.job_id.startswith("retrain-scorer-"), action
    assert (action.window.start, action.window.end) == (cause.start, cause.end)
    assert "FEATURES[2]" in action.features and "FEATURES[0]" not in action.features
    (event,) = retrain_events(control)
    assert event["action"] == "Monitoring/SubmitRetraining" and event["target"] == f"job/{action.job_id}", event
    assert event["result"] == "OK" and cause.start.ToJsonString() in event["detail"], event
    assert "FEATURES[2]" in event["detail"], event

    # the job registers version 2: its lineage names the job and the window
    wait_until(lambda: any(j.id == action.job_id and j.registered.version for j in jobs(control)), 120, "registered")
    version = cli(control, "models", "show", "scorer", "2")
    lineage = version["lineage"]
    assert lineage["source_job"] == action.job_id, lineage
    trigger = lineage["drift_trigger"]
    assert trigger["endpoint"] == "scorer", trigger
    assert (trigger["window_start"], trigger["window_end"]) == (cause.start.ToJsonString(), cause.end.ToJsonString())
    assert "FEATURES[2]" in trigger["features"] and "FEATURES[1]" not in trigger["features"], trigger
    # the alias the job moved is in the audit log too (not silently)
    (moved,) = cli(control, "audit", "--actor", "training-runner", "--action", "Registry/SetAlias")
    assert moved["target"] == "model/scorer/alias/candidate" and action.job_id in moved["detail"], moved

    # a restart of the control plane: more CRITICAL windows within the cool-down retrain nothing
    control.process.terminate()
    control.process.wait(timeout=30)
    control = start(state, port)
    controls.append(control)
    records = report(control).records_received
    wait_until(lambda: _ready(url), 60, "the endpoint served")

    def attached() -> bool:  # the replica follows the new control plane: its records arrive again
        send(url, rows(8), "probe", batch=8)
        return report(control).records_received > records

    wait_until(attached, 60, "the replica attached again")
    records = report(control).records_received
    shifted_windows(control, url, shifted, "after-restart", 2)
    wait_until(lambda: report(control).records_received >= records + 600, 30, "the records after the restart")
    windows = report(control).windows
    assert sum(1 for window in windows if window.severity == Severity.CRITICAL) >= len(critical) + 1, windows
    assert [a.kind for a in report(control).actions] == ["retrain"]
    assert [job.id for job in jobs(control) if job.submitted_by == "drift-monitor"] == [action.job_id]
    assert len(retrain_events(control)) == 1
