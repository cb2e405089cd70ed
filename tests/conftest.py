"""Shared fixtures: the demo repository, an in-process server on port 0, and `weir serve` as a
real subprocess on port 0 (its chosen ports are read from its own "server started" log line)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import torch
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
sys.path.insert(0, str(ROOT / "examples"))

import build_demo_repository  # noqa: E402

from tests.asyncio_gate import GATE  # noqa: E402
from weir.server import WeirServer  # noqa: E402
from weir.settings import ControlMode, ServerSettings  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    GATE.install()


@pytest.fixture(autouse=True)
def no_lost_asyncio_work() -> Iterator[None]:
    """Fail the test if asyncio reported lost work during it (see tests/asyncio_gate.py)."""
    GATE.found()  # what earlier tests left behind was reported to them
    yield
    found = GATE.found()
    if found:
        pytest.fail("asyncio reported lost work:\n" + "\n".join(found[:20]), pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    found = GATE.found()  # module- and session-scoped processes stop after the last test's check
    if found:
        print("\nasyncio reported lost work after the last test:\n" + "\n".join(found[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def demo_repository_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session; tests that change a repository copy it first (``demo_repository``)."""
    out = tmp_path_factory.mktemp("demo-repository-template")
    build_demo_repository.build(out)
    return out


@pytest.fixture
def demo_repository(demo_repository_template: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the demo repository."""
    target = tmp_path / "repository"
    shutil.copytree(demo_repository_template, target)
    return target


@pytest_asyncio.fixture
async def inprocess_server(demo_repository: Path) -> AsyncIterator[WeirServer]:
    """The demo repository served in this process on free ports (load-all mode)."""
    server = WeirServer(
        ServerSettings(model_repository=demo_repository, listen_address="127.0.0.1", grpc_port=0, metrics_port=0)
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_seconds=1)


def inprocess_settings(repository: Path, **overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "model_repository": repository,
        "listen_address": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
    }
    values.update(overrides)
    return ServerSettings(**values)  # type: ignore[arg-type]


def write_torchscript_model(repository: Path, name: str, module: torch.nn.Module, config: str) -> None:
    """Add ``name`` version 1 to ``repository``: ``module`` scripted to TorchScript, and its config."""
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(version_dir / "model.pt"))
    (repository / name / "config.pbtxt").write_text(config)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis_server(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2, socket_timeout=0.2)
    deadline = time.monotonic() + 5.0
    try:
        while True:  # readiness probe: the server answers PING
            try:
                if client.ping():
                    return process
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.01)
    finally:
        client.close()


def stop_redis_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=5)


@dataclass
class WeirProcess:
    """A running `weir serve` subprocess."""

    process: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int | None
    log_lines: list[str] = field(default_factory=list)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_records(self) -> list[dict[str, object]]:
        records = []
        for line in list(self.log_lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def terminate_and_wait(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_weir(
    repository: Path, *extra_args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> WeirProcess:
    """Start `weir serve` on free ports and wait for its "server started" line."""
    command = [
        sys.executable, "-m", "weir.cli", "serve",
        "--model-repository", str(repository),
        "--listen-address", "127.0.0.1",
        "--grpc-port", "0", "--metrics-port", "0",
        *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    lines: list[str] = []
    started = threading.Event()
    ports: dict[str, int | None] = {}

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if not started.is_set() and '"server started"' in line:
                record = json.loads(line)
                ports["grpc"] = record["grpc_port"]
                ports["metrics"] = record.get("metrics_port")
                started.set()

    threading.Thread(target=pump, daemon=True).start()
    GATE.watch_lines("weir serve", lines)
    deadline = time.monotonic() + timeout
    while not started.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("weir serve did not start:\n" + "\n".join(lines[-40:]))
    grpc_port = ports["grpc"]
    assert grpc_port is not None
    return WeirProcess(process, grpc_port, ports.get("metrics"), lines)


@contextlib.contextmanager
def serving(repository: Path, *extra_args: str) -> Iterator[WeirProcess]:
    """`weir serve` for the ``with`` block (module-scoped fixtures share one this way); stopped with
    SIGTERM at the end if it is still running."""
    running = start_weir(repository, *extra_args)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.terminate_and_wait()


@pytest.fixture
def weir_process(demo_repository: Path) -> Iterator[WeirProcess]:
    """`weir serve` over a copy of the demo repository, in explicit control mode with every model
    loaded at start (so load/unload RPCs work too)."""
    running = start_weir(demo_repository, "--model-control-mode", ControlMode.EXPLICIT.value, "--load-model", "*")
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(timeout=10)


# --- stores: SQLite and the local PostgreSQL -----------------------------------------------------

# PostgreSQL tests use a database of their own, created for the test and dropped after it, on the
# server at WEIR_TEST_POSTGRES (`.ci/run` keeps the default one running). Nothing is skipped when it
# is down: the store must work on PostgreSQL, so its absence fails the run.
POSTGRES_URL = os.environ.get("WEIR_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_database() -> Iterator[str]:
    name = f"weir_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty store, on each backend in turn."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
    else:
        yield from _postgres_database()
