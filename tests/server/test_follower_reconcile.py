"""The follower carries out plan(): a newer desired state supersedes an install still downloading,
flags apply while it downloads, and the superseded version never serves.

The control plane here is real gRPC on a real port, reduced to what a data plane calls: an attach
stream that pushes the desired states the test gives it, and artifact downloads, one of which
stalls half-way until the test lets it go on (so "still downloading" is a state, not a race).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from tests.e2e.test_control_plane import CONFIG, Scale
from weir.follower import SERVED_MARKER, ControlPlaneFollower, FollowerSettings
from weir.metrics import Metrics
from weir.repository import ModelRepository
from weir.routing import KILL_SWITCH, Router
from weir_proto.common.v1 import types_pb2
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc, registry_pb2, registry_pb2_grpc

CHUNK = 4096


@dataclass
class Artifacts:
    """Scripted models by version; a version in ``stalled`` stops after its first chunk until released."""

    blobs: dict[int, bytes] = field(default_factory=dict)
    stalled: dict[int, asyncio.Event] = field(default_factory=dict)
    started: dict[int, asyncio.Event] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)

    def add(self, tmp_path: Path, version: int, factor: float) -> None:
        path = tmp_path / f"model-{version}.pt"
        torch.jit.save(torch.jit.script(Scale(factor)), str(path))
        self.blobs[version] = path.read_bytes()
        self.started[version] = asyncio.Event()

    def variant(self, name: str, version: int, weight: int = 100) -> deployments_pb2.ResolvedVariant:
        return deployments_pb2.ResolvedVariant(
            name=name, model=types_pb2.ModelVersionRef(model_name="scale", version=version),
            artifact_sha256=hashlib.sha256(self.blobs[version]).hexdigest(), artifact_size=len(self.blobs[version]),
            artifact_filename="model.pt", config_pbtxt=CONFIG, weight=weight,
        )  # fmt: skip


class _Registry(registry_pb2_grpc.RegistryServicer):
    def __init__(self, artifacts: Artifacts) -> None:
        self.artifacts = artifacts

    async def DownloadArtifact(self, request, context):  # type: ignore[no-untyped-def]
        if request.validation:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no validation inputs")
        blob = self.artifacts.blobs[request.version]
        self.artifacts.started[request.version].set()
        try:
            for offset in range(0, len(blob), CHUNK):
                yield registry_pb2.DownloadArtifactResponse(chunk=blob[offset : offset + CHUNK])
                gate = self.artifacts.stalled.get(request.version)
                if gate is not None:
                    await gate.wait()
        except asyncio.CancelledError:
            self.artifacts.cancelled.add(request.version)
            raise


class _Sync(deployments_pb2_grpc.DataPlaneSyncServicer):
    def __init__(self) -> None:
        self.states: asyncio.Queue[deployments_pb2.DesiredState] = asyncio.Queue()

    async def Attach(self, request_iterator, context):  # type: ignore[no-untyped-def]
        await request_iterator.__anext__()  # the hello
        drain = asyncio.create_task(_drain(request_iterator))
        try:
            while True:
                yield deployments_pb2.ControlPlaneMessage(desired_state=await self.states.get())
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)


async def _drain(messages: AsyncIterator[deployments_pb2.DataPlaneMessage]) -> None:
    async for _ in messages:
        pass


class _Log(logging.Handler):
    """The follower's log records, awaitable."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    def found(self, message: str, **fields: object) -> bool:
        return any(
            record.getMessage() == message and all(getattr(record, key, None) == value for key, value in fields.items())
            for record in self.records
        )

    async def wait(self, message: str, **fields: object) -> None:
        async with asyncio.timeout(60):
            while not self.found(message, **fields):
                self.changed.clear()
                await self.changed.wait()


def state(revision: int, *variants: deployments_pb2.ResolvedVariant, **flags: str) -> deployments_pb2.DesiredState:
    endpoint = deployments_pb2.EndpointState(endpoint="scale", variants=variants, flags=flags)
    return deployments_pb2.DesiredState(revision=revision, endpoints=[endpoint])


async def _started(event: asyncio.Event) -> None:
    async with asyncio.timeout(60):
        await event.wait()


@dataclass
class Rig:
    sync: _Sync
    artifacts: Artifacts
    log: _Log
    root: Path
    router: Router
    repository: ModelRepository


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    artifacts = Artifacts()
    for version, factor in ((1, 2.0), (2, 3.0), (3, 4.0)):
        artifacts.add(tmp_path, version, factor)
    sync = _Sync()
    server = grpc.aio.server()
    deployments_pb2_grpc.add_DataPlaneSyncServicer_to_server(sync, server)
    registry_pb2_grpc.add_RegistryServicer_to_server(_Registry(artifacts), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    root = tmp_path / "managed"
    root.mkdir()
    executor = ThreadPoolExecutor(2)
    repository = ModelRepository(root, executor, Metrics.create(CollectorRegistry()))
    settings = FollowerSettings(
        addresses=(f"127.0.0.1:{port}",), token="t", replica_id="r", serving_address="127.0.0.1:1",
        heartbeat_seconds=0.5,
    )  # fmt: skip

    async def changed() -> None:
        return None

    router = Router()
    following = ControlPlaneFollower(settings, repository, router, root, changed)
    log = _Log()
    logger = logging.getLogger("weir.follower")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    await following.load_last_known_good()
    task = asyncio.create_task(following.run())
    try:
        yield Rig(sync, artifacts, log, root, router, repository)
    finally:
        for gate in artifacts.stalled.values():
            gate.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.removeHandler(log)
        logger.setLevel(level)
        await repository.aclose()
        await server.stop(None)
        executor.shutdown(wait=True)


async def test_a_newer_state_supersedes_a_download_and_flags_apply_meanwhile(rig: Rig) -> None:
    sync, artifacts, log, root, router, repository = (
        rig.sync, rig.artifacts, rig.log, rig.root, rig.router, rig.repository
    )  # fmt: skip
    sync.states.put_nowait(state(1, artifacts.variant("main", 1)))
    await log.wait("variant now serves", model="scale@main", source="scale:1")
    assert repository.resolve("scale@main", "").version == 1

    artifacts.stalled[2] = asyncio.Event()  # version 2's download stops after its first chunk
    sync.states.put_nowait(state(2, artifacts.variant("main", 2)))
    await _started(artifacts.started[2])

    sync.states.put_nowait(state(3, artifacts.variant("main", 3), **{KILL_SWITCH: "main"}))
    await log.wait("desired state routed", revision=3)
    route = router.get("scale")
    assert route is not None and route.flags == {KILL_SWITCH: "main"}  # while downloads are pending
    assert log.found("install superseded", model="scale@main", source="scale:2")

    await log.wait("variant now serves", model="scale@main", source="scale:3")
    await log.wait("desired state applied", revision=3)
    assert repository.resolve("scale@main", "").version == 3
    assert not log.found("variant now serves", model="scale@main", source="scale:2")  # it never served
    assert sorted(path.name for path in (root / "scale@main").iterdir() if path.is_dir()) == ["3"]
    assert (root / "scale@main" / SERVED_MARKER).read_text().split()[:2] == ["scale", "3"]
    assert 2 in artifacts.cancelled  # the superseded download stopped at the control plane too


async def test_an_undeploy_during_a_download_cancels_it_and_leaves_no_directory(rig: Rig) -> None:
    sync, artifacts, log, root = rig.sync, rig.artifacts, rig.log, rig.root
    artifacts.stalled[1] = asyncio.Event()
    sync.states.put_nowait(state(1, artifacts.variant("main", 1)))
    await _started(artifacts.started[1])
    sync.states.put_nowait(deployments_pb2.DesiredState(revision=2))
    await log.wait("desired state applied", revision=2)
    assert rig.router.get("scale") is None
    await log.wait("install stopped", model="scale@main", source="scale:1")
    assert not (root / "scale@main").exists()  # the cancelled install cleaned up as it stopped
    assert not log.found("variant now serves", model="scale@main", source="scale:1")


async def test_a_restart_without_a_control_plane_serves_the_last_known_good_copy(rig: Rig, tmp_path: Path) -> None:
    rig.sync.states.put_nowait(state(1, rig.artifacts.variant("main", 1), **{KILL_SWITCH: "main"}))
    await rig.log.wait("desired state applied", revision=1)
    rig.artifacts.stalled[2] = asyncio.Event()  # and an install that never finishes before the "restart"
    rig.sync.states.put_nowait(
        state(2, rig.artifacts.variant("main", 1), rig.artifacts.variant("other", 2), **{KILL_SWITCH: "main"})
    )
    await _started(rig.artifacts.started[2])

    executor = ThreadPoolExecutor(1)
    repository = ModelRepository(rig.root, executor, Metrics.create(CollectorRegistry()))
    router = Router()
    settings = FollowerSettings(addresses=("127.0.0.1:1",), token=None, replica_id="r2", serving_address="")

    async def changed() -> None:
        return None

    try:
        await ControlPlaneFollower(settings, repository, router, rig.root, changed).load_last_known_good()
        route = router.get("scale")
        assert route is not None and [variant.model for variant in route.variants] == ["scale@main"]
        assert route.flags == {KILL_SWITCH: "main"}
        assert repository.resolve("scale@main", "").version == 1
        assert [served.name for served in repository.served_models()] == ["scale@main"]  # not the half install
    finally:
        await repository.aclose()
        executor.shutdown(wait=True)


async def test_installs_run_at_most_two_at_a_time(rig: Rig) -> None:
    artifacts = rig.artifacts
    for version in (1, 2, 3):
        artifacts.stalled[version] = asyncio.Event()
    rig.sync.states.put_nowait(
        state(1, artifacts.variant("a", 1, 34), artifacts.variant("b", 2, 33), artifacts.variant("c", 3, 33))
    )
    await rig.log.wait("desired state routed", revision=1)
    waits = [asyncio.create_task(artifacts.started[version].wait()) for version in (1, 2, 3)]
    try:
        async with asyncio.timeout(60):
            while sum(wait.done() for wait in waits) < 2:
                await asyncio.wait([wait for wait in waits if not wait.done()], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    await asyncio.sleep(0.3)  # room for a third to start, were the limit not kept
    running = [version for version in (1, 2, 3) if artifacts.started[version].is_set()]
    assert len(running) == 2
    artifacts.stalled[running[0]].set()  # one finishes: the third starts
    waiting = next(version for version in (1, 2, 3) if version not in running)
    await _started(artifacts.started[waiting])
    for version in (1, 2, 3):
        artifacts.stalled[version].set()
    await rig.log.wait("desired state applied", revision=1)
    route = rig.router.get("scale")
    assert route is not None and {variant.name for variant in route.variants} == {"a", "b", "c"}


async def test_a_download_cut_by_its_control_plane_going_away_finishes_from_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts = Artifacts()
    artifacts.add(tmp_path, 1, 2.0)
    artifacts.stalled[1] = asyncio.Event()  # at the first control plane, version 1 never downloads whole
    others = Artifacts(blobs=artifacts.blobs, started={1: asyncio.Event()})
    servers, syncs, addresses = [], [], []
    for served in (artifacts, others):
        sync, server = _Sync(), grpc.aio.server()
        deployments_pb2_grpc.add_DataPlaneSyncServicer_to_server(sync, server)
        registry_pb2_grpc.add_RegistryServicer_to_server(_Registry(served), server)
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        servers.append(server)
        syncs.append(sync)
        sync.states.put_nowait(state(1, artifacts.variant("main", 1)))
    monkeypatch.setattr("weir.follower.random.randrange", lambda count: 0)  # the first address first
    root = tmp_path / "managed"
    root.mkdir()
    executor = ThreadPoolExecutor(2)
    repository = ModelRepository(root, executor, Metrics.create(CollectorRegistry()))
    settings = FollowerSettings(tuple(addresses), token="t", replica_id="r", serving_address="", heartbeat_seconds=0.5)

    async def changed() -> None:
        return None

    following = ControlPlaneFollower(settings, repository, Router(), root, changed)
    log = _Log()
    logger = logging.getLogger("weir.follower")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    task = asyncio.create_task(following.run())
    try:
        await _started(artifacts.started[1])
        await servers[0].stop(None)  # the first control plane goes away mid-download
        await log.wait("variant now serves", model="scale@main", source="scale:1")
        assert others.started[1].is_set()  # the bytes came from the second one
        assert log.found("attached to the control plane", control_plane=addresses[1])
        assert not log.found("desired version failed to load; the previous one keeps serving")
        assert repository.resolve("scale@main", "").version == 1
    finally:
        artifacts.stalled[1].set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.removeHandler(log)
        logger.setLevel(level)
        await repository.aclose()
        for server in servers:
            await server.stop(None)
        executor.shutdown(wait=True)


async def test_an_older_state_waits_for_a_newer_one_and_is_applied_only_if_none_comes(rig: Rig) -> None:
    # After a failover the new control-plane replica may be a fraction of a second behind: its
    # state must not undo a change the data plane already routes.
    sync, artifacts, log = rig.sync, rig.artifacts, rig.log
    sync.states.put_nowait(state(5, artifacts.variant("main", 1), mode="five"))
    await log.wait("variant now serves", model="scale@main", source="scale:1")
    sync.states.put_nowait(state(4, artifacts.variant("main", 1), mode="four"))
    await log.wait("desired state older than the one routed: held", revision=4)
    sync.states.put_nowait(state(6, artifacts.variant("main", 1), mode="six"))
    await log.wait("desired state routed", revision=6)
    assert not log.found("desired state routed", revision=4)
    assert flags(rig.router)["mode"] == "six"
    # Nothing newer comes (a store that was reset): after the grace the older state is applied.
    sync.states.put_nowait(state(3, artifacts.variant("main", 1), mode="three"))
    await log.wait("older desired state applied: no newer one came", revision=3)
    await log.wait("desired state routed", revision=3)
    assert flags(rig.router)["mode"] == "three"


def flags(router: Router) -> dict[str, str]:
    route = router.get("scale")
    assert route is not None
    return dict(route.flags)
