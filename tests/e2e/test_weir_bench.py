"""End to end: `python -m weir.cli bench` as a subprocess against a real `weir serve` (demo
repository, mlp_classifier only), with two worker processes and the server's metrics: closed and
Poisson levels, results.json/results.md/plots, SLO exit statuses 0 and 1, and exit status 2 for a
target that is not on loopback or a model that does not exist; the stage budget of an endpoint's
name on a data plane that follows a control plane (its series are labelled endpoint@variant).

One server serves the module; it only reads the repository, so it serves the session's template copy.
Levels are 1.5 s after 0.5 s of warm-up, so the module stays well under a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, WeirProcess, free_port, start_weir
from tests.e2e.test_control_plane import (
    CONFIG,
    REPLICA_TOKEN,
    TOKENS,
    cli,
    scripted,
    serves_factor,
    start_control,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

MODEL = "mlp_classifier"
BENCH_TIMEOUT_S = 60  # a bench subprocess stops by itself long before; this only catches a hang
SHORT_LEVELS = ("--duration", "1.5", "--warmup", "0.5", "--processes", "2")


@pytest.fixture(scope="module")
def weir(demo_repository_template: Path) -> Iterator[WeirProcess]:
    running = start_weir(demo_repository_template, "--model-control-mode", "explicit", "--load-model", MODEL)
    try:
        yield running
    finally:
        assert running.terminate_and_wait() == 0


def bench(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weir.cli", "bench", *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
    )  # fmt: skip


def metrics_url(weir: WeirProcess) -> str:
    return f"http://127.0.0.1:{weir.metrics_port}/metrics"


def test_closed_loop_levels_with_passing_slos_exit_0(weir: WeirProcess, tmp_path: Path) -> None:
    out = tmp_path / "closed"
    result = bench(
        "--url", weir.grpc_url, "--model", MODEL, "--concurrency", "1,4", *SHORT_LEVELS,
        "--metrics-url", metrics_url(weir), "--slo", "errors<=0", "--slo", "p99<=10s", "--slo", "throughput>=1",
        "--label", "e2e closed", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    progress = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert [line[:5] for line in progress] == ["[1/2]", "[2/2]"] and all("SLO PASS" in line for line in progress)

    results = json.loads((out / "results.json").read_text())
    assert results["slo_passed"] is True and results["exit_status"] == 0
    assert results["settings"]["concurrency"] == [1, 4] and results["settings"]["processes"] == 2
    assert results["target"]["max_batch_size"] == 64
    assert results["target"]["request"]["shapes"] == {"INPUT__0": [1, 256]}
    assert [level["concurrency"] for level in results["levels"]] == [1, 4]
    for level in results["levels"]:
        assert level["succeeded"] > 10 and level["failed"] == 0 and level["errors"] == {} and level["dropped"] == 0
        assert level["throughput_rps"] > 0 and 0 < level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
        assert [outcome["passed"] for outcome in level["slo"]] == [True, True, True]
        budget = level["stage_budget"]
        assert budget is not None and budget["end_to_end"]["count"] > 0 and budget["end_to_end"]["mean_ms"] > 0
        stages = budget["stages"]
        assert set(stages) == {"decode", "queue", "infer", "encode"}
        assert all(stage is not None and stage["mean_ms"] >= 0 for stage in stages.values())
        assert stages["infer"]["share"] > 0 and sum(stage["share"] for stage in stages.values()) <= 1.0 + 1e-6

    markdown = (out / "results.md").read_text()
    assert "weir.cli bench" in markdown and "--concurrency 1,4" in markdown
    assert "| c=1 |" in markdown and "| c=4 |" in markdown and "## Server latency budget" in markdown
    for plot in ("latency_cdf.png", "throughput_p99.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")


def test_poisson_level_with_an_impossible_slo_exits_1(weir: WeirProcess, tmp_path: Path) -> None:
    out = tmp_path / "poisson"
    result = bench(
        "--url", weir.grpc_url, "--model", MODEL, "--mode", "poisson", "--rate", "40", *SHORT_LEVELS,
        "--metrics-url", metrics_url(weir), "--slo", "p50<=1us", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr + result.stdout
    assert "SLO FAIL: p50<=1us" in result.stdout

    results = json.loads((out / "results.json").read_text())
    (level,) = results["levels"]
    assert results["slo_passed"] is False and results["exit_status"] == 1
    assert level["rate"] == 40.0 and level["level"] == "poisson 40/s"
    assert 15 <= level["requests"] <= 150  # 60 expected in 1.5 s
    assert level["failed"] == 0 and level["stage_budget"] is not None
    assert level["slo"] == [{"slo": "p50<=1us", "observed": level["latency_ms"]["p50"], "passed": False}]
    assert level["schedule_lag_ms_max"] >= 0


def test_a_target_off_loopback_is_refused_with_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "refused"
    result = bench("--url", "10.1.2.3:8001", "--model", MODEL, "--out", str(out))
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr and not out.exists()


def test_an_unknown_model_exits_2(weir: WeirProcess, tmp_path: Path) -> None:
    result = bench("--url", weir.grpc_url, "--model", "no_such_model", "--out", str(tmp_path / "unknown"))
    assert result.returncode == 2
    assert "NOT_FOUND" in result.stderr and "no_such_model" in result.stderr


def test_the_stage_budget_of_an_endpoint_behind_a_control_plane_sums_its_variants(tmp_path: Path) -> None:
    """Issue 15, item 8: a data plane following a control plane labels an endpoint's series
    ``endpoint@variant``; `--model ENDPOINT` found no series of that name and skipped the budget."""
    control = start_control(tmp_path / "control", "", free_port())
    data_plane = start_weir(
        tmp_path / "replica", "--model-control-mode", "explicit", "--control-plane", control.address,
        "--replica-id", "bench", "--heartbeat-seconds", "0.5",
        env={"WEIR_TOKENS": TOKENS, "WEIR_CONTROL_PLANE_TOKEN": REPLICA_TOKEN},
    )  # fmt: skip
    try:
        config = tmp_path / "config.pbtxt"
        config.write_text(CONFIG)
        for factor in (2.0, 3.0):
            cli(control, "models", "push", "scale", str(scripted(tmp_path, factor)), "--config", str(config))
        cli(control, "deploy", "scale", "scale", "1")
        wait_until(lambda: serves_factor(data_plane.grpc_url, 2.0), message="version 1 served")
        cli(control, "traffic", "scale", "--variant", "one=scale:1:50", "--variant", "two=scale:2:50")
        wait_until(lambda: serves_factor(data_plane.grpc_url, 3.0), message="version 2 answering too")

        out = tmp_path / "endpoint"
        result = bench(
            "--url", data_plane.grpc_url, "--model", "scale", "--concurrency", "1", *SHORT_LEVELS,
            "--metrics-url", metrics_url(data_plane), "--out", str(out),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr + result.stdout
        (level,) = json.loads((out / "results.json").read_text())["levels"]
        budget = level["stage_budget"]
        assert budget is not None, "no stage budget for the endpoint's name"
        assert all(stage is not None for stage in budget["stages"].values())
        # Both variants' requests are counted: the server's count of the window matches the client's,
        # to within the requests in flight at its two edges (2 processes x 1 slot each).
        assert abs(budget["end_to_end"]["count"] - level["succeeded"]) <= 4, (budget, level["succeeded"])
        assert "## Server latency budget" in (out / "results.md").read_text()
    finally:
        data_plane.terminate_and_wait()
        control.process.terminate()
        control.process.wait(timeout=30)
