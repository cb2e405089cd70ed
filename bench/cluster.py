"""Shared pieces of the multi-replica benches (propagation.py, failover.py): a fresh PostgreSQL
database, `weir control` replicas and `weir serve --control-plane` data planes as subprocesses on
loopback (ports read from their own "started" JSON log lines), tokens, the small TorchScript models
they serve, and inference helpers. Everything is stopped by the ``Cluster`` context manager.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import LOOPBACK, weir_command

TOKENS = "bench:admin:t-admin,data-plane:replica:t-data-plane"
ADMIN_TOKEN = "t-admin"
DATA_PLANE_TOKEN = "t-data-plane"
POSTGRES_URL = os.environ.get("WEIR_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# a model that multiplies its [N, 3] FP32 input by a factor; the factor says which version answered
SCALE_CONFIG = """
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


@dataclass
class Process:
    """A `weir` subprocess whose stderr (JSON log lines) is kept by a reader thread."""

    name: str
    process: subprocess.Popen[str]
    command: list[str]
    port: int = 0
    lines: list[str] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # time.monotonic() when each line was read

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def records(self, message: str) -> list[tuple[float, dict[str, Any]]]:
        """(monotonic time read, record) of every JSON log line whose message is ``message``."""
        found = []
        for stamp, line in zip(list(self.stamps), list(self.lines), strict=False):
            if f'"{message}"' not in line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("msg", record.get("message")) == message:
                found.append((stamp, record))
        return found

    def kill(self) -> float:
        """SIGKILL; returns the monotonic time it was sent."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        return sent

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


def start_process(name: str, command: list[str], env: dict[str, str], started: str, port_key: str) -> Process:
    """Start ``command``; return once it logged ``started`` (its port in field ``port_key``)."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env},
    )  # fmt: skip
    running = Process(name, process, command)
    ready = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            running.stamps.append(time.monotonic())
            running.lines.append(line.rstrip("\n"))
            if not ready.is_set() and f'"{started}"' in line:
                running.port = int(json.loads(line)[port_key])
                ready.set()

    threading.Thread(target=pump, name=f"{name}-stderr", daemon=True).start()
    deadline = time.monotonic() + 120
    while not ready.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            tail = "\n".join(running.lines[-30:])
            raise RuntimeError(f"{name} did not start:\n{shlex.join(command)}\n{tail}")
    return running


@contextmanager
def postgres_database(server_url: str = POSTGRES_URL) -> Iterator[str]:
    """A database of its own on ``server_url``'s server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"weir_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{server_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Cluster:
    """Control-plane replicas on one database and one state directory, and data planes."""

    def __init__(self, database_url: str, root: Path) -> None:
        self.database_url = database_url
        self.root = root
        self.state_dir = root / "control"  # shared by every replica, as the volume in docker/
        self.controls: dict[str, Process] = {}
        self.data_planes: dict[str, Process] = {}

    def start_control(self, name: str, *extra: str, port: int = 0) -> Process:
        """``port`` 0 picks a free one; a restarted replica passes its old one (data planes know it)."""
        command = [
            *weir_command(), "control", "--state-dir", str(self.state_dir), "--database-url", self.database_url,
            "--port", str(port), "--replica-id", name, "--log-format", "json", *extra,
        ]  # fmt: skip
        self.controls[name] = start_process(name, command, {"WEIR_TOKENS": TOKENS}, "control plane started", "port")
        return self.controls[name]

    def start_data_plane(self, name: str, control_planes: list[str], *extra: str) -> Process:
        command = [
            *weir_command(), "serve", "--model-repository", str(self.root / name), "--listen-address", LOOPBACK,
            "--grpc-port", "0", "--metrics-port", "-1", "--model-control-mode", "explicit",
            "--control-plane", ",".join(control_planes), "--replica-id", name, "--heartbeat-seconds", "0.5",
            "--log-format", "json", *extra,
        ]  # fmt: skip
        env = {"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": DATA_PLANE_TOKEN}
        self.data_planes[name] = start_process(name, command, env, "server started", "grpc_port")
        return self.data_planes[name]

    def stop(self) -> dict[str, int]:
        """SIGTERM everything still running (data planes first); their exit statuses."""
        statuses = {}
        for name, running in [*self.data_planes.items(), *self.controls.items()]:
            if running.process.poll() is None:
                statuses[name] = running.stop()
        return statuses


@contextmanager
def cluster(postgres_url: str = POSTGRES_URL) -> Iterator[Cluster]:
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weir-bench-")))
        running = Cluster(stack.enter_context(postgres_database(postgres_url)), root)
        stack.callback(running.stop)
        yield running


def cli(address: str, *args: str, timeout: float = 600) -> Any:
    """`weir ARGS --json` against ``address`` with the admin token; its JSON answer."""
    command = [*weir_command(), *args, "--control-plane", address, "--token", ADMIN_TOKEN, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stdout}{result.stderr}")
    return json.loads(result.stdout)


def save_scale_model(path: Path, factor: float, ballast_megabytes: int = 0) -> Path:
    """A TorchScript model answering ``x * factor``; ``ballast_megabytes`` of float32 make it big
    (filled with the factor, so two versions never share an artifact)."""
    import torch

    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factor = factor
            self.register_buffer("ballast", torch.full((ballast_megabytes * 262144,), factor))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Scale()), str(path))
    return path


def push_scale(address: str, root: Path, model: str, factor: float, ballast_megabytes: int = 0) -> int:
    """Push a new version of ``model`` multiplying by ``factor``; its version number."""
    config = root / "scale-config.pbtxt"
    config.write_text(SCALE_CONFIG)
    artifact = save_scale_model(root / "artifacts" / f"{model}-{factor:g}" / "model.pt", factor, ballast_megabytes)
    try:
        return int(cli(address, "models", "push", model, str(artifact), "--config", str(config))["version"])
    finally:
        artifact.unlink()  # a 200 MB file is not kept twice


def answer(client: Any, model: str, key: str = "", timeout: float = 10) -> tuple[str, float]:
    """(the variant that answered, the factor its output shows) for one request to ``model``."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), np.float32))
    headers = {"x-user": key} if key else None
    result = client.infer(model, [tensor], headers=headers, client_timeout=timeout)
    variant = result.get_response().parameters["weir_variant"].string_param
    return variant, float(result.as_numpy("OUTPUT__0")[0][0])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception as error:  # not there yet
            last = error
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what} (last error: {last!r})")


def deployments_stub(address: str) -> tuple[Any, Any, Any]:
    """(channel, Deployments stub, admin metadata) for ``address``."""
    import grpc

    from weir_proto.auth import client_metadata
    from weir_proto.control.v1 import deployments_pb2_grpc

    channel = grpc.insecure_channel(address)
    return channel, deployments_pb2_grpc.DeploymentsStub(channel), client_metadata(ADMIN_TOKEN)
