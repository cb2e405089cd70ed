"""The control plane over real gRPC (in-process server on port 0), on SQLite and PostgreSQL:
streaming upload and download, checksum and config refusals, auth codes, the audit trail, and the
attach stream as a data plane sees it."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from weir_control.server import ControlPlaneServer, ControlSettings
from weir_proto.auth import TokenTable, client_metadata
from weir_proto.control.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    deployments_pb2,
    deployments_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    rollouts_pb2,
    rollouts_pb2_grpc,
)

CONFIG = """
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""
TOKENS = "root:admin:t-admin,ci:deployer:t-deployer,dashboard:viewer:t-viewer,node:replica:t-node"
ADMIN, DEPLOYER, VIEWER = client_metadata("t-admin"), client_metadata("t-deployer"), client_metadata("t-viewer")
REPLICA = client_metadata("t-node")
ARTIFACT = bytes(range(256)) * 9000  # ~2.3 MB: several chunks


class Client:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.registry = registry_pb2_grpc.RegistryStub(channel)
        self.deployments = deployments_pb2_grpc.DeploymentsStub(channel)
        self.sync = deployments_pb2_grpc.DataPlaneSyncStub(channel)
        self.audit = audit_pb2_grpc.AuditStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    async def push(
        self, model: str = "mlp", data: bytes = ARTIFACT, sha256: str | None = None, config: str = CONFIG
    ) -> registry_pb2.ModelVersion:
        header = registry_pb2.CreateModelVersionRequest.Header(
            model_name=model,
            config_pbtxt=config,
            artifact_filename="model.pt",
            artifact_sha256=sha256 or hashlib.sha256(data).hexdigest(),
            artifact_size=len(data),
        )

        async def messages() -> AsyncIterator[registry_pb2.CreateModelVersionRequest]:
            yield registry_pb2.CreateModelVersionRequest(header=header)
            for offset in range(0, len(data), 1 << 20):
                yield registry_pb2.CreateModelVersionRequest(chunk=data[offset : offset + (1 << 20)])

        return await self.registry.CreateModelVersion(messages(), metadata=DEPLOYER)


@pytest.fixture
async def control(store_url: str, tmp_path: Path) -> AsyncIterator[tuple[ControlPlaneServer, Client]]:
    server = ControlPlaneServer(
        ControlSettings(state_dir=tmp_path / "state", database_url=store_url, port=0),
        tokens=TokenTable.from_environment_value(TOKENS),
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, Client(channel)
    finally:
        await channel.close()
        await server.stop()


async def test_a_streamed_upload_becomes_ready_and_downloads_byte_for_byte(control) -> None:
    _, client = control
    await client.registry.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER
    )
    version = await client.push()
    assert version.state == registry_pb2.ModelVersion.READY and version.version == 1
    assert version.artifact_sha256 == hashlib.sha256(ARTIFACT).hexdigest()

    header, received = None, bytearray()
    async for part in client.registry.DownloadArtifact(
        registry_pb2.DownloadArtifactRequest(model_name="mlp", version=1), metadata=VIEWER
    ):
        if part.WhichOneof("part") == "header":
            header = part.header
        else:
            received += part.chunk
    assert header is not None and header.artifact_size == len(ARTIFACT)
    assert bytes(received) == ARTIFACT


async def test_a_checksum_mismatch_is_refused_and_leaves_a_failed_version(control) -> None:
    _, client = control
    await client.registry.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.push(sha256="0" * 64)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "artifact_sha256: expected the bytes to hash to 000" in refused.value.details()

    versions = await client.registry.SearchModelVersions(
        registry_pb2.SearchModelVersionsRequest(model_name="mlp"), metadata=VIEWER
    )
    assert [(v.version, v.state) for v in versions.versions] == [(1, registry_pb2.ModelVersion.FAILED)]
    assert "hash" in versions.versions[0].failure_reason
    with pytest.raises(grpc.aio.AioRpcError) as not_ready:
        await client.deployments.Deploy(
            deployments_pb2.DeployRequest(endpoint="mlp", model_name="mlp", version=1), metadata=DEPLOYER
        )
    assert not_ready.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_unservable_config_is_refused_before_any_byte_is_stored(control) -> None:
    _, client = control
    await client.registry.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.push(config='input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]')
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config_pbtxt output: expected at least one output" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await client.push(model="ghost")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_tokens_and_roles_gate_every_control_rpc(control) -> None:
    _, client = control
    request = registry_pb2.CreateRegisteredModelRequest(name="m")
    for metadata, code in (
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (client_metadata("not-a-token"), grpc.StatusCode.UNAUTHENTICATED),
        (VIEWER, grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.registry.CreateRegisteredModel(request, metadata=metadata)
        assert refused.value.code() == code
        assert "t-viewer" not in (refused.value.details() or "")  # tokens never echo back
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated_read:
        await client.registry.GetRegisteredModel(registry_pb2.GetRegisteredModelRequest(name="m"))
    assert unauthenticated_read.value.code() == grpc.StatusCode.UNAUTHENTICATED

    await client.registry.CreateRegisteredModel(request, metadata=DEPLOYER)
    assert (
        await client.registry.GetRegisteredModel(registry_pb2.GetRegisteredModelRequest(name="m"), metadata=VIEWER)
    ).name == "m"
    health = await client.health.Check(health_pb2.HealthCheckRequest(service=""))  # open
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_mutations_leave_an_audit_trail_with_actor_result_and_before_after(control) -> None:
    _, client = control
    await client.registry.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER
    )
    await client.push()
    await client.push()
    await client.deployments.Deploy(
        deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", version=1), metadata=DEPLOYER
    )
    await client.deployments.Deploy(
        deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", version=2), metadata=ADMIN
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await client.deployments.Deploy(
            deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", version=9), metadata=DEPLOYER
        )

    events = (
        await client.audit.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(action="Deployments/Deploy"), metadata=VIEWER
        )
    ).events
    assert [(event.actor, event.result) for event in events] == [
        ("ci", "NOT_FOUND"),
        ("root", "OK"),
        ("ci", "OK"),
    ]
    failed, moved, created = events
    assert "has no version 9" in failed.detail and failed.after == ""
    assert '"version":"1"' in moved.before and '"version":"2"' in moved.after
    assert created.before == "" and created.target == "endpoint/web"
    everything = (await client.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(), metadata=VIEWER)).events
    assert {event.action for event in everything} >= {
        "Registry/CreateRegisteredModel",
        "Registry/CreateModelVersion",
        "Registry/CompleteModelVersion",
    }


async def test_an_attached_data_plane_gets_the_desired_state_at_once_and_on_every_change(control) -> None:
    _, client = control
    await client.registry.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER
    )
    first, second = await client.push(), await client.push()
    await client.registry.SetAlias(
        registry_pb2.SetAliasRequest(model_name="mlp", alias="champion", version=first.version), metadata=DEPLOYER
    )
    outgoing: asyncio.Queue[deployments_pb2.DataPlaneMessage] = asyncio.Queue()
    outgoing.put_nowait(
        deployments_pb2.DataPlaneMessage(hello=deployments_pb2.Hello(replica_id="r1", address="127.0.0.1:1"))
    )

    async def messages() -> AsyncIterator[deployments_pb2.DataPlaneMessage]:
        while True:
            yield await outgoing.get()

    stream = client.sync.Attach(messages(), metadata=REPLICA)
    states = stream.__aiter__()
    initial = (await asyncio.wait_for(anext(states), 10)).desired_state
    assert list(initial.endpoints) == []

    await client.deployments.Deploy(
        deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", alias="champion"), metadata=DEPLOYER
    )
    deployed = (await asyncio.wait_for(anext(states), 10)).desired_state
    assert deployed.revision > initial.revision
    variant = deployed.endpoints[0].variants[0]
    assert (deployed.endpoints[0].endpoint, variant.model.version) == ("web", first.version)
    assert variant.artifact_sha256 == first.artifact_sha256 and "INPUT__0" in variant.config_pbtxt

    await client.registry.SetAlias(
        registry_pb2.SetAliasRequest(model_name="mlp", alias="champion", version=second.version), metadata=DEPLOYER
    )
    moved = (await asyncio.wait_for(anext(states), 10)).desired_state
    assert moved.endpoints[0].variants[0].model.version == second.version

    status = deployments_pb2.ReplicaStatus(
        applied_revision=moved.revision,
        endpoints=[deployments_pb2.EndpointStatus(endpoint="web", state=deployments_pb2.EndpointStatus.READY)],
    )
    outgoing.put_nowait(deployments_pb2.DataPlaneMessage(status=status))
    for _ in range(50):
        replicas = (
            await client.deployments.ListReplicas(deployments_pb2.ListReplicasRequest(), metadata=VIEWER)
        ).replicas
        if replicas and replicas[0].status.applied_revision == moved.revision:
            break
        await asyncio.sleep(0.1)
    assert [(replica.replica_id, replica.status.applied_revision) for replica in replicas] == [("r1", moved.revision)]
    stream.cancel()
    for _ in range(50):
        if not (await client.deployments.ListReplicas(deployments_pb2.ListReplicasRequest(), metadata=VIEWER)).replicas:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the replica stayed listed after its stream ended")


async def test_an_upload_cut_off_midway_leaves_no_ready_version(control) -> None:
    _, client = control
    await client.registry.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER
    )
    header = registry_pb2.CreateModelVersionRequest.Header(
        model_name="mlp",
        config_pbtxt=CONFIG,
        artifact_filename="model.pt",
        artifact_sha256=hashlib.sha256(ARTIFACT).hexdigest(),
        artifact_size=len(ARTIFACT),
    )
    sent_half = asyncio.Event()

    async def half() -> AsyncIterator[registry_pb2.CreateModelVersionRequest]:
        yield registry_pb2.CreateModelVersionRequest(header=header)
        yield registry_pb2.CreateModelVersionRequest(chunk=ARTIFACT[: len(ARTIFACT) // 2])
        sent_half.set()
        await asyncio.sleep(3600)

    call = client.registry.CreateModelVersion(half(), metadata=DEPLOYER)
    await asyncio.wait_for(sent_half.wait(), 10)
    await asyncio.sleep(0.3)
    call.cancel()
    for _ in range(50):
        versions = (
            await client.registry.SearchModelVersions(
                registry_pb2.SearchModelVersionsRequest(model_name="mlp"), metadata=VIEWER
            )
        ).versions
        if versions and versions[0].state == registry_pb2.ModelVersion.FAILED:
            break
        await asyncio.sleep(0.1)
    assert [(v.version, v.state) for v in versions] == [(1, registry_pb2.ModelVersion.FAILED)]


async def test_the_control_plane_exports_upload_and_replica_metrics(store_url: str, tmp_path: Path) -> None:
    server = ControlPlaneServer(
        ControlSettings(state_dir=tmp_path / "state", database_url=store_url, port=0, metrics_port=0),
        tokens=TokenTable.from_environment_value(TOKENS),
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            client = Client(channel)
            await client.registry.CreateRegisteredModel(
                registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER
            )
            await client.push()
            with pytest.raises(grpc.aio.AioRpcError):
                await client.push(sha256="1" * 64)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    finally:
        await server.stop()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("weir_control_uploads_total", (("result", "ready"),))] == 1
    assert samples[("weir_control_uploads_total", (("result", "failed"),))] == 1
    assert samples[("weir_control_replicas_attached", ())] == 0


async def test_a_blue_green_switch_is_refused_until_green_is_ready_everywhere(control) -> None:
    _, client = control
    rollouts = rollouts_pb2_grpc.RolloutsStub(client.channel)
    await client.registry.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER
    )
    await client.push()
    await client.push()
    await client.deployments.Deploy(
        deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", version=1), metadata=DEPLOYER
    )
    started = await rollouts.StartBlueGreen(
        rollouts_pb2.StartBlueGreenRequest(endpoint="web", model_name="mlp", version=2), metadata=DEPLOYER
    )
    assert started.canary_variant == "green" and not started.green_ready
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # no data plane has reported green READY
        await rollouts.SwitchBlueGreen(rollouts_pb2.RolloutAction(endpoint="web"), metadata=DEPLOYER)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not READY on every data plane" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await rollouts.StartRollout(
            rollouts_pb2.StartRolloutRequest(endpoint="web", model_name="mlp", version=2), metadata=DEPLOYER
        )
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rolled_back = await rollouts.AbortRollout(rollouts_pb2.RolloutAction(endpoint="web"), metadata=DEPLOYER)
    assert rolled_back.state == rollouts_pb2.Rollout.ROLLED_BACK
    deployment = await client.deployments.GetDeployment(
        deployments_pb2.GetDeploymentRequest(endpoint="web"), metadata=VIEWER
    )
    assert [(variant.name, variant.weight) for variant in deployment.variants] == [("primary", 100)]


async def test_a_canary_rollout_can_be_paused_resumed_and_aborted(control) -> None:
    _, client = control
    rollouts = rollouts_pb2_grpc.RolloutsStub(client.channel)
    await client.registry.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER
    )
    await client.push()
    await client.push()
    await client.deployments.Deploy(
        deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", version=1), metadata=DEPLOYER
    )
    with pytest.raises(grpc.aio.AioRpcError) as bad_steps:
        await rollouts.StartRollout(
            rollouts_pb2.StartRolloutRequest(endpoint="web", model_name="mlp", version=2, steps=[50, 20]),
            metadata=DEPLOYER,
        )
    assert bad_steps.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    started = await rollouts.StartRollout(
        rollouts_pb2.StartRolloutRequest(endpoint="web", model_name="mlp", version=2, steps=[10, 100]),
        metadata=DEPLOYER,
    )
    assert started.state == rollouts_pb2.Rollout.RUNNING and started.strategy == "canary"
    deployment = await client.deployments.GetDeployment(
        deployments_pb2.GetDeploymentRequest(endpoint="web"), metadata=VIEWER
    )
    assert [(v.name, v.weight) for v in deployment.variants] == [("primary", 90), ("canary", 10)]

    paused = await rollouts.PauseRollout(rollouts_pb2.RolloutAction(endpoint="web"), metadata=DEPLOYER)
    assert paused.state == rollouts_pb2.Rollout.PAUSED and "paused by ci" in paused.reason
    resumed = await rollouts.ResumeRollout(rollouts_pb2.RolloutAction(endpoint="web"), metadata=DEPLOYER)
    assert resumed.state == rollouts_pb2.Rollout.RUNNING
    aborted = await rollouts.AbortRollout(rollouts_pb2.RolloutAction(endpoint="web"), metadata=DEPLOYER)
    assert aborted.state == rollouts_pb2.Rollout.ROLLED_BACK
    deployment = await client.deployments.GetDeployment(
        deployments_pb2.GetDeploymentRequest(endpoint="web"), metadata=VIEWER
    )
    assert [(v.name, v.weight) for v in deployment.variants] == [("primary", 100)]
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await rollouts.ResumeRollout(rollouts_pb2.RolloutAction(endpoint="web"), metadata=DEPLOYER)
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
