"""Canary rollouts end to end (`weir control` + two `weir serve --control-plane`, load on both):
a failing canary and a slow canary are each rolled back automatically; a healthy canary walks every
step and is promoted."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import WeirProcess, free_port
from tests.e2e.test_control_plane import CONFIG, ControlProcess, cli, start_control, start_replicas, wait_until

pytestmark = pytest.mark.timeout(600)
X = np.array([[50.0, 50.0, 50.0]], np.float32)


class Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


class FailsOnLargeInputs(torch.nn.Module):
    """Loads and warms up fine; fails on the inputs the load sends (sum above 100)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 100.0):
            raise RuntimeError("deliberate failure")
        return x * 2.0


class Slow(torch.nn.Module):
    """Right answers, ~tens of milliseconds each: a chain of matrix products it then discards."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.eye(256) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.ones(64, 256)
        for _ in range(150):
            work = work @ self.weight + 1.0
        return x * 2.0 + work.sum() * 0.0


def push(control: ControlProcess, tmp_path: Path, module: torch.nn.Module, name: str) -> str:
    path = tmp_path / name / "model.pt"
    path.parent.mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(path))
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    return str(cli(control, "models", "push", "scale", str(path), "--config", str(config))["version"])


def stop_planes(data_planes: list[WeirProcess], *controls: ControlProcess) -> None:
    """Stop the data planes, then the control planes still running."""
    for data_plane in data_planes:
        data_plane.terminate_and_wait()
    for control in controls:
        if control.process.poll() is None:
            control.process.terminate()
            control.process.wait(timeout=30)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[ControlProcess, list[str], Path]]:
    control = start_control(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port())
    replicas = start_replicas(control, tmp_path, heartbeat="0.3")
    try:
        push(control, tmp_path, Scale(), "baseline")
        cli(control, "deploy", "scale", "scale", "1")
        urls = [replica.grpc_url for replica in replicas]
        for url in urls:
            wait_until(lambda url=url: _answer(grpcclient.InferenceServerClient(url)) is not None, message="baseline")
        yield control, urls, tmp_path
    finally:
        stop_planes(replicas, control)


def _answer(client: grpcclient.InferenceServerClient) -> np.ndarray | None:
    tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
    tensor.set_data_from_numpy(X)
    try:
        return client.infer("scale", [tensor], client_timeout=30).as_numpy("OUTPUT__0")
    finally:
        client.close()


class Load:
    """Requests to every replica until stopped; counts outcomes."""

    def __init__(self, urls: list[str]) -> None:
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(url,)) for url in urls for _ in range(2)]

    def _run(self, url: str) -> None:
        client = grpcclient.InferenceServerClient(url)
        tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
        tensor.set_data_from_numpy(X)
        while not self._stop.is_set():
            try:
                client.infer("scale", [tensor], client_timeout=30)
                self.ok += 1
            except InferenceServerException:
                self.failed += 1
        client.close()

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def rollout(control: ControlProcess, version: str, *extra: str) -> dict:
    return cli(control, "rollout", "start", "scale", f"scale:{version}", "--steps", "20,50,100",
               "--interval", "1.5", "--min-requests", "5", *extra)  # fmt: skip


def finished(control: ControlProcess) -> dict:
    holder: dict = {}

    def done() -> bool:
        holder.update(cli(control, "rollout", "status", "scale", token="t-replica"))
        return holder["state"] in ("SUCCEEDED", "ROLLED_BACK")

    wait_until(done, timeout=120, message="the rollout to finish")
    return holder


@pytest.mark.parametrize(
    ("module", "reason"), [(FailsOnLargeInputs(), "error rate 1.000"), (Slow(), "p99")], ids=["failing", "slow"]
)
def test_a_bad_canary_is_rolled_back_automatically(setup, module: torch.nn.Module, reason: str) -> None:
    control, urls, tmp_path = setup
    version = push(control, tmp_path, module, "canary")
    with Load(urls):
        started = rollout(control, version)
        assert started["state"] == "RUNNING" and started["steps"] == [20, 50, 100]
        result = finished(control)
    assert result["state"] == "ROLLED_BACK", result
    assert reason in result["reason"]
    assert result["analyses"][-1]["verdict"] == "FAIL"
    deployment = cli(control, "deployments", token="t-replica")["deployments"][0]
    assert [(v["name"], v.get("weight")) for v in deployment["variants"]] == [("primary", 100)]
    for url in urls:
        np.testing.assert_allclose(_answer(grpcclient.InferenceServerClient(url)), X * 2.0)
    audit = cli(control, "audit", "--action", "Rollouts/Step", token="t-replica")
    assert any("rolled back" in event["detail"] and event["actor"] == "rollout-controller" for event in audit)


def test_a_healthy_canary_walks_every_step_and_is_promoted(setup) -> None:
    control, urls, tmp_path = setup
    version = push(control, tmp_path, Scale(), "canary")
    with Load(urls) as load:
        # A fresh canary's first calls are slower (TorchScript profiles its first runs) and CI machines
        # are noisy: a generous latency slack and two failures in a row, as one would set for such a model.
        rollout(control, version, "--max-p99-slack-ms", "40", "--failure-limit", "2")
        result = finished(control)
    assert result["state"] == "SUCCEEDED", result
    passed_steps = [a.get("step", 0) for a in result["analyses"] if a["verdict"] == "PASS"]
    assert sorted(set(passed_steps)) == [0, 1, 2]  # every step passed an analysis
    assert load.failed == 0
    deployment = cli(control, "deployments", token="t-replica")["deployments"][0]
    assert [(v["name"], v["version"]) for v in deployment["variants"]] == [("primary", version)]
    wait_until(
        lambda: all(
            states == [("scale", "primary", "READY", int(version))] for states in _variant_states(control).values()
        ),
        message="both replicas to serve the promoted version",
    )


def _variant_states(control: ControlProcess) -> dict[str, list[tuple[str, str, str, int]]]:
    replicas = cli(control, "deployments", token="t-replica")["replicas"]
    return {
        replica["replica_id"]: [
            (s["endpoint"], s.get("variant", ""), s["state"], int(s.get("serving", {}).get("version", 0)))
            for s in replica["status"].get("endpoints", [])
        ]
        for replica in replicas
    }


class Triple(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3.0


def test_a_blue_green_switch_under_load_fails_no_request_and_keeps_blue_for_a_rollback(setup) -> None:
    control, urls, tmp_path = setup
    version = push(control, tmp_path, Triple(), "green")
    started = cli(control, "rollout", "blue-green", "scale", f"scale:{version}", "--keep-previous-seconds", "3")
    assert started["strategy"] == "blue_green"

    def green_ready() -> bool:
        return bool(cli(control, "rollout", "status", "scale", token="t-replica").get("green_ready"))

    wait_until(green_ready, message="green READY on both data planes")
    # the preview route: a deployer pins green before the switch; everyone else still gets blue
    preview = grpcclient.InferenceServerClient(urls[0])
    tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
    tensor.set_data_from_numpy(X)
    pinned = preview.infer("scale", [tensor], parameters={"weir_variant": "green"},
                           headers={"authorization": "Bearer t-deployer"})  # fmt: skip
    np.testing.assert_allclose(pinned.as_numpy("OUTPUT__0"), X * 3.0)
    preview.close()
    np.testing.assert_allclose(_answer(grpcclient.InferenceServerClient(urls[1])), X * 2.0)

    with Load(urls) as load:
        cli(control, "rollout", "switch", "scale")
        for url in urls:
            wait_until(
                lambda url=url: np.allclose(_answer(grpcclient.InferenceServerClient(url)), X * 3.0),
                message="green to serve everywhere",
            )
    assert load.failed == 0 and load.ok > 20
    result = finished(control)  # blue retired after keep_previous_seconds
    assert result["state"] == "SUCCEEDED"
    deployment = cli(control, "deployments", token="t-replica")["deployments"][0]
    assert [(v["name"], v["version"]) for v in deployment["variants"]] == [("green", version)]


def test_a_protected_endpoint_switches_only_after_another_principals_approval(setup) -> None:
    control, urls, tmp_path = setup
    cli(control, "flags", "set", "scale", "protected", "true", token="t-admin")
    with pytest.raises(AssertionError, match="PERMISSION_DENIED"):
        cli(control, "flags", "set", "scale", "protected", "", token="t-deployer")  # only admins unprotect
    version = push(control, tmp_path, Triple(), "green")
    cli(control, "rollout", "blue-green", "scale", f"scale:{version}", "--keep-previous-seconds", "1")
    wait_until(
        lambda: bool(cli(control, "rollout", "status", "scale", token="t-replica").get("green_ready")),
        message="green READY on both data planes",
    )
    with pytest.raises(AssertionError, match="waiting for an approver"):
        cli(control, "rollout", "switch", "scale")
    with pytest.raises(AssertionError, match="PERMISSION_DENIED"):
        cli(control, "rollout", "approve", "scale")  # a deployer is not an approver
    with pytest.raises(AssertionError, match="is protected"):
        cli(control, "deploy", "scale", "scale", version)  # no way around the gate for a deployer
    approved = cli(control, "rollout", "approve", "scale", token="t-admin")
    assert approved["approved_by"] == "root"
    cli(control, "rollout", "switch", "scale")
    for url in urls:
        wait_until(
            lambda url=url: np.allclose(_answer(grpcclient.InferenceServerClient(url)), X * 3.0),
            message="green to serve after the approved switch",
        )
    assert finished(control)["state"] == "SUCCEEDED"

    cli(control, "rollout", "blue-green", "scale", "scale:1", token="t-admin")
    with pytest.raises(AssertionError, match="other than the requester 'root'"):
        cli(control, "rollout", "approve", "scale", token="t-admin")
    audit = cli(control, "audit", "--action", "Rollouts/ApproveRollout", token="t-replica")
    assert [(event["actor"], event["result"]) for event in audit] == [
        ("root", "PERMISSION_DENIED"),  # approving one's own rollout
        ("root", "OK"),
        ("ci", "PERMISSION_DENIED"),  # refused by the token check (a deployer is not an approver): audited too
    ]
