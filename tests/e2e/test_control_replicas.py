"""Two control-plane replicas on one PostgreSQL database, two data planes, each attached to a
different replica (issue 16, "done when"): real `weir control` and `weir serve` processes on free
ports, a fresh database per test, one shared state directory (artifacts, jobs) as in docker/.

- A deploy, a traffic change and a kill switch made through either replica reach both data planes
  (seen in their inference answers and the variant that answered).
- 20 concurrent deploys to one endpoint, half through each replica: every one succeeds (no
  UNKNOWN/INTERNAL, none lost), their revisions are 20 consecutive numbers, the audit log holds each
  once, and both data planes end on the last one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import WeirProcess, start_weir
from tests.e2e.test_control_plane import CONFIG, TOKENS, ControlProcess, scripted, start_control, wait_until
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import audit_pb2, audit_pb2_grpc, deployments_pb2, deployments_pb2_grpc

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.parametrize("store_url", ["postgresql"], indirect=True),  # several replicas need PostgreSQL
]
DATA_PLANE_TOKEN = "t-data-plane"
X = np.array([[1.0, 1.0, 1.0]], np.float32)
FACTORS = {1: 2.0, 2: 3.0}  # version -> what it multiplies by


def start_replica(state_dir: Path, database_url: str, *extra: str) -> ControlProcess:
    """`weir control --port 0` on ``database_url``: its port is the one it logged at start."""
    replica = start_control(state_dir, database_url, 0, *extra)
    started = next(line for line in replica.lines if '"control plane started"' in line)
    replica.port = int(json.loads(started)["port"])
    return replica


def stop_replica(replica: ControlProcess) -> None:
    if replica.process.poll() is None:
        replica.process.terminate()
    replica.process.wait(timeout=30)


def attach_data_plane(replica: ControlProcess, repository: Path, name: str) -> WeirProcess:
    return start_weir(
        repository, "--model-control-mode", "explicit", "--control-plane", replica.address, "--replica-id", name,
        "--heartbeat-seconds", "0.5", env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": DATA_PLANE_TOKEN},
    )  # fmt: skip


@dataclass
class Cluster:
    replicas: list[ControlProcess]
    data_planes: list[WeirProcess]
    clients: list[grpcclient.InferenceServerClient]

    def deployments(self, replica: int) -> tuple[grpc.Channel, deployments_pb2_grpc.DeploymentsStub]:
        channel = grpc.insecure_channel(self.replicas[replica].address)
        return channel, deployments_pb2_grpc.DeploymentsStub(channel)


@pytest.fixture
def cluster(store_url: str, tmp_path: Path) -> Iterator[Cluster]:
    state_dir = tmp_path / "control"  # shared by both replicas, as the volume in docker/
    replicas: list[ControlProcess] = []
    data_planes: list[WeirProcess] = []
    clients: list[grpcclient.InferenceServerClient] = []
    try:
        replicas.extend(start_replica(state_dir, store_url) for _ in range(2))
        for index, replica in enumerate(replicas):
            data_planes.append(attach_data_plane(replica, tmp_path / f"data-plane-{index}", f"data-plane-{index}"))
        clients.extend(grpcclient.InferenceServerClient(data_plane.grpc_url) for data_plane in data_planes)
        config = tmp_path / "config.pbtxt"
        config.write_text(CONFIG)
        for version, factor in FACTORS.items():
            pushed = push(replicas[version % 2], scripted(tmp_path, factor), config)  # one through each
            assert pushed["version"] == str(version), pushed
        yield Cluster(replicas, data_planes, clients)
    finally:
        for client in clients:
            client.close()
        for data_plane in data_planes:
            data_plane.terminate_and_wait()
        for replica in replicas:
            stop_replica(replica)


def push(replica: ControlProcess, artifact: Path, config: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "weir.cli", "models", "push", "scale", str(artifact), "--config", str(config),
         "--control-plane", replica.address, "--token", "t-deployer", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def answer(client: grpcclient.InferenceServerClient, key: str = "") -> tuple[str, float]:
    """(the variant that answered, the factor its answer shows)."""
    tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer("scale", [tensor], headers={"x-user": key} if key else None, client_timeout=30)
    variant = result.get_response().parameters["weir_variant"].string_param
    return variant, float(result.as_numpy("OUTPUT__0")[0][0])


def everywhere(cluster: Cluster, expected: set[tuple[str, float]], message: str) -> None:
    """Wait until every data plane answers 16 keyed requests with exactly ``expected``."""
    for index, client in enumerate(cluster.clients):
        wait_until(
            lambda client=client: {answer(client, f"user-{key}") for key in range(16)} == expected,
            timeout=120,
            message=f"data plane {index}: {message}",
        )


def split(stable_weight: int) -> deployments_pb2.SetTrafficRequest:
    return deployments_pb2.SetTrafficRequest(
        endpoint="scale",
        variants=[
            deployments_pb2.Variant(name="stable", model_name="scale", version=1, weight=stable_weight),
            deployments_pb2.Variant(name="canary", model_name="scale", version=2, weight=100 - stable_weight),
        ],
        routing=deployments_pb2.RoutingPolicy(key_header="x-user"),
    )


def test_deploy_traffic_and_kill_switch_through_either_replica_reach_both_data_planes(cluster: Cluster) -> None:
    deployer = client_metadata("t-deployer")
    for through in (1, 0):  # each change once through each replica, seen on both data planes
        channel, deployments = cluster.deployments(through)
        with channel:
            version = 2 - through
            deployments.Deploy(
                deployments_pb2.DeployRequest(endpoint="scale", model_name="scale", version=version), metadata=deployer
            )
            everywhere(cluster, {("primary", FACTORS[version])}, f"a deploy through replica {through}")

            deployments.SetTraffic(split(stable_weight=0), metadata=deployer)
            everywhere(cluster, {("canary", 3.0)}, f"a traffic change through replica {through}")

            deployments.SetTraffic(split(stable_weight=50), metadata=deployer)
            everywhere(cluster, {("stable", 2.0), ("canary", 3.0)}, f"a 50/50 split through replica {through}")

            deployments.SetFlag(
                deployments_pb2.SetFlagRequest(endpoint="scale", name="kill_switch", value="stable"), metadata=deployer
            )
            everywhere(cluster, {("stable", 2.0)}, f"the kill switch through replica {through}")
            deployments.SetFlag(
                deployments_pb2.SetFlagRequest(endpoint="scale", name="kill_switch", value=""), metadata=deployer
            )
            everywhere(cluster, {("stable", 2.0), ("canary", 3.0)}, f"the kill switch off through replica {through}")


def test_concurrent_deploys_through_both_replicas_are_each_applied_once(cluster: Cluster) -> None:
    deployer = client_metadata("t-deployer")
    channels = [grpc.insecure_channel(replica.address) for replica in cluster.replicas]
    stubs = [deployments_pb2_grpc.DeploymentsStub(channel) for channel in channels]
    try:
        first = stubs[0].Deploy(
            deployments_pb2.DeployRequest(endpoint="scale", model_name="scale", version=1), metadata=deployer
        )
        start = threading.Barrier(20)

        def deploy(index: int) -> tuple[int, int] | str:
            """(revision, version) of a deploy, or the status code it failed with."""
            version = 1 + index % 2
            start.wait(timeout=30)
            try:
                deployment = stubs[index // 10].Deploy(
                    deployments_pb2.DeployRequest(endpoint="scale", model_name="scale", version=version),
                    metadata=deployer,
                    timeout=120,
                )
            except grpc.RpcError as error:
                return f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
            return int(deployment.revision), version

        with ThreadPoolExecutor(20) as pool:
            outcomes = list(pool.map(deploy, range(20)))
        failures = [outcome for outcome in outcomes if isinstance(outcome, str)]
        assert failures == [], failures
        applied = sorted(outcome for outcome in outcomes if not isinstance(outcome, str))
        revisions = [revision for revision, _ in applied]
        assert revisions == list(range(first.revision + 1, first.revision + 21)), revisions  # none lost or shared

        for stub in stubs:  # both replicas read the last one
            current = stub.GetDeployment(deployments_pb2.GetDeploymentRequest(endpoint="scale"), metadata=deployer)
            assert current.revision == revisions[-1]
            assert [variant.version for variant in current.variants] == [applied[-1][1]]
        last_factor = FACTORS[applied[-1][1]]
        everywhere(cluster, {("primary", last_factor)}, "the last of the concurrent deploys")

        events = (
            audit_pb2_grpc.AuditStub(channels[1])
            .ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(
                    action="Deployments/Deploy", target_prefix="endpoint/scale", page_size=100
                ),
                metadata=deployer,
            )
            .events
        )
        assert sorted(event.result for event in events) == ["OK"] * 21, [(e.result, e.detail) for e in events]
    finally:
        for channel in channels:
            channel.close()
