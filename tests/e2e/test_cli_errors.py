"""What a user sees when something goes wrong around the CLI (issue 15, item 7): a port already in use
is one line naming it (not grpc's RuntimeError traceback), output piped into a reader that stopped
(`weir ... | head`) ends quietly (not "[Errno 32] Broken pipe"), and `--log-format text` carries the
fields the JSON lines carry (the model, the request id); and (item 9) `weir deployments` shows why an
endpoint is FAILED without --json; `weir models push` takes a model file of any name.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from tests.conftest import ROOT, free_port
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

pytestmark = pytest.mark.timeout(300)

EXIT_READER_GONE = 141  # 128 + SIGPIPE, as a shell shows a command whose pipe's reader ended


def weir(*args: str, cwd: Path | None = None, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weir.cli", *args], cwd=cwd or ROOT, stdout=stdout, stderr=subprocess.PIPE,
        text=True, timeout=120, env={**os.environ, "WEIR_TOKENS": TOKENS, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process (here: this one) listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


STARTS = {
    "serve gRPC": ["serve", "--model-repository", "{tmp}/repository", "--listen-address", "127.0.0.1",
                   "--grpc-port", "{port}", "--metrics-port", "-1"],
    "serve metrics": ["serve", "--model-repository", "{tmp}/repository", "--listen-address", "127.0.0.1",
                      "--grpc-port", "0", "--metrics-port", "{port}"],
    "serve --workers 2": ["serve", "--model-repository", "{tmp}/repository", "--listen-address", "127.0.0.1",
                          "--grpc-port", "{port}", "--metrics-port", "-1", "--workers", "2"],
    "control gRPC": ["control", "--state-dir", "{tmp}/control", "--port", "{port}"],
    "control metrics": ["control", "--state-dir", "{tmp}/control", "--port", "0", "--metrics-port", "{port}"],
    "up data plane": ["up", "--state-dir", "{tmp}/up", "--control-port", "0", "--grpc-port", "{port}",
                      "--metrics-port", "-1"],
    "up control plane": ["up", "--state-dir", "{tmp}/up", "--control-port", "{port}", "--grpc-port", "0",
                         "--metrics-port", "-1"],
}  # fmt: skip


@pytest.mark.parametrize("start", sorted(STARTS))
def test_a_port_in_use_is_one_line_naming_it(start: str, busy_port: int, tmp_path: Path) -> None:
    (tmp_path / "repository").mkdir()
    args = [item.format(tmp=tmp_path, port=busy_port) for item in STARTS[start]]
    started = weir(*args, "--log-format", "text", cwd=tmp_path)
    assert started.returncode != 0, started.stderr
    assert "Traceback" not in started.stderr and "RuntimeError" not in started.stderr, started.stderr
    last = started.stderr.strip().splitlines()[-1]
    assert last.startswith(f"weir: error: port {busy_port} is in use ("), started.stderr
    assert "another process listens there" in last


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlProcess, list[str]]]:
    """A control plane and a data plane following it, serving endpoint "scale" (version 1, x2) with a
    shadow (version 2) that fails on negative inputs; yields the control plane and the data plane's
    log lines (--log-format text, --log-level debug) and its gRPC address."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    control = start_control(tmp / "control", "", free_port())
    port = free_port()
    data_plane = subprocess.Popen(
        [sys.executable, "-m", "weir.cli", "serve", "--model-repository", str(tmp / "replica"),
         "--listen-address", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "-1",
         "--model-control-mode", "explicit", "--control-plane", control.address, "--replica-id", "text-logs",
         "--heartbeat-seconds", "0.5", "--log-format", "text", "--log-level", "debug"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},
    )  # fmt: skip
    lines: list[str] = []

    def pump() -> None:
        assert data_plane.stderr is not None
        for line in data_plane.stderr:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        wait_until(lambda: any("server started" in line for line in lines), message="the data plane to start")
        config = tmp / "config.pbtxt"
        config.write_text(CONFIG)
        cli(control, "models", "push", "scale", str(scripted(tmp, 2.0)), "--config", str(config))
        refuses = tmp / "refuses" / "model.pt"
        refuses.parent.mkdir()
        torch.jit.save(torch.jit.script(RefusesNegatives()), str(refuses))
        cli(control, "models", "push", "scale", str(refuses), "--config", str(config))
        cli(control, "deploy", "scale", "scale", "1")
        cli(control, "shadow", "start", "scale", "mirror=scale:2", "--percent", "100")
        url = f"127.0.0.1:{port}"
        wait_until(lambda: serves_factor(url, 2.0), message="the endpoint to serve")
        client = grpcclient.InferenceServerClient(url)
        try:  # the shadow's model is loaded (asked over gRPC: the log lines are what the tests check)
            viewer = {"authorization": "Bearer t-replica"}
            wait_until(lambda: client.is_model_ready("scale@mirror", headers=viewer), message="the shadow to load")
        finally:
            client.close()
        yield control, lines, url
    finally:
        data_plane.terminate()
        data_plane.wait(timeout=60)
        control.process.terminate()
        control.process.wait(timeout=30)


class RefusesNegatives(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() < 0):
            raise RuntimeError("negative input")
        return x * 3


def test_text_logs_carry_the_model_and_the_request_id(planes) -> None:  # type: ignore[no-untyped-def]
    _, lines, url = planes
    client = grpcclient.InferenceServerClient(url)
    try:
        data = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
        data.set_data_from_numpy(-np.ones((1, 3), np.float32))
        answer = client.infer("scale", [data], request_id="req-text-42", client_timeout=30)
        assert np.allclose(answer.as_numpy("OUTPUT__0"), -2.0)  # the primary answered; the shadow failed
    finally:
        client.close()

    def failed_line() -> str | None:
        return next((line for line in list(lines) if "shadow request failed" in line), None)

    wait_until(lambda: failed_line() is not None, message="the shadow's failure to be logged")
    line = failed_line()
    assert line is not None
    assert re.search(r"\bDEBUG weir\.shadow: shadow request failed\b", line), line
    assert "request_id=req-text-42" in line and "model=scale@mirror" in line, line
    assert "reason=\"model 'scale@mirror' version 2 failed" in line, line  # a value with spaces: one quoted field
    ready = next(line for line in list(lines) if "model ready" in line and "scale@mirror" in line)
    assert "versions=[2]" in ready or 'versions="[2]"' in ready, ready


def test_output_piped_into_a_reader_that_stopped_ends_quietly(planes) -> None:  # type: ignore[no-untyped-def]
    """`weir rollout status E | head`: the reader may be gone before the command writes. A pipe whose
    read end is closed before the command starts makes that certain."""
    control, _, _ = planes
    token = ["--control-plane", control.address, "--token", "t-deployer"]
    started = weir("rollout", "start", "scale", "scale:1", "--steps", "50,100", "--interval", "3600", *token)
    assert started.returncode == 0, started.stderr
    for command in (
        ["rollout", "status", "scale", *token],
        ["rollout", "status", "scale", *token, "--json"],
        ["deployments", *token],
        ["audit", *token],
        ["models", "list", *token],
        ["models", "show", "scale", "1", *token],
        ["shadow", "status", "scale", *token],
        ["token", "--name", "someone", "--role", "viewer"],
    ):
        reader, writer = os.pipe()
        os.close(reader)
        try:
            ended = weir(*command, stdout=writer)
        finally:
            os.close(writer)
        if command[0] == "token":  # it prints the token file's entry on stderr by design
            assert ended.stderr.startswith("[[token]]") and "Errno" not in ended.stderr, ended.stderr
        else:
            assert ended.stderr == "", (command, ended.stderr)
        assert ended.returncode == EXIT_READER_GONE, (command, ended.returncode, ended.stderr)


def test_a_reader_that_stays_gets_everything(planes) -> None:  # type: ignore[no-untyped-def]
    control, _, _ = planes
    shown = weir("rollout", "status", "scale", "--control-plane", control.address, "--token", "t-deployer")
    assert shown.returncode == 0 and shown.stdout.startswith("scale: "), shown.stdout + shown.stderr


def test_deployments_text_shows_why_an_endpoint_failed(planes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    control, _, _ = planes
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    module = torch.jit.script(Wide())  # loads, but its output is not the 3 values the config declares
    path = tmp_path / "wide" / "model.pt"
    path.parent.mkdir()
    torch.jit.save(module, str(path))
    version = cli(control, "models", "push", "scale", str(path), "--config", str(config))["version"]
    cli(control, "deploy", "broken", "scale", str(version))

    def failed() -> bool:
        listing = cli(control, "deployments")
        return any(
            status.get("endpoint") == "broken" and status.get("state") == "FAILED"
            for replica in listing["replicas"]
            for status in replica.get("status", {}).get("endpoints", [])
        )

    wait_until(failed, message="the data plane to report 'broken' FAILED")
    listing = cli(control, "deployments")
    (message,) = [
        status["message"]
        for replica in listing["replicas"]
        for status in replica["status"]["endpoints"]
        if status["endpoint"] == "broken"
    ]
    shown = weir("deployments", "--control-plane", control.address, "--token", "t-deployer")
    assert shown.returncode == 0, shown.stderr
    (line,) = [line for line in shown.stdout.splitlines() if line.startswith("  broken")]
    assert line.startswith(f"  broken (variant primary) FAILED to load scale:{version} (nothing serves): "), line
    assert " ".join(message.split())[:200] in line, (line, message)


class Wide(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=1)


def test_models_push_takes_any_file_name_and_stores_the_served_one(planes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    control, _, url = planes
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    renamed = tmp_path / "scale-v4.torchscript"
    scripted(tmp_path, 4.0).rename(renamed)
    pushed = weir("models", "push", "scale", str(renamed), "--config", str(config),
                  "--control-plane", control.address, "--token", "t-deployer")  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip().endswith("scale-v4.torchscript stored as model.pt)"), pushed.stdout
    version = pushed.stdout.split(" version ")[1].split(":")[0]
    assert cli(control, "models", "show", "scale", version)["artifact_filename"] == "model.pt"
    cli(control, "deploy", "renamed", "scale", version)
    wait_until(lambda: serves_endpoint(url, "renamed", 4.0), message="the renamed file's version to serve")

    token = ["--config", str(config), "--control-plane", control.address, "--token", "t-deployer"]
    wrong = weir("models", "push", "scale", str(renamed), "--format", "export", *token)
    assert wrong.returncode == 1 and wrong.stderr.strip() == (
        f"weir: --format export: expected that kind of archive, {renamed} is a torchscript archive"
    ), wrong.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    refused = weir("models", "push", "scale", str(notes), *token)  # the control plane refuses it, audited
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1 and last.startswith("weir: INVALID_ARGUMENT: artifact 'model.pt': "), last
    assert "not a TorchScript/torch.export archive" in last and "Traceback" not in refused.stderr


def serves_endpoint(url: str, endpoint: str, factor: float) -> bool:
    client = grpcclient.InferenceServerClient(url)
    try:
        x = np.array([[1.0, 2.0, 3.0]], np.float32)
        data = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
        data.set_data_from_numpy(x)
        answer = client.infer(endpoint, [data], client_timeout=30).as_numpy("OUTPUT__0")
        return bool(np.allclose(answer, x * factor))
    finally:
        client.close()
