"""Drift monitoring with two control-plane replicas on one PostgreSQL database (issue 16): real
`weir control` and `weir serve` processes, each data plane attached to a different replica, traffic split
between them.

- The lease holder's windows count both replicas' records (each replica hands its share of a closed
  window in; the holder merges them).
- A CRITICAL window acts once (one alert, one retraining job); the holder is killed (-9), the other
  replica takes the lease, and the next CRITICAL windows are judged by it, each window once, with no
  second alert or retraining (the cool-down reserved with the first action is in the database).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import WeirProcess
from tests.e2e.test_control_plane import ControlProcess, wait_until
from tests.e2e.test_control_replicas import attach_data_plane, start_replica, stop_replica
from tests.e2e.test_drift import (
    WINDOW_SECONDS,
    Webhook,
    _next_window,
    _ready,
    deploy_scorer,
    monitoring,
    report,
    retrain_spec,
    rows,
    send,
    webhook,  # noqa: F401 (a fixture)
)
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import monitoring_pb2, training_pb2, training_pb2_grpc

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.parametrize("store_url", ["postgresql"], indirect=True),  # several replicas need PostgreSQL
]
Severity = monitoring_pb2.Severity
LEASE_SECONDS = "2"


@pytest.fixture
def replicas(store_url: str, tmp_path: Path) -> Iterator[tuple[list[ControlProcess], list[WeirProcess]]]:
    """Two replicas (the first holds the lease: it started first) and a data plane attached to each."""
    state_dir = tmp_path / "control"  # shared by both replicas, as the volume in docker/
    started: list[ControlProcess] = []
    data_planes: list[WeirProcess] = []
    try:
        for _ in range(2):
            started.append(
                start_replica(state_dir, store_url, "--webhook-allow", "127.0.0.1", "--lease-seconds", LEASE_SECONDS)
            )
        for index, replica in enumerate(started):
            data_planes.append(attach_data_plane(replica, tmp_path / f"data-plane-{index}", f"data-plane-{index}"))
        yield started, data_planes
    finally:
        for data_plane in data_planes:
            data_plane.terminate_and_wait()
        for replica in started:
            stop_replica(replica)


def windows_from(control: ControlProcess, moment: float) -> list[monitoring_pb2.DriftWindow]:
    return [window for window in report(control).windows if window.start.ToNanoseconds() / 1e9 >= moment - 1e-6]


def split_send(urls: list[str], data: np.ndarray, prefix: str) -> float:
    """Half the rows through each data plane; returns the end of the window the last one went to (on a
    loaded machine a burst may span windows)."""
    half = len(data) // 2
    for index, url in enumerate(urls):
        send(url, data[index * half : (index + 1) * half], f"{prefix}-{index}", batch=8)
    return math.ceil(time.time() / WINDOW_SECONDS) * WINDOW_SECONDS


def judged(control: ControlProcess, start: float, end: float) -> list[monitoring_pb2.DriftWindow]:
    """The windows from ``start`` to ``end``, once the last is judged."""
    wait_until(lambda: any(w.end.ToNanoseconds() / 1e9 >= end - 1e-6 for w in report(control).windows), 30, "judged")
    return [window for window in windows_from(control, start) if window.end.ToNanoseconds() / 1e9 <= end + 1e-6]


def test_the_holder_counts_both_replicas_and_a_handover_judges_and_acts_once(
    replicas: tuple[list[ControlProcess], list[WeirProcess]],
    tmp_path: Path,
    webhook: str,  # noqa: F811
) -> None:
    (holder, other), data_planes = replicas
    urls = [data_plane.grpc_url for data_plane in data_planes]
    deploy_scorer(other, urls[1], tmp_path)  # through the replica that does not hold the lease
    wait_until(lambda: _ready(urls[0]), 60, "the deploy on the other replica's data plane")
    policy = monitoring_pb2.MonitoringPolicy(
        endpoint="scorer", window_seconds=WINDOW_SECONDS, min_records=100, webhook_url=webhook, retrain=True,
        cooldown_seconds=3600,
    )  # fmt: skip
    policy.retrain_spec.CopyFrom(retrain_spec())
    monitoring(other, "SetMonitoringPolicy", policy)
    get = monitoring_pb2.GetMonitoringPolicyRequest(endpoint="scorer")
    wait_until(lambda: monitoring(holder, "GetMonitoringPolicy", get).retrain, 30, "the holder's policy")

    # the reference: 300 normal rows, half through each replica, judged as windows holding all 300
    reference_rows = rows(300)
    start = _next_window()
    end = split_send(urls, reference_rows, "reference")
    assert sum(window.records for window in judged(other, start, end)) == 300
    request = monitoring_pb2.SetReferenceRequest(endpoint="scorer")
    request.window.start.FromNanoseconds(int(start * 1e9))
    request.window.end.FromNanoseconds(int(end * 1e9))
    assert monitoring(other, "SetReference", request).rows == 300  # through the replica that does not judge
    wait_until(lambda: report(holder).reference.rows == 300, 30, "the holder's reference")

    # a shifted feature, half through each replica: one CRITICAL window of 300, one alert, one job
    shifted = reference_rows.copy()
    shifted[:, 2] += 3.0
    start = _next_window()
    end = split_send(urls, shifted, "shifted")
    critical = judged(holder, start, end)
    assert sum(window.records for window in critical) == 300, critical
    assert Severity.CRITICAL in [window.severity for window in critical], critical
    wait_until(lambda: len(report(holder).actions) >= 2 and Webhook.received, 30, "the actions")

    # the holder dies; the other replica takes the lease and judges what its data plane sends
    holder.process.kill()
    holder.process.wait(timeout=30)
    after = _next_window()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(windows_from(other, after)) < 2:
        send(urls[1], shifted, "after", batch=8)  # the lease passes within 2 s: windows judged by the new holder
    survivors = windows_from(other, after)
    assert Severity.CRITICAL in [window.severity for window in survivors], survivors
    starts = [window.start.ToNanoseconds() for window in report(other).windows]
    assert len(starts) == len(set(starts)), starts  # every window judged once
    time.sleep(WINDOW_SECONDS)
    actions = report(other).actions
    assert sorted(action.kind for action in actions) == ["alert", "retrain"], actions
    assert len(Webhook.received) == 1
    with grpc.insecure_channel(other.address) as channel:
        jobs = (
            training_pb2_grpc.TrainingStub(channel)
            .ListJobs(training_pb2.ListJobsRequest(), metadata=client_metadata("t-replica"), timeout=10)
            .jobs
        )
    assert [job.id for job in jobs] == [actions[0].job_id or actions[1].job_id]
