"""`weir features` errors a new user hit (issue 15, item 7), through the real CLI: a missing
`--entities` file was a FileNotFoundError traceback; a feature name that is not a column of the view's
source passed `features validate` and then failed `historical`/`materialize` with DuckDB's
BinderException. Each is now one line naming the flag or the view and the column, exit status 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from training_data import build_training_data  # examples/ (on the path: tests/conftest.py)

from tests.conftest import free_port
from tests.e2e.test_control_plane import cli, start_control


def weir(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weir.cli", *args], capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weir features: "), result.stderr
    return lines[0]


def test_a_missing_entities_file_and_a_wrong_column_are_one_line_errors(tmp_path: Path) -> None:
    definitions, entities = build_training_data(tmp_path / "churn", rows=50)
    missing = tmp_path / "churn" / "no-such-rows.parquet"
    out = str(tmp_path / "out.parquet")
    line = one_line_error(
        weir("features", "historical", str(definitions), "--service", "churn", "--entities", str(missing), "--out", out)
    )
    expected = f"--entities: expected a Parquet file, {missing} does not exist or is not a file"
    assert line == f"weir features: INVALID_ARGUMENT: {expected}"
    line = one_line_error(
        weir("features", "push", str(definitions), "--view", "customer_stats", "--rows", str(missing))
    )
    assert "--rows: expected a Parquet file" in line

    # a feature the source does not have: validate reads the sources' columns, not only the TOML
    wrong = definitions.parent / "wrong.toml"
    wrong.write_text(definitions.read_text().replace("spend_30d", "spend_30days"))
    expected = "feature_view 'customer_stats': expected the column 'spend_30days' (feature) in its source"
    line = one_line_error(weir("features", "validate", str(wrong)))
    assert expected in line and "'spend_30d'" in line, line  # the columns it has, to spot the typo
    assert "FAILED_PRECONDITION" in line
    line = one_line_error(
        weir("features", "historical", str(wrong), "--service", "churn", "--entities", str(entities), "--out", out)
    )
    assert expected in line, line
    line = one_line_error(weir("features", "materialize", str(wrong), "2024-01-01", "2025-01-01"))
    assert expected in line, line
    timestamp = definitions.parent / "timestamp.toml"
    timestamp.write_text(
        definitions.read_text().replace('timestamp_field = "event_timestamp"', 'timestamp_field = "ts"')
    )
    assert "expected the column 'ts' (timestamp_field)" in one_line_error(weir("features", "validate", str(timestamp)))
    # the right file still validates
    assert weir("features", "validate", str(definitions)).returncode == 0


def test_a_wrong_column_through_the_control_plane_names_the_view(tmp_path: Path) -> None:
    definitions, entities = build_training_data(tmp_path / "churn", rows=50)
    wrong = definitions.parent / "wrong.toml"
    wrong.write_text(definitions.read_text().replace("support_tickets", "tickets"))
    control = start_control(
        tmp_path / "control", str(tmp_path / "control.db"), free_port(), "--feature-root", str(tmp_path),
        "--online-store", str(tmp_path / "online.db"),
    )  # fmt: skip
    try:
        cli(control, "features", "apply", str(wrong))
        connection = ("--control-plane", control.address, "--token", "t-deployer")
        out = str(tmp_path / "out.parquet")
        expected = "feature_view 'customer_stats': expected the column 'tickets' (feature) in its source"
        line = one_line_error(
            weir("features", "historical", "--service", "churn", "--entities", str(entities), "--out", out, *connection)
        )
        assert line.startswith("weir features: FAILED_PRECONDITION: ") and expected in line, line
        line = one_line_error(weir("features", "materialize", "2024-01-01", "2025-01-01", *connection))
        assert line.startswith("weir features: FAILED_PRECONDITION: ") and expected in line, line
        missing = tmp_path / "missing.parquet"
        line = one_line_error(
            weir("features", "historical", "--service", "churn", "--entities", str(missing), "--out", out, *connection)
        )
        assert "--entities: expected a Parquet file" in line
    finally:
        control.process.terminate()
        control.process.wait(timeout=30)
