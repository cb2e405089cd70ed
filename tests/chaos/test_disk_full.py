"""Disk full, with real processes: the control plane's artifact directory, and a data plane's model
directory, each on a 20 MiB tmpfs, receive a 30 MiB model.

An upload that does not fit fails with a clear RESOURCE_EXHAUSTED or FAILED_PRECONDITION, leaves no
READY (half-registered) version and no partial file, and the control plane goes on accepting
uploads that fit. A deploy whose artifact does not fit on a data plane is reported FAILED while the
old version keeps serving without a failed request.

Mounting needs root (or CAP_SYS_ADMIN); without it the tests skip and say so.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.chaos.helpers import Load, MiB, free_disk_bytes, wait_until
from tests.chaos.test_faults import PHASE_ANSWERS, scale_request, serves_factor
from tests.conftest import free_port, start_weir
from tests.e2e import test_control_plane as control_plane
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import registry_pb2, registry_pb2_grpc

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

TMPFS_MIB = 20
BIG_MIB = 30


@contextlib.contextmanager
def small_tmpfs(path: Path, size_mib: int = TMPFS_MIB) -> Iterator[Path]:
    """A ``size_mib`` tmpfs mounted on ``path`` for the block (skips the test where mount is refused)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command: the disk-full probes need a small tmpfs")
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        assert free_disk_bytes(path) <= size_mib * MiB
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Big(torch.nn.Module):
    """x * 3, carrying BIG_MIB of weights (TorchScript stores them uncompressed)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ballast", torch.zeros(BIG_MIB * MiB // 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3.0 + self.ballast[0]


def big_model(tmp_path: Path) -> Path:
    path = tmp_path / "big" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Big()), str(path))
    assert path.stat().st_size > TMPFS_MIB * MiB
    return path


@contextlib.contextmanager
def control(tmp_path: Path) -> Iterator[control_plane.ControlProcess]:
    running = control_plane.start_control(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port())
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.terminate()
            running.process.wait(timeout=30)


def test_an_upload_that_fills_the_artifact_directory_fails_cleanly(tmp_path: Path) -> None:
    model = big_model(tmp_path)
    data = model.read_bytes()
    config = tmp_path / "config.pbtxt"
    config.write_text(control_plane.CONFIG)
    with small_tmpfs(tmp_path / "control" / "artifacts") as artifacts, control(tmp_path) as running:
        metadata = client_metadata("t-deployer")
        with grpc.insecure_channel(running.address) as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)
            registry.CreateRegisteredModel(registry_pb2.CreateRegisteredModelRequest(name="big"), metadata=metadata)
            header = registry_pb2.CreateModelVersionRequest.Header(
                model_name="big", config_pbtxt=control_plane.CONFIG, artifact_filename="model.pt",
                artifact_sha256=hashlib.sha256(data).hexdigest(), artifact_size=len(data),
            )  # fmt: skip

            def messages() -> Iterator[registry_pb2.CreateModelVersionRequest]:
                yield registry_pb2.CreateModelVersionRequest(header=header)
                for offset in range(0, len(data), MiB):
                    yield registry_pb2.CreateModelVersionRequest(chunk=data[offset : offset + MiB])

            with pytest.raises(grpc.RpcError) as raised:
                registry.CreateModelVersion(messages(), metadata=metadata, timeout=120)
            error = raised.value
            assert error.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION), (
                f"{error.code()}: {error.details()}"
            )
            assert "space" in error.details().lower(), error.details()

            viewer = client_metadata("t-replica")
            versions = registry.SearchModelVersions(
                registry_pb2.SearchModelVersionsRequest(model_name="big"), metadata=viewer
            ).versions
            assert all(version.state != registry_pb2.ModelVersion.READY for version in versions), versions
            latest = registry.GetRegisteredModel(registry_pb2.GetRegisteredModelRequest(name="big"), metadata=viewer)
            assert latest.latest_version == 0
        assert list((artifacts / "incoming").iterdir()) == [], "a partial upload was left on the full disk"
        assert list((artifacts / "blobs").glob("*/*")) == []
        # the control plane goes on: an upload that fits is READY
        pushed = control_plane.cli(running, "models", "push", "small", str(control_plane.scripted(tmp_path, 2.0)),
                                   "--config", str(config))  # fmt: skip
        assert pushed["state"] == "READY"
        assert running.process.poll() is None


def test_a_deploy_that_does_not_fit_on_a_data_plane_keeps_the_old_version_serving(tmp_path: Path) -> None:
    config = tmp_path / "config.pbtxt"
    config.write_text(control_plane.CONFIG)
    big = big_model(tmp_path)
    with small_tmpfs(tmp_path / "replica"), control(tmp_path) as running:
        data_plane = start_weir(
            tmp_path / "replica", "--model-control-mode", "explicit", "--control-plane", running.address,
            "--replica-id", "replica-0", "--heartbeat-seconds", "0.5",
            env={"WEIR_TOKENS": control_plane.TOKENS, "WEIR_CONTROL_PLANE_TOKEN": control_plane.REPLICA_TOKEN},
        )  # fmt: skip
        try:
            control_plane.cli(running, "models", "push", "scale", str(control_plane.scripted(tmp_path, 2.0)),
                              "--config", str(config))  # fmt: skip
            control_plane.cli(running, "deploy", "scale", "scale", "1")
            wait_until(lambda: serves_factor(data_plane.grpc_url, 2.0), 90, "the data plane to serve version 1")
            pushed = control_plane.cli(running, "models", "push", "scale", str(big), "--config", str(config))
            with Load(data_plane.grpc_url, scale_request, clients=4) as load:
                load.wait_for(PHASE_ANSWERS)
                control_plane.cli(running, "deploy", "scale", "scale", pushed["version"])
                wait_until(
                    lambda: control_plane.replica_states(running).get("replica-0") == [("scale", "FAILED", 1)],
                    90,
                    "the data plane to report the version that does not fit FAILED, still serving version 1",
                )
                load.wait_for(PHASE_ANSWERS)
            assert load.failures == [], load.failures[:5]
            assert serves_factor(data_plane.grpc_url, 2.0)
            assert data_plane.process.poll() is None
            assert not any(line for line in data_plane.log_lines if '"level": "critical"' in line)
        finally:
            data_plane.terminate_and_wait()
