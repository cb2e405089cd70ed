"""The control plane and two data planes as real processes on free ports, on SQLite and PostgreSQL.

One scenario per store: push with the CLI, deploy, infer through both data planes with tritonclient;
deploy a new version under load with zero failed requests; stop the control plane (both keep
serving) and start it again (both reattach and follow the next deploy); a version whose stored
artifact is corrupt fails to load on the replicas while the old one keeps serving; the data planes'
repository RPCs need a deployer token; a control plane killed with SIGKILL during an upload leaves no
READY version for it and a consistent store.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.asyncio_gate import GATE
from tests.conftest import WeirProcess, free_port, start_weir
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc, registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(600)

# t-replica is a viewer's token (the name is historic); data planes attach with t-data-plane, a replica.
TOKENS = (
    "root:admin:t-admin,ci:deployer:t-deployer,replica:viewer:t-replica,data-plane:replica:t-data-plane,"
    "release:approver:t-approver"
)
REPLICA_TOKEN = "t-data-plane"
CONFIG = """
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
dynamic_batching { }
"""


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@dataclass
class ControlProcess:
    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_control(state_dir: Path, database_url: str, port: int, *extra: str) -> ControlProcess:
    command = [
        sys.executable, "-m", "weir.cli", "control", "--state-dir", str(state_dir), "--database-url", database_url,
        "--port", str(port), "--log-format", "json", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "WEIR_TOKENS": TOKENS}
    )
    running = ControlProcess(process, port)
    started = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            running.lines.append(line.rstrip("\n"))
            if '"control plane started"' in line:
                started.set()

    threading.Thread(target=pump, daemon=True).start()
    GATE.watch_lines("weir control", running.lines)
    deadline = time.monotonic() + 60
    while not started.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("weir control did not start:\n" + "\n".join(running.lines[-30:]))
    return running


def cli(control: ControlProcess, *args: str, token: str = "t-deployer") -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "weir.cli", *args, "--control-plane", control.address, "--token", token, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def scripted(tmp_path: Path, factor: float) -> Path:
    path = tmp_path / f"scale-{factor}" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Scale(factor)), str(path))
    return path


def infer(url: str, x: np.ndarray, client: grpcclient.InferenceServerClient | None = None) -> np.ndarray:
    own = client is None
    client = client or grpcclient.InferenceServerClient(url)
    try:
        data = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
        data.set_data_from_numpy(x)
        return client.infer("scale", [data], client_timeout=30).as_numpy("OUTPUT__0")
    finally:
        if own:
            client.close()


def wait_until(condition, timeout: float = 90, message: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception as error:  # not ready yet
            last = error
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {message} (last error: {last!r})")


def serves_factor(url: str, factor: float) -> bool:
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    return bool(np.allclose(infer(url, x), x * factor))


def replica_states(control: ControlProcess) -> dict[str, list[tuple[str, str, int]]]:
    with grpc.insecure_channel(control.address) as channel:
        replicas = deployments_pb2_grpc.DeploymentsStub(channel).ListReplicas(
            deployments_pb2.ListReplicasRequest(), metadata=client_metadata("t-replica"), timeout=10
        )
    return {
        replica.replica_id: [
            (status.endpoint, deployments_pb2.EndpointStatus.State.Name(status.state), status.serving.version)
            for status in replica.status.endpoints
        ]
        for replica in replicas.replicas
    }


def start_replicas(control: ControlProcess, tmp_path: Path, heartbeat: str = "0.5") -> list[WeirProcess]:
    """Two `weir serve --control-plane` replicas following ``control`` (tokens: TOKENS)."""
    return [
        start_weir(
            tmp_path / f"replica-{index}", "--model-control-mode", "explicit", "--control-plane", control.address,
            "--replica-id", f"replica-{index}", "--heartbeat-seconds", heartbeat,
            env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},
        )
        for index in range(2)
    ]  # fmt: skip


@pytest.fixture
def planes(store_url: str, tmp_path: Path) -> Iterator[tuple[dict, list[WeirProcess]]]:
    state = {"port": free_port(), "state_dir": tmp_path / "control", "url": store_url}
    state["control"] = start_control(state["state_dir"], store_url, state["port"])
    data_planes = start_replicas(state["control"], tmp_path)
    try:
        yield state, data_planes
    finally:
        for running in data_planes:
            running.terminate_and_wait()
        if state["control"].process.poll() is None:
            state["control"].process.terminate()
            state["control"].process.wait(timeout=30)


def test_two_data_planes_follow_deploys_survive_the_control_plane_and_refuse_bad_versions(planes, tmp_path) -> None:
    state, data_planes = planes
    control: ControlProcess = state["control"]
    urls = [running.grpc_url for running in data_planes]
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)

    # push with the CLI and deploy: both replicas serve it
    pushed = cli(control, "models", "push", "scale", str(scripted(tmp_path, 2.0)), "--config", str(config),
                 "--tag", "owner=test", "--source-job", "job-1")  # fmt: skip
    assert pushed["state"] == "READY" and pushed["version"] == "1"
    downloaded = cli(control, "models", "download", "scale", "1", "--out", str(tmp_path / "copy.pt"), token="t-replica")
    assert (tmp_path / "copy.pt").read_bytes() == (tmp_path / "scale-2.0" / "model.pt").read_bytes()
    assert downloaded["sha256"] == pushed["artifact_sha256"]
    cli(control, "deploy", "scale", "scale", "1")
    for url in urls:
        wait_until(lambda url=url: serves_factor(url, 2.0), message=f"{url} to serve version 1")

    # a new version under load: no request fails, both end up on it
    cli(control, "models", "push", "scale", str(scripted(tmp_path, 3.0)), "--config", str(config))
    failures: list[str] = []
    counts = [0, 0]
    stop = threading.Event()

    def load(index: int) -> None:
        client = grpcclient.InferenceServerClient(urls[index])
        x = np.array([[1.0, 1.0, 1.0]], np.float32)
        try:
            while not stop.is_set():
                try:
                    y = infer(urls[index], x, client)
                    if not (np.allclose(y, 2.0) or np.allclose(y, 3.0)):
                        failures.append(f"wrong answer {y}")
                    counts[index] += 1
                except InferenceServerException as error:
                    failures.append(str(error))
        finally:
            client.close()

    loops = [threading.Thread(target=load, args=(index,)) for index in range(2)]
    for loop in loops:
        loop.start()
    time.sleep(0.5)
    cli(control, "deploy", "scale", "scale", "2")
    for url in urls:
        wait_until(lambda url=url: serves_factor(url, 3.0), message=f"{url} to serve version 2")
    time.sleep(0.5)
    stop.set()
    for loop in loops:
        loop.join(timeout=30)
    assert failures == [] and min(counts) > 10, (failures[:5], counts)
    wait_until(
        lambda: (
            all(states == [("scale", "READY", 2)] for states in replica_states(control).values())
            and len(replica_states(control)) == 2
        ),
        message="both replicas to report version 2 READY",
    )

    # the control plane stops: both keep serving; it comes back: both reattach and follow
    control.process.terminate()
    control.process.wait(timeout=30)
    time.sleep(1.5)
    for url in urls:
        assert serves_factor(url, 3.0)
    control = state["control"] = start_control(state["state_dir"], state["url"], state["port"])
    wait_until(lambda: len(replica_states(control)) == 2, message="both replicas to reattach")
    cli(control, "deploy", "scale", "scale", "1")  # a rollback, after the restart
    for url in urls:
        wait_until(lambda url=url: serves_factor(url, 2.0), message=f"{url} to roll back to version 1")

    # a version whose stored artifact is corrupt: FAILED on the replicas, version 1 keeps serving
    pushed = cli(control, "models", "push", "scale", str(scripted(tmp_path, 4.0)), "--config", str(config))
    blob = state["state_dir"] / "artifacts" / "blobs" / pushed["artifact_sha256"][:2] / pushed["artifact_sha256"]
    blob.write_bytes(blob.read_bytes()[:-10] + b"corrupted!")
    cli(control, "deploy", "scale", "scale", pushed["version"])
    wait_until(
        lambda: all(states == [("scale", "FAILED", 1)] for states in replica_states(control).values()),
        message="both replicas to report the corrupt version FAILED, still serving version 1",
    )
    for url in urls:
        assert serves_factor(url, 2.0)

    # the data planes' repository RPCs need a deployer's token
    for metadata, code in (
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (client_metadata("t-replica"), grpc.StatusCode.PERMISSION_DENIED),
    ):
        client = grpcclient.InferenceServerClient(urls[0])
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.unload_model("scale", headers=dict((key, value) for key, value in metadata))
            assert code.name in str(refused.value.status()) or code.name in str(refused.value)
        finally:
            client.close()
    assert serves_factor(urls[0], 2.0)

    # no token ever reaches a log
    for lines in (control.lines, *(running.log_lines for running in data_planes)):
        text = "\n".join(lines)
        assert not any(token in text for token in ("t-admin", "t-deployer", "t-replica", REPLICA_TOKEN))


def test_a_control_plane_killed_during_an_upload_leaves_no_ready_version(store_url: str, tmp_path: Path) -> None:
    port = free_port()
    state_dir = tmp_path / "control"
    control = start_control(state_dir, store_url, port)
    data = os.urandom(8 << 20)
    try:
        with grpc.insecure_channel(control.address) as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)
            metadata = client_metadata("t-deployer")
            registry.CreateRegisteredModel(registry_pb2.CreateRegisteredModelRequest(name="big"), metadata=metadata)
            header = registry_pb2.CreateModelVersionRequest.Header(
                model_name="big", config_pbtxt=CONFIG, artifact_filename="model.pt",
                artifact_sha256=hashlib.sha256(data).hexdigest(), artifact_size=len(data),
            )  # fmt: skip
            halfway = threading.Event()

            def messages() -> Iterator[registry_pb2.CreateModelVersionRequest]:
                yield registry_pb2.CreateModelVersionRequest(header=header)
                for offset in range(0, len(data), 1 << 20):
                    if offset >= len(data) // 2:
                        halfway.set()
                        time.sleep(30)  # the control plane dies meanwhile
                    yield registry_pb2.CreateModelVersionRequest(chunk=data[offset : offset + (1 << 20)])

            result: dict[str, object] = {}

            def upload() -> None:
                try:
                    result["version"] = registry.CreateModelVersion(messages(), metadata=metadata, timeout=60)
                except grpc.RpcError as error:
                    result["error"] = error.code()  # type: ignore[attr-defined]

            uploader = threading.Thread(target=upload, daemon=True)
            uploader.start()
            assert halfway.wait(30)
            time.sleep(0.5)
            control.process.send_signal(signal.SIGKILL)
            control.process.wait(timeout=10)
            uploader.join(timeout=40)
            assert result.get("error") == grpc.StatusCode.UNAVAILABLE

        control = start_control(state_dir, store_url, port)
        with grpc.insecure_channel(control.address) as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)
            versions = registry.SearchModelVersions(
                registry_pb2.SearchModelVersionsRequest(model_name="big"), metadata=client_metadata("t-replica")
            ).versions
            assert [(v.version, registry_pb2.ModelVersion.State.Name(v.state)) for v in versions] == [(1, "FAILED")]
            assert "stopped during it" in versions[0].failure_reason
            assert (
                registry.GetRegisteredModel(
                    registry_pb2.GetRegisteredModelRequest(name="big"), metadata=client_metadata("t-replica")
                ).latest_version
                == 0
            )
        assert list((state_dir / "artifacts" / "blobs").glob("*/*")) == []  # nothing half-written published
        assert list((state_dir / "artifacts" / "incoming").iterdir()) == []  # the partial file went at restart
    finally:
        if control.process.poll() is None:
            control.process.terminate()
            control.process.wait(timeout=30)
