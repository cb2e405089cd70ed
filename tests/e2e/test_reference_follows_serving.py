"""A drift reference set from the serving version's training data follows the serving version
(issue 15): `weir control` + a following `weir serve`; two versions trained by jobs that leave different
training data (reference.parquet); with version 1 serving, `SetReference(serving_lineage)`; after
`weir deploy` of version 2 the monitor takes version 2's training data by itself (audited as
drift-monitor), so the same traffic that matched version 1's data is CRITICAL on the feature version 2's
data has shifted."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tests.e2e.test_control_plane import ControlProcess, cli, wait_until
from tests.e2e.test_drift import CONFIG, TwoClass, _next_window, _ready, monitoring, planes, report, rows, send
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import monitoring_pb2, training_pb2, training_pb2_grpc

__all__ = ["planes"]
Severity = monitoring_pb2.Severity
WINDOW_SECONDS = 3.0
TRAIN = b"""import os, shutil
output = os.path.join(os.environ["WEIR_JOB_DIR"], "output")
os.makedirs(output, exist_ok=True)
here = os.path.dirname(os.path.abspath(__file__))
for name in ("model.pt", "config.pbtxt", "reference.parquet"):
    shutil.copy(os.path.join(here, name), os.path.join(output, name))
"""


def job_spec(model: Path, training_data: bytes) -> training_pb2.JobSpec:
    buffer = io.BytesIO()
    files = (("train.py", TRAIN), ("model.pt", model.read_bytes()), ("config.pbtxt", CONFIG.encode()),
             ("reference.parquet", training_data))  # fmt: skip
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = training_pb2.JobSpec(entrypoint="script:train.py", code_archive=buffer.getvalue())
    spec.register.model_name = "scorer"
    return spec


def parquet(shift: float) -> bytes:
    data = rows(2000, seed=11)
    data[:, 2] += shift
    sink = io.BytesIO()
    pq.write_table(pa.table({f"FEATURES[{column}]": data[:, column] for column in range(4)}), sink)
    return sink.getvalue()


def jobs(control: ControlProcess) -> list[training_pb2.Job]:
    with grpc.insecure_channel(control.address) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        return list(
            stub.ListJobs(training_pb2.ListJobsRequest(), metadata=client_metadata("t-replica"), timeout=10).jobs
        )


def window_of(control: ControlProcess, prefix: str, url: str) -> monitoring_pb2.DriftWindow:
    start = _next_window()
    send(url, rows(300, seed=12), prefix, batch=8)

    def closed() -> monitoring_pb2.DriftWindow | None:
        found = [w for w in report(control).windows if abs(w.start.ToNanoseconds() / 1e9 - start) < 1e-3]
        return found[0] if found and found[0].records == 300 else None

    wait_until(lambda: closed() is not None, 30, f"the {prefix} window")
    return closed()  # type: ignore[return-value]


def test_a_serving_lineage_reference_follows_the_serving_version(
    planes: tuple[ControlProcess, str], tmp_path: Path
) -> None:
    control, url = planes
    model = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(TwoClass()), str(model))
    with grpc.insecure_channel(control.address) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        for job_id, shift in (("train-a", 0.0), ("train-b", 3.0)):  # version 2's data: feature 2 shifted
            request = training_pb2.SubmitJobRequest(id=job_id, spec=job_spec(model, parquet(shift)))
            stub.SubmitJob(request, metadata=client_metadata("t-deployer"), timeout=30)
            wait_until(lambda id=job_id: any(j.id == id and j.registered.version for j in jobs(control)), 120, id)
    cli(control, "deploy", "scorer", "scorer", "1")
    wait_until(lambda: _ready(url), 60, "the endpoint served")
    policy = monitoring_pb2.MonitoringPolicy(endpoint="scorer", window_seconds=WINDOW_SECONDS, min_records=100)
    monitoring(control, "SetMonitoringPolicy", policy)
    summary = monitoring(
        control, "SetReference", monitoring_pb2.SetReferenceRequest(endpoint="scorer", serving_lineage=True)
    )
    assert summary.serving_lineage and summary.serving_version == "scorer:1", summary  # type: ignore[attr-defined]

    first = window_of(control, "first", url)
    assert first.severity == Severity.NONE, first

    # version 2 serves: the next window is judged against its training data, by the monitor itself
    cli(control, "deploy", "scorer", "scorer", "2")
    second = window_of(control, "second", url)
    features = {feature.name: feature.severity for feature in second.features}
    assert features["FEATURES[2]"] == Severity.CRITICAL and features["FEATURES[0]"] == Severity.NONE, features
    reference = report(control).reference
    assert reference.serving_version == "scorer:2" and "train-b" in reference.source, reference
    (event,) = cli(control, "audit", "--actor", "drift-monitor", "--action", "Monitoring/SetReference")
    assert event["target"] == "endpoint/scorer" and event["result"] == "OK" and "scorer:2" in event["detail"], event
