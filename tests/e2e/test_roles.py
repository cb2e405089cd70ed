"""Roles end to end (issue 14, findings 12 and 19):

- the role matrix: every RPC of the control plane called with every role (anonymous, replica,
  viewer, deployer, approver, admin) against a real `weir control`, allowed or refused exactly as
  tests/role_matrix.py (the README's role table) says, and every refusal in the audit log;
- a fake replica cannot move a rollout: a viewer's token cannot attach, and a replica identity that
  invents canary counters (successes or failures) while the real data plane serves no canary traffic
  neither promotes nor rolls back the canary;
- `weir up` gives its data plane a replica token (which reads nothing), and upgrades an older state
  directory whose data-plane token was a viewer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory

from tests.conftest import WeirProcess, free_port, start_weir
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
from tests.role_matrix import CONTROL_PLANE, DATA_PLANE, ROLES, allowed, markdown
from weir_control.server import SERVICE_NAMES  # registers every control service's descriptors
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import audit_pb2, audit_pb2_grpc, deployments_pb2, deployments_pb2_grpc

pytestmark = pytest.mark.timeout(600)

ROLE_TOKENS = {
    "anonymous": None,
    "replica": REPLICA_TOKEN,
    "viewer": "t-replica",  # tests.e2e.test_control_plane.TOKENS: a viewer's token
    "deployer": "t-deployer",
    "approver": "t-approver",
    "admin": "t-admin",
}
REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def _request(method: str) -> object:
    pool = descriptor_pool.Default()
    service, name = method.split("/")
    descriptor = pool.FindServiceByName(service).methods_by_name[name]
    request = message_factory.GetMessageClass(descriptor.input_type)()
    if method.endswith("DataPlaneSync/Attach"):
        request.hello.replica_id = "matrix"
    return descriptor, request


def call(channel: grpc.Channel, method: str, token: str | None, timeout: float = 10) -> grpc.StatusCode:
    """Call ``method`` with an empty (or minimal) request; the status it ends with."""
    descriptor, request = _request(method)
    path, metadata = f"/{method}", client_metadata(token)
    serialize, deserialize = (lambda message: message.SerializeToString()), (lambda data: data)
    try:
        if descriptor.client_streaming and descriptor.server_streaming:
            responses = channel.stream_stream(path, serialize, deserialize)(
                iter([request]), metadata=metadata, timeout=timeout
            )
            next(responses, None)
            responses.cancel()
        elif descriptor.server_streaming:
            responses = channel.unary_stream(path, serialize, deserialize)(request, metadata=metadata, timeout=timeout)
            next(responses, None)
            responses.cancel()
        elif descriptor.client_streaming:
            channel.stream_unary(path, serialize, deserialize)(iter([request]), metadata=metadata, timeout=timeout)
        else:
            channel.unary_unary(path, serialize, deserialize)(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlProcess]:
    running = start_control(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port())
    try:
        yield running
    finally:
        running.process.terminate()
        running.process.wait(timeout=30)


def test_the_table_names_every_control_rpc() -> None:
    pool = descriptor_pool.Default()
    served = {f"{name}/{method.name}" for name in SERVICE_NAMES for method in pool.FindServiceByName(name).methods}
    assert served == set(CONTROL_PLANE)


def test_every_control_rpc_with_every_role_matches_the_role_table(control: ControlProcess) -> None:
    mismatches = []
    with grpc.insecure_channel(control.address) as channel:
        for method, entry in CONTROL_PLANE.items():
            for role in ROLES:
                code = call(channel, method, ROLE_TOKENS[role])
                if (code not in REFUSALS) != allowed(entry, role):
                    mismatches.append(f"{method} as {role}: {code.name} (table: {entry})")
        assert mismatches == []

        # every refusal is audited: the anonymous caller's once per method (aggregated per minute)
        audit = audit_pb2_grpc.AuditStub(channel)
        events = audit.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(actor="anonymous", outcome="refused", page_size=1000),
            metadata=client_metadata("t-admin"),
            timeout=10,
        ).events
        refused_methods = {method for method, entry in CONTROL_PLANE.items() if not allowed(entry, "anonymous")}
        audited = {event.action for event in events if event.result == "UNAUTHENTICATED"}
        expected = {method.rsplit(".", 1)[-1] for method in refused_methods if CONTROL_PLANE[method] != "job-secret"}
        assert expected <= audited
        viewer_refusals = audit.ListAuditEvents(  # the viewer token's owner is named "replica" (historic)
            audit_pb2.ListAuditEventsRequest(actor="replica", outcome="refused", page_size=1000),
            metadata=client_metadata("t-admin"),
            timeout=10,
        ).events
        assert "Registry/CreateRegisteredModel" in {event.action for event in viewer_refusals}
        assert all(event.result == "PERMISSION_DENIED" and "viewer" in event.detail for event in viewer_refusals)


def test_the_table_names_every_data_plane_rpc_as_the_server_does() -> None:
    from weir.server import DATA_PLANE_ROLES
    from weir_proto.inference.pool import SERVICE

    assert set(DATA_PLANE) == {f"{SERVICE.full_name}/{method.name}" for method in SERVICE.methods}
    for method, entry in DATA_PLANE.items():
        least = DATA_PLANE_ROLES[method.rsplit("/", 1)[-1]]
        assert (entry if entry != "inference" else None) == (least.name.lower() if least else None), method


@pytest.mark.parametrize("require_inference_token", [False, True], ids=["open-inference", "inference-token"])
def test_every_data_plane_rpc_with_every_role_matches_the_role_table(
    demo_repository: Path, require_inference_token: bool
) -> None:
    from weir_proto.inference import messages as pb
    from weir_proto.inference.pool import SERVICE

    flags = ("--require-inference-token", "true") if require_inference_token else ()
    server = start_weir(
        demo_repository, "--model-control-mode", "explicit", "--load-model", "mlp_classifier", *flags,
        env={"WEIR_TOKENS": TOKENS},
    )  # fmt: skip
    mismatches = []
    try:
        with grpc.insecure_channel(server.grpc_url) as channel:
            for method, entry in DATA_PLANE.items():
                name = method.rsplit("/", 1)[-1]
                descriptor = SERVICE.methods_by_name[name]
                body = b""
                if name in ("RepositoryModelLoad", "RepositoryModelUnload"):  # not there: nothing changes
                    body = getattr(pb, f"{name}Request")(model_name="no_such_model").SerializeToString()
                for role in ROLES:
                    metadata = client_metadata(ROLE_TOKENS[role])
                    try:
                        if descriptor.client_streaming:
                            for _ in channel.stream_stream(f"/{method}")(iter(()), metadata=metadata, timeout=30):
                                pass
                        else:
                            channel.unary_unary(f"/{method}")(body, metadata=metadata, timeout=30)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as error:
                        code = error.code()  # type: ignore[attr-defined]
                    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method, role, code)
                    if (code not in REFUSALS) != allowed(entry, role, require_inference_token):
                        mismatches.append(f"{name} as {role}: {code.name} (table: {entry})")
        assert mismatches == []
    finally:
        server.terminate_and_wait()


def test_a_data_plane_with_a_viewers_token_is_refused_and_says_why(control: ControlProcess, tmp_path: Path) -> None:
    data_plane = start_weir(
        tmp_path / "replica", "--model-control-mode", "explicit", "--control-plane", control.address,
        "--replica-id", "misconfigured", env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": "t-replica"},
    )  # fmt: skip
    try:
        wait_until(
            lambda: any("attaching needs a token of role 'replica'" in line for line in data_plane.log_lines),
            message="the data plane to say its token was refused",
        )
        with grpc.insecure_channel(control.address) as channel:
            replicas = deployments_pb2_grpc.DeploymentsStub(channel).ListReplicas(
                deployments_pb2.ListReplicasRequest(), metadata=client_metadata("t-admin"), timeout=10
            )
        assert list(replicas.replicas) == []
        assert not any("t-replica" in line for line in data_plane.log_lines)
    finally:
        data_plane.terminate_and_wait()


# --- a fake replica ---------------------------------------------------------------------------------


class FakeReplica:
    """An attach stream that reports invented counters for the endpoint's canary."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.outbox: list[deployments_pb2.DataPlaneMessage] = []
        self.condition = threading.Condition()
        self.closed = False
        self.states: list[deployments_pb2.DesiredState] = []
        self.error: grpc.RpcError | None = None
        hello = deployments_pb2.Hello(replica_id="intruder", address="127.0.0.1:1")
        self.outbox.append(deployments_pb2.DataPlaneMessage(hello=hello))
        stub = deployments_pb2_grpc.DataPlaneSyncStub(self.channel)
        self.call = stub.Attach(self._messages(), metadata=client_metadata(token))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _messages(self) -> Iterator[deployments_pb2.DataPlaneMessage]:
        while True:
            with self.condition:
                self.condition.wait_for(lambda: self.outbox or self.closed)
                if self.closed:
                    return
                message = self.outbox.pop(0)
            yield message

    def _read(self) -> None:
        try:
            for message in self.call:
                self.states.append(message.desired_state)
        except grpc.RpcError as error:
            self.error = error

    def report(self, succeeded: int, failed: int) -> None:
        state = self.states[-1]
        lines = [
            deployments_pb2.VariantStats(
                endpoint=endpoint.endpoint, variant=variant.name, version=variant.model.version,
                succeeded=succeeded, failed=failed,
                latency_bounds_seconds=[0.001, 0.01], latency_counts=[succeeded + failed, 0, 0],
            )
            for endpoint in state.endpoints
            for variant in endpoint.variants
        ]  # fmt: skip
        status = deployments_pb2.ReplicaStatus(applied_revision=state.revision, variants=lines)
        with self.condition:
            self.outbox.append(deployments_pb2.DataPlaneMessage(status=status))
            self.condition.notify_all()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def rollout_setup(tmp_path: Path) -> Iterator[tuple[ControlProcess, WeirProcess, Path]]:
    tokens = tmp_path / "tokens.toml"
    entries = [entry.split(":") for entry in TOKENS.split(",")] + [["intruder", "replica", "t-intruder"]]
    tokens.write_text(
        "\n".join(f'[[token]]\nname = "{name}"\nrole = "{role}"\ntoken = "{token}"\n' for name, role, token in entries)
    )
    control = start_control(
        tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port(), "--tokens", str(tokens)
    )
    replica = start_weir(
        tmp_path / "replica", "--model-control-mode", "explicit", "--control-plane", control.address,
        "--replica-id", "honest", "--heartbeat-seconds", "0.3",
        env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},
    )  # fmt: skip
    try:
        config = tmp_path / "config.pbtxt"
        config.write_text(CONFIG)
        for factor in (2.0, 3.0):
            cli(control, "models", "push", "scale", str(scripted(tmp_path, factor)), "--config", str(config))
        cli(control, "deploy", "scale", "scale", "1")
        wait_until(lambda: serves_factor(replica.grpc_url, 2.0), message="the replica to serve version 1")
        yield control, replica, tmp_path
    finally:
        replica.terminate_and_wait()
        control.process.terminate()
        control.process.wait(timeout=30)


def test_a_fake_replica_cannot_move_a_rollout(rollout_setup) -> None:
    control, _replica, _ = rollout_setup
    # a viewer's token (what data planes used to attach with) is refused
    viewer = FakeReplica(control.address, "t-replica")
    viewer.reader.join(timeout=30)
    assert viewer.error is not None and viewer.error.code() == grpc.StatusCode.PERMISSION_DENIED
    viewer.close()

    cli(control, "rollout", "start", "scale", "scale:2", "--steps", "50,100", "--interval", "1", "--min-requests", "20")
    intruder = FakeReplica(control.address, "t-intruder")  # a replica identity of its own
    try:
        wait_until(
            lambda: any(
                any(v.name == "canary" for e in state.endpoints for v in e.variants) for state in intruder.states
            ),
            message="the intruder to be sent the canary",
        )
        # invented success: thousands of canary requests, none served by the real data plane
        for step in range(1, 8):
            intruder.report(succeeded=400 * step, failed=0)
            time.sleep(0.5)
        status = cli(control, "rollout", "status", "scale", token="t-replica")
        assert status["state"] == "RUNNING" and status.get("step", 0) == 0, status
        verdicts = [analysis["verdict"] for analysis in status.get("analyses", [])]
        assert verdicts and set(verdicts) == {"INCONCLUSIVE"}, verdicts
        assert any("without those of 'intruder'" in a["reason"] for a in status["analyses"]), status["analyses"]
        # invented failure: the canary is not rolled back either
        for step in range(8, 14):
            intruder.report(succeeded=3200, failed=400 * (step - 7))
            time.sleep(0.5)
        status = cli(control, "rollout", "status", "scale", token="t-replica")
        assert status["state"] == "RUNNING" and status.get("step", 0) == 0, status
        assert {a["verdict"] for a in status["analyses"]} == {"INCONCLUSIVE"}
        replicas = {r["replica_id"]: r for r in cli(control, "deployments", token="t-replica")["replicas"]}
        assert replicas["intruder"]["identity"] == "intruder" and replicas["honest"]["identity"] == "data-plane"
    finally:
        intruder.close()


# --- weir up --------------------------------------------------------------------------------------


def test_weir_up_gives_its_data_plane_a_replica_token_that_reads_nothing(tmp_path: Path) -> None:
    state_dir, ready = tmp_path / "weir-up", tmp_path / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "weir.cli", "up", "--state-dir", str(state_dir), "--control-port", "0",
         "--grpc-port", "0", "--metrics-port", "-1", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        wait_until(lambda: ready.is_file() or process.poll() is not None, timeout=120, message="weir up")
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        address = json.loads(ready.read_text())["control_plane"]
        assert 'name = "data-plane"\nrole = "replica"' in (state_dir / "tokens.toml").read_text()
        data_plane, admin = ((state_dir / name).read_text().strip() for name in ("data-plane.token", "admin.token"))
        with grpc.insecure_channel(address) as channel:
            deployments = deployments_pb2_grpc.DeploymentsStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                deployments.ListDeployments(
                    deployments_pb2.ListDeploymentsRequest(), metadata=client_metadata(data_plane), timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]

            def attached() -> bool:
                replicas = deployments.ListReplicas(
                    deployments_pb2.ListReplicasRequest(), metadata=client_metadata(admin), timeout=10
                ).replicas
                return [(r.replica_id, r.identity) for r in replicas] == [("weir-up", "data-plane")]

            wait_until(attached, message="weir up's data plane to attach as a replica")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_weir_up_upgrades_an_older_viewer_data_plane_token(tmp_path: Path) -> None:
    from weir.up import ensure_tokens
    from weir_proto.auth import Identity, Role, TokenTable, token_digest

    (tmp_path / "admin.token").write_text("a-token\n")
    (tmp_path / "data-plane.token").write_text("d-token\n")
    (tmp_path / "tokens.toml").write_text(
        f'[[token]]\nname = "admin"\nrole = "admin"\nsha256 = "{token_digest("a-token")}"\n\n'
        f'[[token]]\nname = "data-plane"\nrole = "viewer"\nsha256 = "{token_digest("d-token")}"\n'
    )
    tokens_file, admin, data_plane = ensure_tokens(tmp_path)
    assert (admin, data_plane) == ("a-token", "d-token")  # the same tokens
    table = TokenTable.from_file(tokens_file)
    assert table.identify("d-token") == Identity("data-plane", Role.REPLICA)
    assert table.identify("a-token") == Identity("admin", Role.ADMIN)


def test_weir_token_makes_a_token_and_its_entry(tmp_path: Path) -> None:
    from weir_proto.auth import Identity, Role, TokenTable

    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nname = "root"\nrole = "admin"\ntoken = "t-admin"\n')
    made = subprocess.run(
        [sys.executable, "-m", "weir.cli", "token", "--name", "replica-eu-1", "--role", "replica", "--append",
         str(tokens)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    table = TokenTable.from_file(tokens)
    assert table.identify(token) == Identity("replica-eu-1", Role.REPLICA)
    assert table.identify("t-admin") == Identity("root", Role.ADMIN)
    assert token not in tokens.read_text()  # only its digest is kept


def test_the_readme_shows_the_role_table_this_test_checks() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for table, title in (
        (CONTROL_PLANE, "Control plane (weir control)"),
        (DATA_PLANE, "Data plane (weir serve with tokens; yes / -: open / with --require-inference-token)"),
    ):
        assert markdown(table, title) in readme, f"README.md: the {title!r} role table differs from role_matrix"
