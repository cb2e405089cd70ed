"""Release tooling given several control-plane replicas (`--control-plane A,B`) uses the first one
that answers: a replica that is down costs a few seconds, not the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port
from tests.e2e.test_control_plane import start_control


def weir(control_plane: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weir.cli", *args, "--control-plane", control_plane, "--token", "t-deployer", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_command_skips_a_replica_that_is_down(tmp_path: Path) -> None:
    control = start_control(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port())
    try:
        down = f"127.0.0.1:{free_port()}"  # nothing listens there
        listed = weir(f"{down},{control.address}", "models", "list")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert json.loads(listed.stdout) is not None
        # Every replica down: the command says so in one line, no traceback.
        refused = weir(f"{down},127.0.0.1:{free_port()}", "models", "list")
        assert refused.returncode != 0
        assert "UNAVAILABLE" in refused.stdout + refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        control.process.terminate()
        control.process.wait(timeout=30)
