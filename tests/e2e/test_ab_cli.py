"""`weir ab` as a user drives it against a real control plane (issue 15, item 9): outcomes from a
JSON Lines file or standard input in a few calls (one call per outcome took 22 s for 147), a refused
line named by its number, bounded calls and lines; `weir ab status` shows the control arm as the
control (it printed p=0 for it, as if it had been tested).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import ROOT, free_port
from tests.e2e.test_control_plane import CONFIG, TOKENS, ControlProcess, cli, scripted, start_control
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import experiments_pb2, experiments_pb2_grpc

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlProcess]:
    tmp = tmp_path_factory.mktemp("ab-cli")
    running = start_control(tmp / "control", "", free_port())
    try:
        config = tmp / "config.pbtxt"
        config.write_text(CONFIG)
        for factor in (2.0, 3.0):
            cli(running, "models", "push", "scale", str(scripted(tmp, factor)), "--config", str(config))
        yield running
    finally:
        running.process.terminate()
        running.process.wait(timeout=30)


def weir(control: ControlProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weir.cli", *args, "--control-plane", control.address, "--token", "t-deployer"],
        input=stdin, capture_output=True, text=True, timeout=120,
        env={**os.environ, "WEIR_TOKENS": TOKENS, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def start_test(control: ControlProcess, endpoint: str) -> None:
    started = weir(control, "ab", "start", endpoint, "--arm", "control=scale:1:50", "--arm", "treatment=scale:2:50",
                   "--metric", "converted", "--kind", "rate")  # fmt: skip
    assert started.returncode == 0, started.stderr


def test_outcomes_from_a_file_and_from_stdin_in_batches(control: ControlProcess, tmp_path: Path) -> None:
    start_test(control, "checkout")
    path = tmp_path / "outcomes.jsonl"
    lines = [json.dumps({"routing_key": f"user-{index}", "value": int(index % 3 == 0)}) for index in range(2500)]
    path.write_text("\n".join(lines[:1200]) + "\n\n")  # a blank line is skipped
    recorded = weir(control, "ab", "outcome", "checkout", "--file", str(path), "--json")
    assert recorded.returncode == 0, recorded.stderr
    first = json.loads(recorded.stdout)
    assert first["recorded"] == 1200 and sum(first["per_variant"].values()) == 1200
    assert set(first["per_variant"]) == {"control", "treatment"}

    piped = weir(control, "ab", "outcome", "checkout", "--file", "-", stdin="\n".join(lines[1200:]))
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("checkout: 1300 outcomes recorded (control ")

    status = json.loads(weir(control, "ab", "status", "checkout", "--json").stdout)
    assert sum(int(result.get("count", 0)) for result in status["results"]) == 2500
    # attribution is the routing hash's: the same key lands on the same arm as a single RecordOutcome
    one = weir(control, "ab", "outcome", "checkout", "user-7", "1")
    assert one.returncode == 0, one.stderr
    counted = json.loads(weir(control, "ab", "status", "checkout", "--json").stdout)["results"]
    assert sum(int(result.get("count", 0)) for result in counted) == 2501


def test_a_refused_line_is_named_by_its_number(control: ControlProcess, tmp_path: Path) -> None:
    start_test(control, "refusals")
    lines = [json.dumps({"routing_key": f"user-{index}", "value": 1}) for index in range(1600)]
    lines[1499] = json.dumps({"routing_key": "user-1499", "value": 2})  # line 1500: not 0 or 1
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    refused = weir(control, "ab", "outcome", "refusals", "--file", str(path))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        "weir: INVALID_ARGUMENT: --file line 1500: value: expected 0 or 1 for a rate, got 2.0 "
        "(1000 outcomes before line 1001 were recorded, none from there on)"
    )
    status = json.loads(weir(control, "ab", "status", "refusals", "--json").stdout)
    assert sum(int(result.get("count", 0)) for result in status["results"]) == 1000

    for content, expected in (
        ('{"routing_key": "a", "value": 1}\nnot json\n', "--file line 2: expected"),
        ('{"key": "a", "value": 1}\n', "--file line 1: expected"),
        ('{"routing_key": "a", "value": "1"}\n', "--file line 1: expected"),
        ('{"routing_key": "' + "k" * 70_000 + '", "value": 1}\n', "--file line 1: expected at most 65536"),
        ("", "--file: expected JSON Lines of outcomes, got an empty file"),
    ):
        path.write_text(content)
        result = weir(control, "ab", "outcome", "refusals", "--file", str(path))
        assert result.returncode == 1 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    path.write_bytes(b"\xff\xfe\x00binary")
    binary = weir(control, "ab", "outcome", "refusals", "--file", str(path))
    assert binary.returncode == 1 and "not text" in binary.stderr and "Traceback" not in binary.stderr
    missing = weir(control, "ab", "outcome", "refusals", "--file", str(tmp_path / "none.jsonl"))
    assert missing.returncode == 1 and "--file: cannot read" in missing.stderr
    neither = weir(control, "ab", "outcome", "refusals")
    assert neither.returncode == 1 and "expected ROUTING_KEY VALUE, or --file" in neither.stderr


def test_a_call_carries_at_most_10000_outcomes(control: ControlProcess) -> None:
    start_test(control, "bounded")
    with grpc.insecure_channel(control.address) as channel:
        stub = experiments_pb2_grpc.ExperimentsStub(channel)
        request = experiments_pb2.RecordOutcomesRequest(
            endpoint="bounded",
            outcomes=[experiments_pb2.Outcome(routing_key=f"k{index}", value=1) for index in range(10_001)],
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.RecordOutcomes(request, metadata=client_metadata("t-deployer"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "outcomes: expected 1 to 10000 per call, got 10001"
        with pytest.raises(grpc.RpcError) as viewer:
            stub.RecordOutcomes(request, metadata=client_metadata("t-replica"), timeout=30)
        assert viewer.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_ab_status_shows_the_control_arm_as_the_control(control: ControlProcess, tmp_path: Path) -> None:
    start_test(control, "status")
    path = tmp_path / "outcomes.jsonl"
    path.write_text("\n".join(json.dumps({"routing_key": f"u{index}", "value": index % 2}) for index in range(400)))
    assert weir(control, "ab", "outcome", "status", "--file", str(path)).returncode == 0
    shown = weir(control, "ab", "status", "status")
    assert shown.returncode == 0, shown.stderr
    _, control_line, treatment_line = shown.stdout.strip().splitlines()
    assert control_line.startswith("  control: n=") and control_line.endswith("(control)"), control_line
    assert "p=" not in control_line and "diff=" not in control_line
    assert treatment_line.startswith("  treatment: n=") and " p=" in treatment_line, treatment_line
