"""A data plane given two control planes fails over between them with no failed inference request.

Two `weir control` processes on one PostgreSQL database and one artifact directory; a `weir serve
--control-plane A,B` under steady inference load. The control plane it is attached to is killed
with SIGKILL (the stream breaks) or stopped with SIGSTOP (the connection stays open; health checks
go unanswered): the data plane attaches to the other, keeps answering every request meanwhile, and a
deploy made through the survivor reaches it (the artifact downloaded from the survivor).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import WeirProcess, _postgres_database, free_port, start_weir
from tests.e2e.test_control_plane import (
    CONFIG,
    REPLICA_TOKEN,
    TOKENS,
    ControlProcess,
    cli,
    scripted,
    serves_factor,
    start_control,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

X = np.array([[1.0, 2.0, 3.0]], np.float32)


@dataclass
class Load:
    """Requests sent one after another from a thread until stopped; every outcome counted."""

    url: str
    answers: list[float] = field(default_factory=list)  # the factor each answer shows
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while not self.stop.is_set():
                tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
                tensor.set_data_from_numpy(X)
                try:
                    output = client.infer("scale", [tensor], client_timeout=30).as_numpy("OUTPUT__0")
                    self.answers.append(float(output[0, 0]))
                except Exception as error:  # every failure is the test's business
                    self.failures.append(repr(error))
        finally:
            client.close()


def attached_to(data_plane: WeirProcess) -> list[str]:
    """The control plane of each attach so far, in order."""
    return [
        str(record["control_plane"])
        for record in data_plane.log_records()
        if record.get("msg") == "attached to the control plane"
    ]


@pytest.fixture
def database_url() -> Iterator[str]:
    """A PostgreSQL database of the test's own: the store several control planes share."""
    yield from _postgres_database()


@dataclass
class Replicas:
    controls: list[ControlProcess] = field(default_factory=list)
    data_planes: list[WeirProcess] = field(default_factory=list)

    def start_data_plane(self, repository: Path) -> WeirProcess:
        """`weir serve --control-plane A,B` (it picks one of them to attach to)."""
        data_plane = start_weir(
            repository, "--model-control-mode", "explicit",
            "--control-plane", ",".join(control.address for control in self.controls),
            "--replica-id", "data-plane", "--heartbeat-seconds", "0.5",
            env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},
        )  # fmt: skip
        self.data_planes.append(data_plane)
        return data_plane


@pytest.fixture
def replicas(database_url: str, tmp_path: Path) -> Iterator[Replicas]:
    """Two control planes on one database and one artifact directory (data planes: started by the test)."""
    running = Replicas()
    try:
        for name in ("a", "b"):  # one after the other: the second finds the schema migrated
            extra = ("--artifact-dir", str(tmp_path / "shared-artifacts"), "--replica-id", f"control-{name}")
            running.controls.append(start_control(tmp_path / f"control-{name}", database_url, free_port(), *extra))
        yield running
    finally:
        for data_plane in running.data_planes:
            data_plane.terminate_and_wait()
        for control in running.controls:
            if control.process.poll() is None:
                control.process.send_signal(signal.SIGCONT)  # a stopped one ends too
                control.process.terminate()
                control.process.wait(timeout=30)


@pytest.mark.parametrize(
    "stop",
    [signal.SIGKILL, signal.SIGSTOP],  # a dead process (the stream breaks), a hung one (health checks go unanswered)
    ids=["killed", "hung"],
)
def test_a_data_plane_fails_over_to_the_surviving_control_plane_without_a_failed_request(
    replicas, tmp_path, stop
) -> None:
    controls = replicas.controls
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    # deployed before the data plane starts: whichever control plane it attaches to reads it from the
    # database (a change's propagation between control planes is another test's subject)
    cli(controls[0], "models", "push", "scale", str(scripted(tmp_path, 2.0)), "--config", str(config))
    cli(controls[0], "deploy", "scale", "scale", "1")
    data_plane = replicas.start_data_plane(tmp_path / "data-plane")
    wait_until(lambda: serves_factor(data_plane.grpc_url, 2.0), message="the data plane to serve version 1")
    wait_until(lambda: attached_to(data_plane), message="the data plane to say which control plane it follows")

    load = Load(data_plane.grpc_url)
    sender = threading.Thread(target=load.run, daemon=True)
    sender.start()
    try:
        wait_until(lambda: len(load.answers) > 50, message="load before the kill")
        followed = attached_to(data_plane)[-1]
        victim = next(control for control in controls if control.address == followed)
        survivor = next(control for control in controls if control is not victim)
        victim.process.send_signal(stop)  # no goodbye on the stream either way
        attaches = len(attached_to(data_plane))
        wait_until(lambda: len(attached_to(data_plane)) > attaches, message="the data plane to attach to the survivor")
        assert attached_to(data_plane)[-1] == survivor.address
        answered_before_the_change = len(load.answers)

        # a change through the survivor reaches it (the artifact comes from the survivor too)
        cli(survivor, "models", "push", "scale", str(scripted(tmp_path, 3.0)), "--config", str(config))
        cli(survivor, "deploy", "scale", "scale", "2")
        wait_until(lambda: load.answers[-1] == 3.0, message="the deploy through the survivor to serve")
    finally:
        load.stop.set()
        sender.join(timeout=60)
    assert load.failures == [], load.failures[:5]
    assert len(load.answers) > answered_before_the_change > 50
    assert set(load.answers) == {2.0, 3.0}
