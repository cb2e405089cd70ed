"""README command 1 (`make demo`): examples/run_demo.py brings up `weir up`, pushes and deploys the
demo models with the CLI, infers through the data plane with tritonclient, and stops cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_the_demo_runs_the_release_flow_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "run_demo.py"),
         "--repository", str(tmp_path / "repository"), "--state-dir", str(tmp_path / "weir-up")],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout
    for expected in (
        "mlp_classifier version 1: READY",
        "endpoint mlp_classifier -> mlp_classifier:1",
        "predicted classes",
        "'WEIR SERVES PYTORCH MODELS'",
        "replica weir-up at",
        "mlp_classifier=READY",
        "Deployments/Deploy endpoint/text_stats -> OK",
        "weir up stopped on SIGTERM with exit code 0",
    ):
        assert expected in output, expected
    assert (tmp_path / "weir-up" / "admin.token").stat().st_mode & 0o077 == 0  # the token is private
