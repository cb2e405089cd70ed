"""`weir up` as a new user runs it: from a project directory, with feature data under it.

Feature sources are confined to the control plane's feature root (issue 14, finding 17); under
`weir up` that root is the directory it runs in, so the README's path (build the churn data, apply its
definitions) works, a definitions file outside the project is refused naming the root, and a bad flag
stops the start with a message instead of a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_data import build_training_data

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(240)


def weir(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weir.cli", *args], cwd=project, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_weir_up_confines_features_to_its_directory_and_the_readme_path_works(tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    build_training_data(project / "build" / "churn", rows=200)
    build_training_data(elsewhere, rows=200)
    ready = project / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "weir.cli", "up", "--control-port", "0", "--grpc-port", "0",
         "--metrics-port", "-1", "--ready-file", str(ready)],
        cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None and ready.is_file(), process.stderr.read() if process.stderr else ""
        address = json.loads(ready.read_text())["control_plane"]
        token = ["--control-plane", address, "--token", (project / ".weir" / "admin.token").read_text().strip()]
        applied = weir(project, "features", "apply", "build/churn/features.toml", *token, "--json")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert json.loads(applied.stdout)["feature_services"] == ["churn"]
        refused = weir(project, "features", "apply", str(elsewhere / "features.toml"), *token)
        assert refused.returncode != 0
        assert "feature root" in refused.stderr and str(project.resolve()) in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_weir_up_with_a_bad_webhook_destination_says_so_without_a_traceback(tmp_path: Path) -> None:
    started = weir(tmp_path, "up", "--control-port", "0", "--grpc-port", "0", "--metrics-port", "-1",
                   "--webhook-allow", "not a destination!")  # fmt: skip
    assert started.returncode == 2, started.stderr
    assert "--webhook-allow" in started.stderr and "Traceback" not in started.stderr
