"""TLS and mutual TLS: the control plane requires client certificates, a data plane attaches with
one and follows a deploy, and serves inference over TLS to tritonclient; a client without a
certificate, or one that does not trust the CA, is refused. Certificates are made with openssl."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio

from tests.conftest import write_torchscript_model
from tests.e2e.test_control_plane import CONFIG, Scale
from weir.server import WeirServer
from weir.settings import ControlMode, ServerSettings
from weir_control.server import ControlPlaneServer, ControlSettings
from weir_proto.auth import TokenTable, client_metadata
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc, registry_pb2, registry_pb2_grpc

TOKENS = "ci:deployer:t-deployer,replica:replica:t-replica"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by it."""
    root = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=weir-test-ca",
            "-keyout", str(root / "ca.key"), "-out", str(root / "ca.pem"))  # fmt: skip
    (root / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extension in (("server", ["-extfile", str(root / "server.ext")]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=weir-{name}",
                "-keyout", str(root / f"{name}.key"), "-out", str(root / f"{name}.csr"))  # fmt: skip
        openssl("x509", "-req", "-in", str(root / f"{name}.csr"), "-CA", str(root / "ca.pem"),
                "-CAkey", str(root / "ca.key"), "-CAcreateserial", "-days", "2",
                "-out", str(root / f"{name}.pem"), *extension)  # fmt: skip
    return root


@pytest.fixture
async def mtls_control(pki: Path, tmp_path: Path) -> AsyncIterator[ControlPlaneServer]:
    server = ControlPlaneServer(
        ControlSettings(
            state_dir=tmp_path / "control",
            port=0,
            tls_cert=pki / "server.pem",
            tls_key=pki / "server.key",
            tls_client_ca=pki / "ca.pem",
        ),
        tokens=TokenTable.from_environment_value(TOKENS),
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def client_credentials(pki: Path, with_certificate: bool = True) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if with_certificate else None,
        certificate_chain=(pki / "client.pem").read_bytes() if with_certificate else None,
    )


async def test_a_data_plane_attaches_over_mutual_tls_and_serves_over_tls(
    pki: Path, mtls_control: ControlPlaneServer, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{mtls_control.port}"
    staging = tmp_path / "staging"
    write_torchscript_model(staging, "scale", Scale(5.0), CONFIG)
    artifact = (staging / "scale" / "1" / "model.pt").read_bytes()

    async with grpc.aio.secure_channel(address, client_credentials(pki)) as channel:
        registry = registry_pb2_grpc.RegistryStub(channel)
        metadata = client_metadata("t-deployer")
        await registry.CreateRegisteredModel(registry_pb2.CreateRegisteredModelRequest(name="scale"), metadata=metadata)
        header = registry_pb2.CreateModelVersionRequest.Header(
            model_name="scale", config_pbtxt=CONFIG, artifact_filename="model.pt",
            artifact_sha256=hashlib.sha256(artifact).hexdigest(), artifact_size=len(artifact),
        )  # fmt: skip

        async def upload() -> AsyncIterator[registry_pb2.CreateModelVersionRequest]:
            yield registry_pb2.CreateModelVersionRequest(header=header)
            yield registry_pb2.CreateModelVersionRequest(chunk=artifact)

        await registry.CreateModelVersion(upload(), metadata=metadata)
        await deployments_pb2_grpc.DeploymentsStub(channel).Deploy(
            deployments_pb2.DeployRequest(endpoint="scale", model_name="scale", version=1), metadata=metadata
        )

    data_plane = WeirServer(
        ServerSettings(
            model_repository=tmp_path / "replica",
            listen_address="127.0.0.1",
            grpc_port=0,
            metrics_port=-1,
            model_control_mode=ControlMode.EXPLICIT,
            tls_cert=str(pki / "server.pem"),
            tls_key=str(pki / "server.key"),
            control_plane=address,
            control_plane_token="t-replica",
            control_plane_tls_ca=str(pki / "ca.pem"),
            control_plane_tls_cert=str(pki / "client.pem"),
            control_plane_tls_key=str(pki / "client.key"),
        )
    )
    await data_plane.start()
    try:
        client = triton_aio.InferenceServerClient(
            f"localhost:{data_plane.grpc_port}", ssl=True, root_certificates=str(pki / "ca.pem")
        )
        try:
            for _ in range(300):
                if await client.is_model_ready("scale"):
                    break
                await asyncio.sleep(0.1)
            x = np.array([[1.0, 2.0, 3.0]], np.float32)
            tensor = triton_aio.InferInput("INPUT__0", [1, 3], "FP32")
            tensor.set_data_from_numpy(x)
            result = await client.infer("scale", [tensor])
            np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), x * 5.0)
        finally:
            await client.close()
    finally:
        await data_plane.stop()


async def test_clients_without_a_certificate_or_trust_are_refused(pki: Path, mtls_control: ControlPlaneServer) -> None:
    address = f"127.0.0.1:{mtls_control.port}"
    request = registry_pb2.SearchRegisteredModelsRequest()
    for credentials in (
        client_credentials(pki, with_certificate=False),  # mutual TLS: no client certificate
        grpc.ssl_channel_credentials(),  # the system's roots do not include the test CA
    ):
        async with grpc.aio.secure_channel(address, credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await registry_pb2_grpc.RegistryStub(channel).SearchRegisteredModels(
                    request, metadata=client_metadata("t-replica"), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            await registry_pb2_grpc.RegistryStub(channel).SearchRegisteredModels(request, timeout=5)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
