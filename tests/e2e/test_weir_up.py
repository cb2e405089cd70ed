"""`weir up` as a new user runs it: from a project directory, with feature data under it.

Feature sources are confined to the control plane's feature root (issue 14, finding 17); under
`weir up` that root is the directory it runs in, so the README's path (build the churn data, apply its
definitions) works, a definitions file outside the project is refused naming the root, and a bad flag
stops the start with a message instead of a traceback. `--database-url` (SQLite or PostgreSQL),
`--online-store` (Redis) and `--control-metrics-port` reach its control plane (issue 15, item 9).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from training_data import build_training_data

from tests.conftest import ROOT, free_port, start_redis_server, stop_redis_server
from weir_control.store import open_store

pytestmark = pytest.mark.timeout(240)


def weir(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weir.cli", *args], cwd=project, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def start_up(project: Path, *args: str) -> tuple[subprocess.Popen[str], dict]:
    """`weir up` in ``project`` on free ports; returns the process and its ready file's contents."""
    ready = project / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "weir.cli", "up", "--control-port", "0", "--grpc-port", "0", "--metrics-port", "-1",
         "--ready-file", str(ready), *args],
        cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if process.poll() is not None or not ready.is_file():
        process.kill()
        raise AssertionError(process.stderr.read() if process.stderr else "weir up did not start")
    return process, json.loads(ready.read_text())


def test_weir_up_takes_a_database_url_an_online_store_and_a_control_metrics_port(
    store_url: str, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    build_training_data(project / "build" / "churn", rows=200)
    redis_port = free_port()
    redis_server = start_redis_server(redis_port)
    try:
        process, ready = start_up(
            project, "--database-url", store_url, "--online-store", f"redis://127.0.0.1:{redis_port}/0",
            "--control-metrics-port", "0", "--heartbeat-seconds", "0.5",
        )  # fmt: skip
        try:
            token = [
                "--control-plane",
                ready["control_plane"],
                "--token",
                (project / ".weir" / "admin.token").read_text().strip(),
            ]
            applied = weir(project, "features", "apply", "build/churn/features.toml", *token, "--json")
            assert applied.returncode == 0, applied.stdout + applied.stderr
            materialized = weir(project, "features", "materialize", "2020-01-01", "2030-01-01", *token, "--json")
            assert materialized.returncode == 0, materialized.stdout + materialized.stderr
            assert sum(json.loads(materialized.stdout)["written"].values()) == 200  # one row per customer
            online = redis.Redis(port=redis_port)
            try:
                assert online.dbsize() > 0  # the control plane materialized into the Redis it was given
            finally:
                online.close()

            assert ready["heartbeat_seconds"] == 0.5  # the data plane's own setting (it was fixed at 5 s)
            # the control plane's /metrics
            assert isinstance(ready["control_metrics_port"], int) and ready["control_metrics_port"] > 0
            url = f"http://127.0.0.1:{ready['control_metrics_port']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as scraped:
                assert "weir_control_" in scraped.read().decode()
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0

        # the registry lives in the given database, not under the state directory
        assert not (project / ".weir" / "control" / "control.db").exists()
        store = open_store(store_url)
        try:
            revision, definitions = store.feature_definitions()
            assert revision == 1 and "churn" in definitions
        finally:
            store.close()
    finally:
        stop_redis_server(redis_server)


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


def test_weir_up_help_names_its_stores_and_no_flag_it_lacks(tmp_path: Path) -> None:
    shown = weir(tmp_path, "up", "--help")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "--demo" not in text  # it described a flag `weir up` never had
    for flag in ("--database-url", "--online-store", "--control-metrics-port", "--heartbeat-seconds"):
        assert flag in text


def test_weir_up_with_a_bad_heartbeat_says_so_before_starting_anything(tmp_path: Path) -> None:
    started = weir(tmp_path, "up", "--control-port", "0", "--grpc-port", "0", "--metrics-port", "-1",
                   "--heartbeat-seconds", "0")  # fmt: skip
    assert started.returncode == 2, started.stderr
    assert started.stderr.strip() == "weir: error: --heartbeat-seconds: expected more than 0, got 0.0"
