"""Canary analysis on feedback labels (issue 15, scope 2: "promoted, or rolled back if worse"), end to
end: `weir control` and two `weir serve --control-plane` that sample every request for the drift
monitor; the test sends traffic with request ids through tritonclient and, for each request, its label
(the index of the largest input element) through Monitoring/RecordFeedback.

- a canary that serves without an error but answers wrong (x * -1: the smallest element wins) is
  rolled back at its first judged interval, the reason naming both accuracies;
- a canary that answers like the baseline passes every step on the same labels and is promoted, its
  analyses carrying the labelled counts and accuracies;
- no inference request fails throughout.
Without labels in the analysis, the wrong canary was promoted (it has no errors and the same latency).
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import WeirProcess
from tests.e2e.test_control_plane import CONFIG, ControlProcess, cli, scripted, serves_factor, wait_until
from tests.e2e.test_rollout_recovery import ended, planes  # noqa: F401  (planes: the fixture)
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import monitoring_pb2, monitoring_pb2_grpc

pytestmark = pytest.mark.timeout(600)

SAMPLED_CONFIG = CONFIG + 'parameters { key: "weir_monitoring_sample_rate" value: { string_value: "1" } }\n'


def push(control: ControlProcess, tmp_path: Path, factor: float) -> str:
    config = tmp_path / "config.pbtxt"
    config.write_text(SAMPLED_CONFIG)
    pushed = cli(control, "models", "push", "scale", str(scripted(tmp_path, factor)), "--config", str(config))
    return str(pushed["version"])


class LabelledTraffic:
    """Requests with ids to both replicas in turn, each labelled right after its answer (in batches of
    50 through RecordFeedback) until stopped; counts failures."""

    def __init__(self, control: ControlProcess, replicas: list[WeirProcess]) -> None:
        self._control = control
        self._urls = [replica.grpc_url for replica in replicas]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0
        self.failures: list[str] = []

    def __enter__(self) -> LabelledTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        clients = [grpcclient.InferenceServerClient(url) for url in self._urls]
        generator = np.random.default_rng(7)
        pending = monitoring_pb2.RecordFeedbackRequest(endpoint="scale")
        with grpc.insecure_channel(self._control.address) as channel:
            monitoring = monitoring_pb2_grpc.MonitoringStub(channel)
            for number in itertools.count():
                if self._stop.is_set():
                    break
                x = generator.permutation(3).astype(np.float32)[np.newaxis, :]  # distinct: one right answer
                data = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
                data.set_data_from_numpy(x)
                request_id = f"r{number}"
                try:
                    clients[number % len(clients)].infer("scale", [data], request_id=request_id, client_timeout=30)
                except Exception as error:  # counted, and the test says which
                    self.failures.append(f"{request_id}: {error}")
                    continue
                self.sent += 1
                pending.labels.add(request_id=request_id, number=float(np.argmax(x)))
                if len(pending.labels) >= 50:
                    monitoring.RecordFeedback(pending, metadata=client_metadata("t-deployer"), timeout=30)
                    del pending.labels[:]
        for client in clients:
            client.close()


def canary(control: ControlProcess, version: str) -> None:
    cli(
        control, "rollout", "start", "scale", f"scale:{version}", "--steps", "50,100", "--interval", "3",
        "--min-requests", "10", "--min-labelled", "20",
    )  # fmt: skip


def test_a_canary_that_answers_worse_on_labelled_traffic_is_rolled_back_and_a_good_one_promoted(planes) -> None:  # noqa: F811
    control, replicas, tmp_path = planes
    right, wrong, right_again = (
        push(control, tmp_path, 1.0),
        push(control, tmp_path, -1.0),
        push(control, tmp_path, 2.0),
    )
    cli(control, "deploy", "scale", "scale", right)
    for replica in replicas:
        wait_until(lambda url=replica.grpc_url: serves_factor(url, 1.0), message="both replicas serve version 1")

    with LabelledTraffic(control, replicas) as traffic:
        canary(control, wrong)
        worse = ended(control)
        canary(control, right_again)
        better = ended(control)
    assert traffic.failures == [] and traffic.sent > 0

    assert worse["state"] == "ROLLED_BACK", worse
    assert "analysis failed: accuracy 0.000 on" in worse["reason"] and "(allowed drop 0.05)" in worse["reason"]
    failed = worse["analyses"][-1]
    assert failed["verdict"] == "FAIL"
    assert int(failed["canary_labelled"]) >= 20 and int(failed["baseline_labelled"]) >= 20
    assert failed.get("canary_accuracy", 0.0) == 0.0 and failed["baseline_accuracy"] == 1.0

    assert better["state"] == "SUCCEEDED", better
    judged = [analysis for analysis in better["analyses"] if "accuracy 1.000 on" in analysis["reason"]]
    assert judged and all(analysis["verdict"] == "PASS" for analysis in better["analyses"] if analysis in judged)
    assert all(analysis["canary_accuracy"] == 1.0 for analysis in judged)
    for replica in replicas:
        assert serves_factor(replica.grpc_url, 2.0)
