"""The data plane with tokens: load/unload need a deployer; with --require-inference-token, inference
needs a token too; health stays open for probes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from weir.server import WeirServer
from weir.settings import ControlMode, ServerSettings

TOKENS = "ops:deployer:t-ops,app:viewer:t-app"


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
