"""A version's validation inputs through the registry (issue 15, item 9): `weir models push
--validation rows.npz` stores them with the version, the data plane that serves it finds them in the
version directory as validation.npz, and the int8 accuracy gate runs on those rows (it always ran on
synthetic standard-normal rows: the registry could not carry the file). The file is bounded and plain arrays
only, checked by the CLI, the control plane and the data plane; control-gc keeps it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import ROOT, free_port, start_weir
from tests.e2e.test_control_plane import REPLICA_TOKEN, TOKENS, cli, start_control, wait_until
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(300)

GATE = (
    'parameters { key: "weir_precision" value: { string_value: "int8_dynamic" } }\n'
    # the demo MLP is untrained: its logits sit close together (as in test_quantized_serving)
    'parameters { key: "weir_accuracy_min_top1_agreement" value: { string_value: "0.5" } }\n'
)
ROWS = 37  # not the VALIDATION_ROWS (256) synthetic ones


def weir(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weir.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def validation_rows(path: Path) -> Path:
    np.savez(path, features=np.random.default_rng(3).standard_normal((ROWS, 256)).astype(np.float32))
    return path


def test_pushed_validation_inputs_reach_the_accuracy_gate(demo_repository_template: Path, tmp_path: Path) -> None:
    control = start_control(tmp_path / "control", "", free_port())
    data_plane = start_weir(
        tmp_path / "replica", "--model-control-mode", "explicit", "--control-plane", control.address,
        "--replica-id", "gate", "--heartbeat-seconds", "0.5",
        env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},
    )  # fmt: skip
    try:
        config = tmp_path / "config.pbtxt"
        config.write_text((demo_repository_template / "mlp_export" / "config.pbtxt").read_text() + "\n" + GATE)
        model = demo_repository_template / "mlp_export" / "1" / "model.pt2"
        rows = validation_rows(tmp_path / "rows.npz")
        token = ["--control-plane", control.address, "--token", "t-deployer"]
        pushed = weir("models", "push", "gated", str(model), "--config", str(config), "--validation", str(rows),
                      *token, "--json")  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
        version = json.loads(pushed.stdout)
        assert int(version["validation_size"]) == rows.stat().st_size and len(version["validation_sha256"]) == 64
        cli(control, "deploy", "gated", "gated", version["version"])

        with grpcclient.InferenceServerClient(data_plane.grpc_url) as client:
            viewer = {"authorization": "Bearer t-replica"}
            wait_until(lambda: client.is_model_ready("gated@primary", headers=viewer), message="the version to load")
            parameters = client.get_model_config("gated@primary", headers=viewer, as_json=True)["config"]["parameters"]
        assert parameters["weir_accuracy_validation_rows"]["string_value"] == str(ROWS)
        served = tmp_path / "replica" / "gated@primary" / version["version"] / "validation.npz"
        assert served.read_bytes() == rows.read_bytes()

        # control-gc keeps the validation inputs' blob (a version references it)
        collected = weir("control-gc", "--state-dir", str(tmp_path / "control"), "--min-age-seconds", "0", "--json")
        assert collected.returncode == 0, collected.stderr
        assert not any(version["validation_sha256"] in path for path in json.loads(collected.stdout)["deleted"])
        blob = tmp_path / "control" / "artifacts" / "blobs" / version["validation_sha256"][:2] / version[
            "validation_sha256"
        ]  # fmt: skip
        assert blob.is_file()

        # what the CLI refuses before any upload, in one line
        pickled = tmp_path / "pickled.npz"
        np.savez(pickled, features=np.array([{"a": 1}, None], dtype=object))
        not_npz = tmp_path / "rows.csv"
        not_npz.write_text("1,2,3\n")
        forged = tmp_path / "forged.npz"  # a header claiming 8 TB: numpy would allocate that before reading
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
        with zipfile.ZipFile(forged, "w") as archive:
            archive.writestr("features.npy", header.getvalue() + bytes(16))
        inflating = tmp_path / "inflating.npz"  # 300 KB that inflate to 300 MiB
        zeros = io.BytesIO()
        np.save(zeros, np.zeros(300 * 1024 * 1024 // 8))
        with zipfile.ZipFile(inflating, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("features.npy", zeros.getvalue())
        for bad, expected in (
            (pickled, "holds Python objects (a pickle)"),
            (not_npz, "expected an npz"),
            (forged, "its header declares 8000000000000 bytes of data"),
            (inflating, "expected at most 268435456 bytes of arrays"),
        ):
            refused = weir("models", "push", "gated", str(model), "--config", str(config), "--validation", str(bad),
                           *token)  # fmt: skip
            assert refused.returncode == 1 and expected in refused.stderr, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

        # the control plane checks too, whoever uploads
        with grpc.insecure_channel(control.address) as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)
            metadata = client_metadata("t-deployer")
            buffer = io.BytesIO()
            np.savez(buffer, features=np.array([object()], dtype=object))
            for payload, size, expected in (
                (buffer.getvalue(), len(buffer.getvalue()), "holds Python objects (a pickle)"),
                (b"x", 64 * 1024 * 1024 + 1, "validation_size: expected 1 to 67108864 bytes"),
            ):
                with pytest.raises(grpc.RpcError) as error:
                    registry.CreateModelVersion(upload(model, config, payload, size), metadata=metadata, timeout=60)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
                assert expected in error.value.details()
            plain = registry.CreateModelVersion(upload(model, config, None, 0), metadata=metadata, timeout=60)
            with pytest.raises(grpc.RpcError) as missing:
                list(registry.DownloadArtifact(
                    registry_pb2.DownloadArtifactRequest(model_name="gated", version=plain.version, validation=True),
                    metadata=metadata, timeout=30,
                ))  # fmt: skip
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        data_plane.terminate_and_wait()
        control.process.terminate()
        control.process.wait(timeout=30)


def upload(model: Path, config: Path, validation: bytes | None, size: int):  # type: ignore[no-untyped-def]
    data = model.read_bytes()
    header = registry_pb2.CreateModelVersionRequest.Header(
        model_name="gated", config_pbtxt=config.read_text(), artifact_filename="model.pt2",
        artifact_sha256=hashlib.sha256(data).hexdigest(), artifact_size=len(data),
    )  # fmt: skip
    if validation is not None:
        header.validation_sha256, header.validation_size = hashlib.sha256(validation).hexdigest(), size
    yield registry_pb2.CreateModelVersionRequest(header=header)
    yield registry_pb2.CreateModelVersionRequest(chunk=data)
    if validation is not None:
        yield registry_pb2.CreateModelVersionRequest(validation_chunk=validation)
