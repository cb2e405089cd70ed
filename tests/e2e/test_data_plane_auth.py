"""The data plane with tokens: every RPC against the role table (``DATA_PLANE_ROLES``, the README's);
load/unload need a deployer; RepositoryIndex a viewer; with --require-inference-token, inference needs
a token too; health stays open for probes. Load/unload beyond loopback without tokens is refused at
start, and a data plane that follows a control plane refuses to load or unload what it manages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port
from weir.follower import SERVED_MARKER
from weir.server import DATA_PLANE_ROLES, WeirServer
from weir.settings import ControlMode, ServerSettings
from weir_proto.auth import Role, permits
from weir_proto.inference import messages as pb
from weir_proto.inference.pool import SERVICE

TOKENS = "ops:deployer:t-ops,app:viewer:t-app"
MATRIX_TOKENS = "r:replica:t-replica,v:viewer:t-viewer,d:deployer:t-deployer,p:approver:t-approver,a:admin:t-admin"
CALLERS: dict[str, Role | None] = {
    "anonymous": None,
    "t-replica": Role.REPLICA,
    "t-viewer": Role.VIEWER,
    "t-deployer": Role.DEPLOYER,
    "t-approver": Role.APPROVER,
    "t-admin": Role.ADMIN,
}


@pytest.fixture
async def protected(demo_repository: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[WeirServer]:
    monkeypatch.setenv("WEIR_TOKENS", TOKENS)
    server = WeirServer(
        ServerSettings(
            model_repository=demo_repository,
            listen_address="127.0.0.1",
            grpc_port=0,
            metrics_port=-1,
            model_control_mode=ControlMode.EXPLICIT,
            load_model=("mlp_classifier",),
            require_inference_token=True,
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def infer(client: triton_aio.InferenceServerClient, headers: dict[str, str] | None) -> None:
    tensor = triton_aio.InferInput("INPUT__0", [1, 256], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 256), np.float32))
    await client.infer("mlp_classifier", [tensor], headers=headers)


async def test_inference_and_repository_rpcs_need_the_right_token(protected: WeirServer) -> None:
    url = f"127.0.0.1:{protected.grpc_port}"
    client = triton_aio.InferenceServerClient(url)
    app, ops = {"authorization": "Bearer t-app"}, {"authorization": "Bearer t-ops"}
    try:
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            await infer(client, None)
        await infer(client, app)
        with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
            await client.unload_model("mlp_classifier", headers=app)
        await client.unload_model("mlp_classifier", headers=ops)
        await client.load_model("mlp_classifier", headers=ops)
        await infer(client, ops)
    finally:
        await client.close()
    async with grpc.aio.insecure_channel(url) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_requiring_an_inference_token_without_tokens_is_refused(demo_repository: Path) -> None:
    with pytest.raises(ValueError, match="require_inference_token: expected tokens"):
        WeirServer(ServerSettings(model_repository=demo_repository, require_inference_token=True))


# --- the role table, RPC by RPC ---------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["open-inference", "inference-token"])
async def matrix_server(
    request: pytest.FixtureRequest, demo_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[WeirServer]:
    monkeypatch.setenv("WEIR_TOKENS", MATRIX_TOKENS)
    server = WeirServer(
        ServerSettings(
            model_repository=demo_repository,
            listen_address="127.0.0.1",
            grpc_port=0,
            metrics_port=-1,
            model_control_mode=ControlMode.EXPLICIT,
            load_model=("mlp_classifier",),
            require_inference_token=request.param,
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_seconds=1)


def _body(method: str) -> bytes:
    if method in ("RepositoryModelLoad", "RepositoryModelUnload"):  # a model that is not there: nothing changes
        return getattr(pb, f"{method}Request")(model_name="no_such_model").SerializeToString()
    return b""


async def test_every_rpc_admits_exactly_the_roles_of_the_table(matrix_server: WeirServer) -> None:
    require_inference_token = matrix_server.settings.require_inference_token
    assert set(DATA_PLANE_ROLES) == {method.name for method in SERVICE.methods}
    outcomes = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{matrix_server.grpc_port}") as channel:
        for method in SERVICE.methods:
            least = DATA_PLANE_ROLES[method.name]
            if least is None and require_inference_token:
                least = Role.VIEWER
            for token, role in CALLERS.items():
                metadata = (("authorization", f"Bearer {token}"),) if role is not None else ()
                path = f"/{SERVICE.full_name}/{method.name}"
                try:
                    if method.client_streaming:
                        call = channel.stream_stream(path)(iter(()), metadata=metadata, timeout=30)
                        async for _ in call:
                            pass
                    else:
                        await channel.unary_unary(path)(_body(method.name), metadata=metadata, timeout=30)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                if least is None or (role is not None and permits(role, least)):
                    expected = "allowed"
                else:
                    expected = "unauthenticated" if role is None else "permission_denied"
                got = {
                    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
                    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
                }.get(code, "allowed")
                assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method.name, token, code)
                outcomes.append((method.name, token, expected, got))
    assert [outcome for outcome in outcomes if outcome[2] != outcome[3]] == []


async def test_with_tokens_the_repository_index_needs_one_but_metadata_and_inference_do_not(
    demo_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEIR_TOKENS", TOKENS)
    server = WeirServer(
        ServerSettings(model_repository=demo_repository, listen_address="127.0.0.1", grpc_port=0, metrics_port=-1)
    )
    await server.start()
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            await client.get_model_repository_index()
        index = await client.get_model_repository_index(headers={"authorization": "Bearer t-app"})
        assert "mlp_classifier" in {model.name for model in index.models}
        config = await client.get_model_config("mlp_classifier")  # perf_analyzer reads it before inferring
        assert config.config.name == "mlp_classifier"
        await infer(client, None)
    finally:
        await client.close()
        await server.stop(grace_seconds=1)


# --- load/unload beyond loopback -----------------------------------------------------------------------


def test_explicit_control_beyond_loopback_without_tokens_is_refused_at_start(demo_repository: Path) -> None:
    beyond = {
        "model_repository": demo_repository,
        "listen_address": "0.0.0.0",
        "model_control_mode": ControlMode.EXPLICIT,
    }
    with pytest.raises(ValueError, match=r"explicit model control on 0\.0\.0\.0 \(beyond loopback\)"):
        WeirServer(ServerSettings(**beyond))  # type: ignore[arg-type]
    WeirServer(ServerSettings(**beyond, allow_anonymous_model_control=True))  # type: ignore[arg-type]
    for loopback in ("127.0.0.1", "::1", "localhost"):
        WeirServer(ServerSettings(**{**beyond, "listen_address": loopback}))  # type: ignore[arg-type]
    WeirServer(ServerSettings(model_repository=demo_repository, listen_address="0.0.0.0"))  # mode none: no load RPC


def test_weir_serve_says_why_it_refuses_to_start(demo_repository: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "weir.cli", "serve", "--model-repository", str(demo_repository),
         "--listen-address", "0.0.0.0", "--grpc-port", "0", "--metrics-port", "-1",
         "--model-control-mode", "explicit"],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert finished.returncode != 0
    assert "--tokens-file" in finished.stderr and "--allow-anonymous-model-control" in finished.stderr
    assert "Traceback" not in finished.stderr


# --- models the control plane manages -------------------------------------------------------------------


async def test_a_follower_refuses_to_load_or_unload_what_the_control_plane_manages(
    demo_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    managed = demo_repository / "fraud@stable"
    shutil.copytree(demo_repository / "mlp_classifier", managed)
    config = managed / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "mlp_classifier"', 'name: "fraud@stable"'))
    (managed / SERVED_MARKER).write_text("fraud 1 " + "0" * 64 + "\n")
    monkeypatch.setenv("WEIR_TOKENS", TOKENS)
    server = WeirServer(
        ServerSettings(
            model_repository=demo_repository,
            listen_address="127.0.0.1",
            grpc_port=0,
            metrics_port=-1,
            model_control_mode=ControlMode.EXPLICIT,
            control_plane=f"127.0.0.1:{free_port()}",  # away: the follower keeps serving what it has
        )
    )
    await server.start()
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    ops = {"authorization": "Bearer t-ops"}
    try:
        assert await client.is_model_ready("fraud@stable", headers=ops)
        for change in (client.unload_model, client.load_model):
            with pytest.raises(InferenceServerException) as refused:
                await change("fraud@stable", headers=ops)
            assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"
            assert "managed by the control plane" in (refused.value.message() or "")
        assert await client.is_model_ready("fraud@stable", headers=ops)
        await client.unload_model("mlp_classifier", headers=ops)  # not the control plane's: the deployer's call
        assert not await client.is_model_ready("mlp_classifier", headers=ops)
    finally:
        await client.close()
        await server.stop(grace_seconds=1)
