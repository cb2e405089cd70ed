"""Propagation from the revision, not from the caller: two control-plane replicas (in-process, real
gRPC on port 0) on one database, SQLite file and PostgreSQL. A change through either replica, or
straight through the store as a training job's registration makes it, reaches a data plane attached
to either replica; concurrent deploys through both keep every revision, in order, with no error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, make_url, text

from weir_control.attach import DesiredStateHub
from weir_control.auditing import UNREACHABLE_DATABASE
from weir_control.model_config import signature_from_config
from weir_control.server import ControlPlaneServer, ControlSettings
from weir_control.store import Store
from weir_proto.auth import TokenTable, client_metadata
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc, registry_pb2, registry_pb2_grpc

CONFIG = 'max_batch_size: 8\ninput [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
CONFIG += 'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
TOKENS = "ci:deployer:t-deployer,node:replica:t-node"
DEPLOYER, REPLICA = client_metadata("t-deployer"), client_metadata("t-node")
WAIT = 30.0  # a generous bound on "never arrives", not a latency assertion (bench/propagation.py measures)


class Replica:
    """One control plane and a client channel to it."""

    def __init__(self, server: ControlPlaneServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.registry = registry_pb2_grpc.RegistryStub(channel)
        self.deployments = deployments_pb2_grpc.DeploymentsStub(channel)
        self.sync = deployments_pb2_grpc.DataPlaneSyncStub(channel)

    def hub(self) -> DesiredStateHub:
        assert self.server.hub is not None
        return self.server.hub

    @property
    def store(self) -> Store:
        assert self.server.store is not None
        return self.server.store


@pytest.fixture
async def replicas(store_url: str, tmp_path: Path) -> AsyncIterator[tuple[Replica, Replica]]:
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            server = ControlPlaneServer(
                ControlSettings(
                    state_dir=tmp_path / name, database_url=store_url, artifact_dir=tmp_path / "artifacts", port=0,
                    replica_id=f"replica-{name}",
                ),
                tokens=TokenTable.from_environment_value(TOKENS),
            )  # fmt: skip
            await server.start()
            started.append(Replica(server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")))
        yield started[0], started[1]
    finally:
        for replica in reversed(started):
            await replica.channel.close()
            await replica.server.stop()


class DataPlane:
    """An attach stream as a data plane holds it: every desired state it is sent, in order."""

    def __init__(self, replica: Replica, replica_id: str) -> None:
        self._outgoing: asyncio.Queue[deployments_pb2.DataPlaneMessage] = asyncio.Queue()
        self._outgoing.put_nowait(
            deployments_pb2.DataPlaneMessage(hello=deployments_pb2.Hello(replica_id=replica_id, address="127.0.0.1:1"))
        )
        self.call = replica.sync.Attach(self._messages(), metadata=REPLICA)
        self._states = self.call.__aiter__()
        self.received: list[deployments_pb2.DesiredState] = []

    async def _messages(self) -> AsyncIterator[deployments_pb2.DataPlaneMessage]:
        while True:
            yield await self._outgoing.get()

    async def next_state(self) -> deployments_pb2.DesiredState:
        state = (await asyncio.wait_for(anext(self._states), WAIT)).desired_state
        self.received.append(state)
        return state

    async def until(self, wanted: Callable[[deployments_pb2.DesiredState], bool]) -> deployments_pb2.DesiredState:
        """The first state it is sent that satisfies ``wanted`` (the last one sent already counts)."""
        if self.received and wanted(self.received[-1]):
            return self.received[-1]
        while not wanted(state := await self.next_state()):
            pass
        return state

    def close(self) -> None:
        self.call.cancel()


def ready_version(store: Store, model: str = "mlp") -> int:
    """A READY version straight in the store (the desired state names its blob; no bytes needed)."""
    header = registry_pb2.CreateModelVersionRequest.Header(
        model_name=model, config_pbtxt=CONFIG, artifact_filename="model.pt", artifact_sha256="ab" * 32
    )
    version = store.begin_version(header, signature_from_config(CONFIG))
    store.complete_version(model, version, "ab" * 32, 10)
    return version


def serving(state: deployments_pb2.DesiredState, endpoint: str = "web") -> dict[str, int]:
    """variant -> version the endpoint serves in ``state``."""
    for item in state.endpoints:
        if item.endpoint == endpoint:
            return {variant.name: variant.model.version for variant in item.variants}
    return {}


def flags(state: deployments_pb2.DesiredState, endpoint: str = "web") -> dict[str, str]:
    return next((dict(item.flags) for item in state.endpoints if item.endpoint == endpoint), {})


async def test_a_change_through_one_replica_reaches_a_data_plane_attached_to_the_other(replicas) -> None:
    a, b = replicas
    await a.registry.CreateRegisteredModel(registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER)
    first, second = [await asyncio.to_thread(ready_version, a.store) for _ in range(2)]
    await a.registry.SetAlias(
        registry_pb2.SetAliasRequest(model_name="mlp", alias="champion", version=first), metadata=DEPLOYER
    )
    plane = DataPlane(b, "dp-on-b")
    try:
        await plane.next_state()
        await a.deployments.Deploy(
            deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", alias="champion"), metadata=DEPLOYER
        )
        deployed = await plane.until(lambda state: serving(state) == {"primary": first})

        await a.deployments.SetFlag(
            deployments_pb2.SetFlagRequest(endpoint="web", name="kill_switch", value="primary"), metadata=DEPLOYER
        )
        flagged = await plane.until(lambda state: flags(state) == {"kill_switch": "primary"})
        assert flagged.revision > deployed.revision

        await a.registry.SetAlias(
            registry_pb2.SetAliasRequest(model_name="mlp", alias="champion", version=second), metadata=DEPLOYER
        )
        moved = await plane.until(lambda state: serving(state) == {"primary": second})
        assert moved.revision > flagged.revision
        revisions = [state.revision for state in plane.received]
        assert revisions == sorted(set(revisions))  # never a stale state, never one twice
    finally:
        plane.close()


async def test_an_alias_moved_straight_in_the_store_redeploys_the_endpoints_that_follow_it(replicas) -> None:
    """As a training job's registration does (``training/registration.py``): no RPC, no hub call."""
    a, b = replicas
    await a.registry.CreateRegisteredModel(registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER)
    first, second = [await asyncio.to_thread(ready_version, a.store) for _ in range(2)]
    await asyncio.to_thread(a.store.set_alias, "mlp", "champion", first)
    await b.deployments.Deploy(
        deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", alias="champion"), metadata=DEPLOYER
    )
    planes = [DataPlane(a, "dp-on-a"), DataPlane(b, "dp-on-b")]
    try:
        for plane in planes:
            await plane.until(lambda state: serving(state) == {"primary": first})
        await asyncio.to_thread(a.store.set_alias, "mlp", "champion", second)
        for plane in planes:
            await plane.until(lambda state: serving(state) == {"primary": second})
    finally:
        for plane in planes:
            plane.close()


async def test_concurrent_deploys_through_both_replicas_keep_every_revision_in_order(replicas) -> None:
    a, b = replicas
    await a.registry.CreateRegisteredModel(registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER)
    versions = [await asyncio.to_thread(ready_version, a.store) for _ in range(2)]
    plane = DataPlane(a, "dp-on-a")
    try:
        await plane.next_state()

        async def deploy(index: int) -> tuple[int, int]:
            through = (a, b)[index % 2]
            version = versions[index % 2]
            deployment = await through.deployments.Deploy(
                deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", version=version), metadata=DEPLOYER
            )
            return deployment.revision, deployment.resolved[0].version

        results = await asyncio.gather(*(deploy(index) for index in range(20)), return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        assert errors == []  # no UNKNOWN/INTERNAL (nor any other code): conflicts are retried in the store
        revisions = sorted(revision for revision, _ in results)  # type: ignore[misc]
        assert len(set(revisions)) == 20  # each deploy its own revision: none lost, none shared
        last = max(results, key=lambda result: result[0])  # type: ignore[arg-type, return-value]
        final = await plane.until(lambda state: state.revision >= revisions[-1])
        assert final.revision == revisions[-1] and serving(final) == {"primary": last[1]}  # type: ignore[index]
        seen = [state.revision for state in plane.received]
        assert seen == sorted(set(seen))  # what the data plane was sent only ever moved forward
    finally:
        plane.close()


async def test_the_hub_keeps_the_last_state_while_the_database_is_down_and_follows_again_after(
    replicas, store_url: str
) -> None:
    if not store_url.startswith("postgresql"):
        pytest.skip("takes a PostgreSQL database away from its clients")
    a, b = replicas
    await a.registry.CreateRegisteredModel(registry_pb2.CreateRegisteredModelRequest(name="mlp"), metadata=DEPLOYER)
    version = await asyncio.to_thread(ready_version, a.store)
    await a.deployments.Deploy(
        deployments_pb2.DeployRequest(endpoint="web", model_name="mlp", version=version), metadata=DEPLOYER
    )
    plane = DataPlane(b, "dp-on-b")
    try:
        before = await plane.until(lambda state: serving(state) == {"primary": version})
        url = make_url(store_url)
        admin = create_engine(url.set(database="test"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:  # every client of the database loses its connections
                connection.execute(text(f'ALTER DATABASE "{url.database}" WITH ALLOW_CONNECTIONS false'))
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": url.database},
                )
            await asyncio.sleep(1.0)  # several polls fail meanwhile (logged once); the stream stays up
            assert (await b.hub().current()).revision == before.revision  # the last state, still served
            for call in (  # clients hear a status they retry, never INTERNAL/UNKNOWN or the driver's message
                b.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(endpoint="web"), metadata=DEPLOYER),
                b.deployments.SetFlag(
                    deployments_pb2.SetFlagRequest(endpoint="web", name="colour", value="red"), metadata=DEPLOYER
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert refused.value.details() == UNREACHABLE_DATABASE
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'ALTER DATABASE "{url.database}" WITH ALLOW_CONNECTIONS true'))
            admin.dispose()
        await a.deployments.SetFlag(
            deployments_pb2.SetFlagRequest(endpoint="web", name="colour", value="blue"), metadata=DEPLOYER
        )
        after = await plane.until(lambda state: flags(state) == {"colour": "blue"})
        assert after.revision > before.revision
    finally:
        plane.close()
