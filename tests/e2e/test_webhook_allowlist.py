"""Drift webhooks and monitoring input through a real `weir control`: a webhook goes only to what the
operator lists with --webhook-allow (none by default; a metadata address, another port, a name for a
listed address are all refused with INVALID_ARGUMENT naming webhook_url and the flag); a bad entry
stops the start with a clear message; policy numbers and feedback labels are finite or refused; and
RecordFeedback is audited."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import free_port
from tests.e2e.test_control_plane import TOKENS, ControlProcess, start_control
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import audit_pb2, audit_pb2_grpc, monitoring_pb2, monitoring_pb2_grpc

Policy = monitoring_pb2.MonitoringPolicy
RECEIVER_PORT = 18_000  # only named in URLs: nothing is sent by these checks


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlProcess]:
    state_dir = tmp_path / "control"
    process = start_control(
        state_dir, str(state_dir / "control.db"), free_port(),
        "--webhook-allow", f"127.0.0.1:{RECEIVER_PORT}", "--webhook-allow", "hooks.example.com",
    )  # fmt: skip
    try:
        yield process
    finally:
        process.process.terminate()
        process.process.wait(timeout=30)


def call(process: ControlProcess, method: str, request: object, token: str = "t-deployer") -> object:
    with grpc.insecure_channel(process.address) as channel:
        return getattr(monitoring_pb2_grpc.MonitoringStub(channel), method)(
            request, metadata=client_metadata(token), timeout=30
        )


def refused(process: ControlProcess, method: str, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(process, method, request)
    return caught.value


def test_webhooks_reach_only_what_the_operator_allows(control: ControlProcess) -> None:
    for url in (
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # cloud metadata
        f"http://127.0.0.1:{RECEIVER_PORT + 1}/",  # a listed address, another port
        f"http://localhost:{RECEIVER_PORT}/",  # a name for a listed address
        "http://10.0.0.7/hook",  # the private network
        "http://[::1]/hook",
    ):
        error = refused(control, "SetMonitoringPolicy", Policy(endpoint="ep", webhook_url=url))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, url
        assert error.details().startswith("webhook_url: ") and "--webhook-allow" in error.details(), error.details()
    assert not call(
        control, "GetMonitoringPolicy", monitoring_pb2.GetMonitoringPolicyRequest(endpoint="ep")
    ).webhook_url
    for url in (f"http://127.0.0.1:{RECEIVER_PORT}/alerts", "https://hooks.example.com/drift"):
        assert call(control, "SetMonitoringPolicy", Policy(endpoint="ep", webhook_url=url)).webhook_url == url


def test_policy_numbers_and_feedback_labels_are_finite_and_feedback_is_audited(control: ControlProcess) -> None:
    for field, policy in (
        ("window_seconds", Policy(endpoint="ep", window_seconds=math.nan)),
        ("cooldown_seconds", Policy(endpoint="ep", cooldown_seconds=math.inf)),
        ("max_windows", Policy(endpoint="ep", max_windows=-3)),
    ):
        error = refused(control, "SetMonitoringPolicy", policy)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(f"{field}: expected")
    call(control, "SetMonitoringPolicy", Policy(endpoint="ep", window_seconds=60))
    labels = monitoring_pb2.RecordFeedbackRequest(endpoint="ep")
    labels.labels.add(request_id="r1", number=math.nan)
    error = refused(control, "RecordFeedback", labels)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("labels[0].number:")
    labels = monitoring_pb2.RecordFeedbackRequest(endpoint="ep")
    labels.labels.add(request_id="never-sampled", number=1)
    # a label ahead of its request's record is held for it (counted unmatched only after the hold)
    assert call(control, "RecordFeedback", labels).held == 1  # type: ignore[attr-defined]
    with grpc.insecure_channel(control.address) as channel:
        events = (
            audit_pb2_grpc.AuditStub(channel)
            .ListAuditEvents(audit_pb2.ListAuditEventsRequest(), metadata=client_metadata("t-admin"), timeout=10)
            .events
        )
    feedback = [(event.actor, event.result) for event in events if event.action == "Monitoring/RecordFeedback"]
    assert ("ci", "OK") in feedback and ("ci", "INVALID_ARGUMENT") in feedback, feedback


def test_no_webhook_by_default_and_a_bad_entry_stops_the_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "control"
    process = start_control(state_dir, str(state_dir / "control.db"), free_port())
    try:
        error = refused(process, "SetMonitoringPolicy", Policy(endpoint="ep", webhook_url="https://hooks.example.com/"))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "allowed: none" in error.details()
    finally:
        process.process.terminate()
        process.process.wait(timeout=30)
    bad = subprocess.run(
        [sys.executable, "-m", "weir.cli", "control", "--state-dir", str(tmp_path / "bad"), "--port", str(free_port()),
         "--webhook-allow", "http://hooks.example.com"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "WEIR_TOKENS": TOKENS},
    )  # fmt: skip
    assert bad.returncode == 2 and "--webhook-allow: expected" in bad.stderr, bad.stderr
