"""Drift monitoring end to end: `weir control` + a following `weir serve` sampling every request;
traffic recorded, a traffic window set as the reference, then the same rows with one feature shifted:
the report marks that feature CRITICAL and the others NONE; the webhook alert and the retraining job
happen once per cool-down however many windows stay critical; labels with a planted accuracy drop
trigger concept drift; `weir drift report` writes Markdown and self-contained HTML."""

from __future__ import annotations

import http.server
import io
import json
import math
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from tests.conftest import free_port, start_weir
from tests.e2e.test_control_plane import REPLICA_TOKEN, TOKENS, ControlProcess, cli, start_control, wait_until
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import monitoring_pb2, monitoring_pb2_grpc, training_pb2, training_pb2_grpc

Severity = monitoring_pb2.Severity
WINDOW_SECONDS = 3.0
CONFIG = """
max_batch_size: 8
input [ { name: "FEATURES" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "PROBABILITIES" data_type: TYPE_FP32 dims: [ 2 ] } ]
parameters { key: "weir_monitoring_sample_rate" value: { string_value: "1.0" } }
"""


class TwoClass(torch.nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([features[:, 0] + features[:, 1], features[:, 2] - features[:, 3]], dim=1)
        return torch.softmax(logits, dim=1)


class Webhook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    Webhook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    finally:
        server.shutdown()


@pytest.fixture
def planes(tmp_path: Path) -> Iterator[tuple[ControlProcess, str]]:
    state_dir = tmp_path / "control"
    # the test's webhook receiver listens on loopback: the operator allows it explicitly
    control = start_control(state_dir, str(state_dir / "control.db"), free_port(), "--webhook-allow", "127.0.0.1")
    replica = start_weir(
        tmp_path / "replica", "--model-control-mode", "explicit", "--control-plane", control.address,
        "--replica-id", "replica-0", "--heartbeat-seconds", "0.5",
        env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},  # the data plane's own identity
    )  # fmt: skip
    try:
        yield control, replica.grpc_url
    finally:
        replica.terminate_and_wait()
        control.process.terminate()
        control.process.wait(timeout=30)


def rows(count: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 4)).astype(np.float32)


def send(url: str, data: np.ndarray, prefix: str, batch: int = 1) -> list[int]:
    """Requests of ``batch`` rows (a single row carries the id ``prefix-INDEX``); returns the predicted
    class of every row."""
    predicted: list[int] = []
    with grpcclient.InferenceServerClient(url) as client:
        for start in range(0, len(data), batch):
            rows_in = data[start : start + batch]
            tensor = grpcclient.InferInput("FEATURES", list(rows_in.shape), "FP32")
            tensor.set_data_from_numpy(rows_in)
            result = client.infer("scorer", [tensor], request_id=f"{prefix}-{start}")
            predicted += np.argmax(result.as_numpy("PROBABILITIES"), axis=1).tolist()
    return predicted


def report(control: ControlProcess) -> monitoring_pb2.DriftReport:
    with grpc.insecure_channel(control.address) as channel:
        return monitoring_pb2_grpc.MonitoringStub(channel).GetDriftReport(
            monitoring_pb2.GetDriftReportRequest(endpoint="scorer"), metadata=client_metadata("t-replica"), timeout=10
        )


def monitoring(control: ControlProcess, method: str, request: object) -> object:
    with grpc.insecure_channel(control.address) as channel:
        return getattr(monitoring_pb2_grpc.MonitoringStub(channel), method)(
            request, metadata=client_metadata("t-deployer"), timeout=30
        )


def window_after(control: ControlProcess, moment: float) -> monitoring_pb2.DriftWindow:
    """The first closed window that starts at or after ``moment``, once it exists."""

    def closed() -> list[monitoring_pb2.DriftWindow]:
        return [window for window in report(control).windows if window.start.ToNanoseconds() / 1e9 >= moment - 1e-6]

    wait_until(lambda: bool(closed()), 30, f"a window after {moment}")
    return closed()[0]


def retrain_spec() -> training_pb2.JobSpec:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        script = b"print('retraining')\n"
        info = tarfile.TarInfo("train.py")
        info.size = len(script)
        tar.addfile(info, io.BytesIO(script))
    return training_pb2.JobSpec(entrypoint="script:train.py", code_archive=buffer.getvalue())


def deploy_scorer(control: ControlProcess, url: str, tmp_path: Path) -> Path:
    """TwoClass pushed as scorer version 1 and deployed; returns once the data plane serves it."""
    model = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(TwoClass()), str(model))
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    cli(control, "models", "push", "scorer", str(model), "--config", str(config))
    cli(control, "deploy", "scorer", "scorer", "1")
    wait_until(lambda: _ready(url), 60, "the endpoint served")
    return model


def reference_from_traffic(control: ControlProcess, url: str) -> tuple[np.ndarray, monitoring_pb2.ReferenceSummary]:
    """300 normal rows sent in a window of their own, that window set as scorer's reference once closed."""
    reference_rows = rows(300)
    start = _next_window()
    send(url, reference_rows, "reference", batch=8)
    end = math.ceil(time.time() / WINDOW_SECONDS) * WINDOW_SECONDS
    wait_until(lambda: any(w.end.ToNanoseconds() / 1e9 >= end for w in report(control).windows), 30, "reference closed")
    request = monitoring_pb2.SetReferenceRequest(endpoint="scorer")
    request.window.start.FromNanoseconds(int(start * 1e9))
    request.window.end.FromNanoseconds(int(end * 1e9))
    return reference_rows, monitoring(control, "SetReference", request)


def test_a_shifted_feature_is_critical_actions_fire_once_and_labels_reveal_concept_drift(
    planes: tuple[ControlProcess, str], tmp_path: Path, webhook: str
) -> None:
    control, url = planes
    deploy_scorer(control, url, tmp_path)
    policy = monitoring_pb2.MonitoringPolicy(
        endpoint="scorer", window_seconds=WINDOW_SECONDS, min_records=100, webhook_url=webhook, retrain=True,
        cooldown_seconds=3600,
    )  # fmt: skip
    policy.retrain_spec.CopyFrom(retrain_spec())
    monitoring(control, "SetMonitoringPolicy", policy)

    # the reference: a window of normal traffic
    reference_rows, summary = reference_from_traffic(control, url)
    assert summary.rows == 300 and "FEATURES[2]" in summary.numeric_features

    # the same rows with feature 2 shifted, in two windows in a row
    shifted = reference_rows.copy()
    shifted[:, 2] += 3.0
    _next_window()
    send(url, shifted, "shifted-a", batch=8)
    second = _next_window()
    send(url, shifted, "shifted-c", batch=8)
    window = window_after(control, second)
    latest = window
    assert latest.records == 300  # the whole burst in one window: the same rows as the reference but one feature
    features = {feature.name: feature for feature in latest.features}
    assert features["FEATURES[2]"].severity == Severity.CRITICAL, features["FEATURES[2]"]
    assert features["FEATURES[2]"].psi > 0.2 and features["FEATURES[2]"].ks_p_value < 1e-6
    for name in ("FEATURES[0]", "FEATURES[1]", "FEATURES[3]"):
        assert features[name].severity == Severity.NONE, features[name]
    assert latest.predictions and latest.predictions[0].output == "PROBABILITIES"
    assert window.severity == Severity.CRITICAL

    # both critical windows are past: one alert and one retraining job, not two (cool-down)
    wait_until(lambda: len(report(control).actions) >= 2 and Webhook.received, 30, "the actions")
    time.sleep(WINDOW_SECONDS)
    actions = report(control).actions
    assert sorted(action.kind for action in actions) == ["alert", "retrain"], actions
    assert len(Webhook.received) == 1 and "FEATURES[2]" in Webhook.received[0]["critical"]
    with grpc.insecure_channel(control.address) as channel:
        jobs = (
            training_pb2_grpc.TrainingStub(channel)
            .ListJobs(training_pb2.ListJobsRequest(), metadata=client_metadata("t-replica"), timeout=10)
            .jobs
        )
    assert [job.id.startswith("retrain-scorer-") for job in jobs] == [True]

    # concept drift: labels agree with 90% of predictions, then with 40%
    predicted = send(url, reference_rows, "labelled") + send(url, reference_rows, "labelled-late")
    wait_until(lambda: report(control).records_received >= 300 * 5, 30, "the labelled requests recorded")
    labels = monitoring_pb2.RecordFeedbackRequest(endpoint="scorer")
    for index in range(300):
        wrong = index % 10 == 0
        labels.labels.add(request_id=f"labelled-{index}", number=1 - predicted[index] if wrong else predicted[index])
    for index in range(300):
        wrong = index % 10 < 6
        answer = predicted[300 + index]
        labels.labels.add(request_id=f"labelled-late-{index}", number=1 - answer if wrong else answer)
    labels.labels.add(request_id="never-sent", number=1)
    feedback = monitoring(control, "RecordFeedback", labels)
    assert (feedback.matched, feedback.unmatched, feedback.held) == (600, 0, 1)  # held until its record comes
    # the labels count in the windows their requests were recorded in (closed by now)
    wait_until(lambda: sum(w.concept.labelled for w in report(control).windows) == 600, 30, "the labelled windows")
    concepts = [w.concept for w in report(control).windows if w.concept.labelled]
    assert any(c.detector_state == "drift" and c.severity == Severity.CRITICAL for c in concepts), concepts
    assert all(c.reference_accuracy == pytest.approx(0.9, abs=0.01) for c in concepts), concepts

    # the report files
    out = tmp_path / "report"
    written = cli(control, "drift", "report", "scorer", "--out", str(out))
    markdown = Path(written["markdown"]).read_text()
    html = Path(written["html"]).read_text()
    assert "FEATURES\\[2\\]" in markdown  # Markdown-escaped
    assert "| CRITICAL |" in markdown  # the shifted windows in the windows table
    assert "data:image/png;base64," in html and 'src="http' not in html


def _ready(url: str) -> bool:
    try:
        with grpcclient.InferenceServerClient(url) as client:
            return bool(client.is_model_ready("scorer"))
    except Exception:
        return False


def _next_window() -> float:
    """Wait for the next window boundary (so a burst of traffic lands in one window) and return it."""
    boundary = math.ceil(time.time() / WINDOW_SECONDS) * WINDOW_SECONDS
    time.sleep(max(0.0, boundary - time.time()) + 0.05)
    return boundary
