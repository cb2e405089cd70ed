"""Issue 14, finding 10, end to end with real processes: a torch.export archive with a weight marked
``use_pickle`` (whose pickle would create a marker file if anything unpickled it) is FAILED in the
registry with the reason when pushed to a real `weir control`, and UNAVAILABLE with the reason when
placed in a real `weir serve`'s repository; the marker never appears. Random bytes as model.pt are
"not a TorchScript/torch.export archive" at both ends (finding 9)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
import tritonclient.grpc as grpcclient

from tests.conftest import free_port, start_weir, write_torchscript_model
from tests.e2e.test_control_plane import CONFIG, ControlProcess, start_control
from tests.server.test_torch_backend import SCALE_CONFIG, Scale, hostile_export
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(600)


def push(control: ControlProcess, name: str, model_file: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "weir.cli", "models", "push", name, str(model_file), "--config", str(config),
            "--control-plane", control.address, "--token", "t-deployer", "--json",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def upload_with_stubs(registry: registry_pb2_grpc.RegistryStub, name: str, data: bytes, filename: str) -> grpc.RpcError:
    header = registry_pb2.CreateModelVersionRequest.Header(
        model_name=name, config_pbtxt=CONFIG, artifact_filename=filename,
        artifact_sha256=hashlib.sha256(data).hexdigest(), artifact_size=len(data),
    )  # fmt: skip
    messages = iter(
        [registry_pb2.CreateModelVersionRequest(header=header), registry_pb2.CreateModelVersionRequest(chunk=data)]
    )
    with pytest.raises(grpc.RpcError) as caught:
        registry.CreateModelVersion(messages, metadata=client_metadata("t-deployer"), timeout=60)
    return caught.value


def test_a_pickled_export_archive_is_failed_in_the_registry_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    hostile = hostile_export(tmp_path / "model.pt2", marker, "weight")
    config = tmp_path / "config.pbtxt"
    config.write_text(SCALE_CONFIG)
    control = start_control(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port())
    try:
        pushed = push(control, "hostile", hostile, config)
        assert pushed.returncode != 0, pushed.stdout
        assert "use_pickle" in pushed.stdout + pushed.stderr
        with grpc.insecure_channel(control.address) as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)
            metadata = client_metadata("t-deployer")
            version = registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(model_name="hostile", version=1), metadata=metadata, timeout=30
            )
            assert version.state == registry_pb2.ModelVersion.FAILED
            assert "refusing a torch.export archive" in version.failure_reason
            assert "use_pickle" in version.failure_reason
            # random bytes as model.pt: not an archive (finding 9), FAILED as well
            error = upload_with_stubs(registry, "hostile", os.urandom(4096), "model.pt")
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a TorchScript/torch.export archive" in (error.details() or "")
            versions = registry.SearchModelVersions(
                registry_pb2.SearchModelVersionsRequest(model_name="hostile"), metadata=metadata, timeout=30
            ).versions
            assert [v.state for v in versions] == [registry_pb2.ModelVersion.FAILED] * 2
            assert any("not a TorchScript/torch.export archive" in v.failure_reason for v in versions)
        blobs = list((tmp_path / "control").rglob("blobs/*/*"))
        assert blobs == []  # a refused artifact never enters the store
    finally:
        control.process.kill()
        control.process.wait(timeout=30)
    assert not marker.exists()


def test_a_pickled_export_archive_in_a_repository_is_unavailable_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    repository = tmp_path / "repository"
    write_torchscript_model(repository, "scale", Scale(), SCALE_CONFIG)
    for name, how in (("hostile_weight", "weight"), ("hostile_sample_inputs", "sample_inputs")):
        (repository / name / "1").mkdir(parents=True)
        hostile_export(repository / name / "1" / "model.pt2", marker, how)
        (repository / name / "config.pbtxt").write_text(SCALE_CONFIG)
    (repository / "random" / "1").mkdir(parents=True)
    (repository / "random" / "1" / "model.pt").write_bytes(os.urandom(4096))
    (repository / "random" / "config.pbtxt").write_text(SCALE_CONFIG)
    weir = start_weir(repository, "--model-control-mode", "explicit", "--load-model", "*")
    try:
        client = grpcclient.InferenceServerClient(weir.grpc_url)
        index = {entry["name"]: entry for entry in client.get_model_repository_index(as_json=True)["models"]}
        for name in ("hostile_weight", "hostile_sample_inputs"):
            assert index[name]["state"] == "UNAVAILABLE", index[name]
            assert "refusing a torch.export archive" in index[name]["reason"]
        assert "use_pickle" in index["hostile_weight"]["reason"]
        assert index["random"]["state"] == "UNAVAILABLE"
        assert "not a TorchScript/torch.export archive" in index["random"]["reason"]
        # an explicit load answers with the reason too, and the good model keeps serving
        with pytest.raises(Exception) as refused:
            client.load_model("hostile_weight")
        assert "use_pickle" in str(refused.value)
        data = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
        data.set_data_from_numpy(torch.ones(1, 3).numpy())
        out = client.infer("scale", [data], client_timeout=30).as_numpy("OUTPUT__0")
        assert out.tolist() == [[3.0, 3.0, 3.0]]
    finally:
        weir.terminate_and_wait()
    assert not marker.exists()
