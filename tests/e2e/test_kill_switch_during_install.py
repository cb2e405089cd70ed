"""A kill switch is not queued behind an artifact install: it applies while a 200 MB version of the
same endpoint is still downloading and loading on the data plane.

Real processes: `weir control` on SQLite and one `weir serve --control-plane`. The endpoint serves
stable (version 1) and canary (version 2); the canary moves to version 3, a TorchScript model with
a 200 MB unused buffer; while the data plane reports that install LOADING, the kill switch sends
everything to stable. The data plane's log shows the flag applied before version 3 served, and
every answer from then on comes from stable. Ordering, not timing: the latency is measured in
bench/propagation.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from tests.conftest import WeirProcess, free_port, start_weir
from tests.e2e.test_control_plane import (
    CONFIG,
    REPLICA_TOKEN,
    TOKENS,
    ControlProcess,
    cli,
    scripted,
    start_control,
    wait_until,
)
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc

pytestmark = pytest.mark.timeout(600)

X = np.array([[1.0, 2.0, 3.0]], np.float32)
BALLAST_ELEMENTS = 50_000_000  # float32: 200 MB the model carries and never reads


class Ballasted(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("ballast", torch.zeros(BALLAST_ELEMENTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@pytest.fixture
def followed(tmp_path: Path) -> Iterator[tuple[ControlProcess, WeirProcess]]:
    control = start_control(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port())
    data_plane: WeirProcess | None = None
    try:
        data_plane = start_weir(
            tmp_path / "data-plane", "--model-control-mode", "explicit", "--control-plane", control.address,
            "--replica-id", "data-plane", "--heartbeat-seconds", "0.5",
            env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},
        )  # fmt: skip
        yield control, data_plane
    finally:
        if data_plane is not None:
            data_plane.terminate_and_wait()
        control.process.terminate()
        control.process.wait(timeout=30)


def ask(client: grpcclient.InferenceServerClient) -> str:
    tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer("scale", [tensor], client_timeout=30)
    return result.get_response().parameters["weir_variant"].string_param


def canary_state(control: ControlProcess) -> tuple[str, int]:
    """The data plane's reported state of the canary variant and the version it is asked to serve."""
    with grpc.insecure_channel(control.address) as channel:
        replicas = deployments_pb2_grpc.DeploymentsStub(channel).ListReplicas(
            deployments_pb2.ListReplicasRequest(), metadata=client_metadata("t-replica"), timeout=10
        )
    for replica in replicas.replicas:
        for status in replica.status.endpoints:
            if status.variant == "canary":
                return deployments_pb2.EndpointStatus.State.Name(status.state), status.desired.version
    return "", 0


def log_index(data_plane: WeirProcess, message: str, **fields: object) -> int | None:
    for index, record in enumerate(data_plane.log_records()):
        if record.get("msg") == message and all(record.get(key) == value for key, value in fields.items()):
            return index
    return None


def test_a_kill_switch_applies_while_a_200_mb_version_installs(followed, tmp_path) -> None:
    control, data_plane = followed
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    cli(control, "models", "push", "scale", str(scripted(tmp_path, 2.0)), "--config", str(config))
    cli(control, "models", "push", "scale", str(scripted(tmp_path, 3.0)), "--config", str(config))
    big = tmp_path / "ballasted" / "model.pt"
    big.parent.mkdir()
    torch.jit.save(torch.jit.script(Ballasted(4.0)), str(big))
    assert big.stat().st_size > 200_000_000
    cli(control, "models", "push", "scale", str(big), "--config", str(config))
    cli(control, "traffic", "scale", "--variant", "stable=scale:1:50", "--variant", "canary=scale:2:50")
    client = grpcclient.InferenceServerClient(data_plane.grpc_url)
    try:
        wait_until(lambda: {ask(client) for _ in range(40)} == {"stable", "canary"}, message="the 50/50 split")

        cli(control, "traffic", "scale", "--variant", "stable=scale:1:50", "--variant", "canary=scale:3:50")
        wait_until(lambda: canary_state(control) == ("LOADING", 3), message="the 200 MB version to be installing")
        with grpc.insecure_channel(control.address) as channel:  # not the CLI: no interpreter start-up
            deployments_pb2_grpc.DeploymentsStub(channel).SetFlag(
                deployments_pb2.SetFlagRequest(endpoint="scale", name="kill_switch", value="stable"),
                metadata=client_metadata("t-deployer"), timeout=30,
            )  # fmt: skip
        wait_until(
            lambda: log_index(data_plane, "endpoint flags applied", flags={"kill_switch": "stable"}) is not None,
            message="the kill switch on the data plane",
        )
        answers = {ask(client) for _ in range(40)}  # the install may still run or may have ended: either way
        wait_until(lambda: canary_state(control) == ("READY", 3), message="the 200 MB version to serve")
    finally:
        client.close()
    assert answers == {"stable"}
    flag_applied = log_index(data_plane, "endpoint flags applied", flags={"kill_switch": "stable"})
    big_serves = log_index(data_plane, "variant now serves", model="scale@canary", source="scale:3")
    assert flag_applied is not None and big_serves is not None
    assert flag_applied < big_serves, "the kill switch waited for the install"
