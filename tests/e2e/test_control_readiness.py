"""Readiness follows the database: `weir control` on PostgreSQL reached through a TCP proxy that the
test cuts (connections refused and reset: the database is down) or holds (connections accepted and
never answered: a network partition). The control plane's gRPC health turns NOT_SERVING, for the
whole server and each service, and SERVING again once the database is back; the process stays up.
A data plane given two replicas leaves the one that lost its database for the other.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import make_url

from tests.conftest import free_port, start_weir
from tests.e2e import test_control_plane as planes
from tests.e2e.test_control_plane import ControlProcess, start_control, wait_until
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc

pytestmark = pytest.mark.timeout(300)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``, one pair of threads per connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._forwarding = True
        self.open()

    def open(self) -> None:
        """Listen (again, on the same port) and forward."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._forwarding = True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """The database goes away: new connections are refused, open ones reset."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown wakes the thread blocked in accept(); close alone leaves the port bound
            # until the next connection arrives
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self._close_all()

    def hold(self) -> None:
        """A partition: connections are accepted, nothing goes through in either direction."""
        self._forwarding = False

    def restore(self) -> None:
        """Back to forwarding; connections opened or held meanwhile are reset (their peers retry)."""
        self._close_all()
        if self._listener is None:
            self.open()
        self._forwarding = True

    def close(self) -> None:
        self.cut()

    def _close_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for each in sockets:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            with self._lock:
                self._sockets.add(client)
            if not self._forwarding:
                continue  # held: accepted, never answered
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.add(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while not self._forwarding:  # a partition: the bytes wait (and are dropped at restore)
                    threading.Event().wait(0.05)
                    if source not in self._sockets:
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for each in (source, sink):
                with contextlib.suppress(OSError):
                    each.shutdown(socket.SHUT_RDWR)


def health_status(control: ControlProcess, service: str = "") -> int:
    with grpc.insecure_channel(control.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def calls_while_down(control: ControlProcess) -> dict[str, str]:
    """The status a read and a change get from a control plane without its database: UNAVAILABLE
    (a caller retries it, or calls another replica), never INTERNAL or UNKNOWN."""
    codes = {}
    with grpc.insecure_channel(control.address) as channel:
        stub = deployments_pb2_grpc.DeploymentsStub(channel)
        metadata = client_metadata("t-deployer")
        for name, call in (
            ("GetDeployment", lambda: stub.GetDeployment(deployments_pb2.GetDeploymentRequest(endpoint="scale"),
                                                         metadata=metadata, timeout=30)),
            ("Deploy", lambda: stub.Deploy(deployments_pb2.DeployRequest(endpoint="scale", model_name="scale",
                                                                         version=1), metadata=metadata, timeout=30)),
        ):  # fmt: skip
            try:
                call()
                codes[name] = "OK"
            except grpc.RpcError as error:
                codes[name] = error.code().name  # type: ignore[attr-defined]
    return codes


@pytest.fixture
def proxied_control(store_url: str, tmp_path: Path) -> Iterator[tuple[ControlProcess, TcpProxy]]:
    url = make_url(store_url)
    proxy = TcpProxy(url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    control = start_control(tmp_path / "control", proxied, free_port())
    try:
        yield control, proxy
    finally:
        proxy.restore()
        control.process.terminate()
        control.process.wait(timeout=30)
        proxy.close()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_health_follows_the_database_down_and_partitioned(proxied_control) -> None:
    control, proxy = proxied_control
    services = ("", "weir.control.v1.Deployments", "weir.control.v1.DataPlaneSync")
    wait_until(lambda: all(health_status(control, name) == SERVING for name in services), message="SERVING")

    proxy.cut()  # the database is down
    wait_until(
        lambda: all(health_status(control, name) == NOT_SERVING for name in services),
        timeout=60,
        message="NOT_SERVING while the database is down",
    )
    assert control.process.poll() is None  # not ready, still alive
    assert calls_while_down(control) == {"GetDeployment": "UNAVAILABLE", "Deploy": "UNAVAILABLE"}
    proxy.restore()
    wait_until(lambda: all(health_status(control, name) == SERVING for name in services), message="SERVING again")

    proxy.hold()  # a partition: the probe's connect hangs and its timeout decides
    wait_until(lambda: health_status(control) == NOT_SERVING, timeout=60, message="NOT_SERVING in a partition")
    proxy.restore()
    wait_until(lambda: health_status(control) == SERVING, timeout=60, message="SERVING after the partition")

    messages = "\n".join(control.lines)
    assert messages.count("database unreachable: health NOT_SERVING") == 2, messages[-3000:]
    assert messages.count("database reachable again: health SERVING") == 2


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_data_plane_leaves_a_replica_that_lost_its_database(store_url: str, tmp_path: Path) -> None:
    """Two replicas on one database, one of them through the proxy; a data plane given both, attached
    to the proxied one. The proxy is cut: that replica turns NOT_SERVING, the data plane attaches to
    the other and follows a deploy made there, and inference never stops."""
    url = make_url(store_url)
    proxy = TcpProxy(url.port or 5432)
    proxied_url = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    state_dir = tmp_path / "control"  # shared, as the volume in docker/
    cut_off = start_control(state_dir, proxied_url, free_port())
    direct_port = free_port()  # started once the data plane is attached to the other (it may pick either)
    data_plane = start_weir(
        tmp_path / "data-plane", "--model-control-mode", "explicit", "--control-plane",
        f"{cut_off.address},127.0.0.1:{direct_port}", "--heartbeat-seconds", "0.5",
        env={"WEIR_TOKENS": planes.TOKENS, "WEIR_CONTROL_PLANE_TOKEN": planes.REPLICA_TOKEN},
    )  # fmt: skip
    controls = [cut_off]
    try:

        def attached_to(control: ControlProcess) -> bool:
            attached = [
                record for record in data_plane.log_records() if record.get("msg") == "attached to the control plane"
            ]
            return bool(attached) and attached[-1].get("control_plane") == control.address

        wait_until(lambda: attached_to(cut_off), message="the data plane to attach to the first replica")
        direct = start_control(state_dir, store_url, direct_port)
        controls.append(direct)
        config = tmp_path / "config.pbtxt"
        config.write_text(planes.CONFIG)
        for factor in (2.0, 3.0):
            planes.cli(
                direct, "models", "push", "scale", str(planes.scripted(tmp_path, factor)), "--config", str(config)
            )
        planes.cli(direct, "deploy", "scale", "scale", "1")
        wait_until(lambda: planes.serves_factor(data_plane.grpc_url, 2.0), message="version 1 on the data plane")

        proxy.cut()
        wait_until(lambda: health_status(cut_off) == NOT_SERVING, timeout=60, message="the cut-off replica NOT_SERVING")
        wait_until(lambda: attached_to(direct), timeout=60, message="the data plane to move to the other replica")
        assert planes.serves_factor(data_plane.grpc_url, 2.0)  # the last-known-good state serves throughout
        planes.cli(direct, "deploy", "scale", "scale", "2")
        wait_until(
            lambda: planes.serves_factor(data_plane.grpc_url, 3.0), message="version 2 through the other replica"
        )

        proxy.restore()
        wait_until(lambda: health_status(cut_off) == SERVING, timeout=60, message="SERVING again")
    finally:
        data_plane.terminate_and_wait()
        for control in controls:
            control.process.terminate()
            control.process.wait(timeout=30)
        proxy.close()
