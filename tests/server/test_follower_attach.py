"""A follower whose attach fails, again and again, leaves nothing behind: no task destroyed while
pending, no async generator closed while running (asyncio only logs those, from a garbage
collection long after the cause, so the test collects garbage and reads the ``asyncio`` logger).

Each control plane here is real gRPC on a real port: one port nobody listens on, one server that
refuses the replica's token, one that accepts the stream and then ends it at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tests.asyncio_gate import lost_work
from tests.conftest import free_port
from weir.follower import ControlPlaneFollower, FollowerSettings
from weir.metrics import Metrics
from weir.repository import ModelRepository
from weir.routing import Router
from weir_proto.control.v1 import deployments_pb2_grpc

ATTEMPTS = 4


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


class _FailedAttaches(logging.Handler):
    """Counts the follower's warnings and errors (one per failed attach); set once there were ATTEMPTS."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0
        self.enough = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.count >= ATTEMPTS:
            self.enough.set()


class _Refusing(deployments_pb2_grpc.DataPlaneSyncServicer):
    """Reads the hello, then ends the stream with ``code`` (None: a clean end)."""

    def __init__(self, code: grpc.StatusCode | None) -> None:
        self.code = code
        self.attaches = 0

    async def Attach(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.attaches += 1
        await request_iterator.__anext__()
        if self.code is not None:
            await context.abort(self.code, "refused by the test")


async def _serving(servicer: _Refusing) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    deployments_pb2_grpc.add_DataPlaneSyncServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _follower(tmp_path: Path, address: str, executor: ThreadPoolExecutor) -> ControlPlaneFollower:
    root = tmp_path / "managed"
    root.mkdir()
    repository = ModelRepository(root, executor, Metrics.create(CollectorRegistry()))
    settings = FollowerSettings(
        addresses=(address,), token="t", replica_id="r", serving_address="127.0.0.1:1", heartbeat_seconds=0.05,
        max_backoff_seconds=0.05, refused_backoff_seconds=0.05,
    )  # fmt: skip

    async def changed() -> None:
        return None

    return ControlPlaneFollower(settings, repository, Router(), root, changed)


async def _retry_and_collect(follower: ControlPlaneFollower) -> list[str]:
    """Let the follower fail ATTEMPTS attaches, stop it, and return asyncio's reports of lost work."""
    lost, failures = _Records(), _FailedAttaches()
    logging.getLogger("asyncio").addHandler(lost)
    logging.getLogger("weir.follower").addHandler(failures)
    try:
        await follower.load_last_known_good()
        task = asyncio.create_task(follower.run())
        async with asyncio.timeout(60):
            await failures.enough.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):  # let cancelled callbacks run, then find what nobody holds any more
            await asyncio.sleep(0.05)
            gc.collect()
    finally:
        logging.getLogger("asyncio").removeHandler(lost)
        logging.getLogger("weir.follower").removeHandler(failures)
    assert not follower.attached.is_set()
    return [text for text in lost.texts if lost_work(text)]


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True)


async def test_attaching_to_a_closed_port_again_and_again_loses_no_asyncio_work(tmp_path, executor) -> None:
    follower = _follower(tmp_path, f"127.0.0.1:{free_port()}", executor)
    assert await _retry_and_collect(follower) == []


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE, None])
async def test_a_control_plane_that_ends_every_attach_loses_no_asyncio_work(tmp_path, executor, code) -> None:
    servicer = _Refusing(code)
    server, port = await _serving(servicer)
    try:
        follower = _follower(tmp_path, f"127.0.0.1:{port}", executor)
        assert await _retry_and_collect(follower) == []
        assert servicer.attaches >= ATTEMPTS
    finally:
        await server.stop(None)
