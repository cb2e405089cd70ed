"""The drift report files: Markdown with linked PNGs, self-contained HTML, and the words for the empty cases."""

from __future__ import annotations

import base64
import html
import importlib.util
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from weir_control.monitoring import report as drift_report
from weir_proto.control.v1 import monitoring_pb2

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="the plots need matplotlib (the bench extra)"
)

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=5)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUMERIC = ("age", "income", "tenure")
EDGES = [0.0, 10.0, 20.0, 30.0]  # five bins: < 0, [0, 10), ..., >= 30
REFERENCE_SHARES = [0.1, 0.2, 0.4, 0.2, 0.1]


def numeric_feature(name: str, drift: float, severity: monitoring_pb2.Severity) -> monitoring_pb2.FeatureDrift:
    current = [0.1, 0.2 - drift / 2, 0.4 - drift / 2, 0.2 + drift / 2, 0.1 + drift / 2]
    return monitoring_pb2.FeatureDrift(
        name=name,
        role="input",
        count=500,
        psi=0.02 + drift,
        ks_statistic=0.01 + drift / 2,
        ks_p_value=0.9 - drift,
        jensen_shannon=0.03 + drift / 2,
        wasserstein=1.0 + 10 * drift,
        wasserstein_normalized=0.05 + drift,
        severity=severity,
        reasons=["psi 0.42 >= critical 0.2"] if severity == monitoring_pb2.CRITICAL else [],
        histogram=monitoring_pb2.Histogram(edges=EDGES, reference=REFERENCE_SHARES, current=current),
    )


def categorical_feature() -> monitoring_pb2.FeatureDrift:
    return monitoring_pb2.FeatureDrift(
        name="country",
        role="input",
        categorical=True,
        count=500,
        psi=0.01,
        jensen_shannon=0.02,
        chi_square=1.5,
        chi_square_p_value=0.47,
        severity=monitoring_pb2.NONE,
        histogram=monitoring_pb2.Histogram(
            categories=["DE", "FR", "US"], reference=[0.3, 0.3, 0.4], current=[0.32, 0.3, 0.38]
        ),
    )


def window(index: int, *, last: bool) -> monitoring_pb2.DriftWindow:
    start = START + index * WINDOW
    severity = monitoring_pb2.CRITICAL if last else monitoring_pb2.NONE
    features = [
        numeric_feature("age", 0.0, monitoring_pb2.NONE),
        numeric_feature("income", 0.4 if last else 0.01 * index, severity),
        numeric_feature("tenure", 0.01, monitoring_pb2.NONE),
        categorical_feature(),
    ]
    return monitoring_pb2.DriftWindow(
        start=start,
        end=start + WINDOW,
        records=480 + index,
        severity=severity,
        features=features,
        predictions=[
            monitoring_pb2.PredictionDrift(output="label", max_share_change=0.02, severity=monitoring_pb2.NONE)
        ],
        concept=monitoring_pb2.ConceptDrift(
            labelled=120,
            accuracy=0.91 - (0.2 if last else 0.0),
            reference_accuracy=0.92,
            detector_state="drift" if last else "stable",
            severity=severity,
        ),
    )


def full_report(endpoint: str = "fraud/scorer v2") -> monitoring_pb2.DriftReport:
    return monitoring_pb2.DriftReport(
        endpoint=endpoint,
        reference=monitoring_pb2.ReferenceSummary(
            endpoint=endpoint,
            source="training data of version 3",
            rows=10_000,
            numeric_features=list(NUMERIC),
            categorical_features=["country"],
            set_at=START - timedelta(days=1),
        ),
        policy=monitoring_pb2.MonitoringPolicy(
            endpoint=endpoint,
            window_seconds=300,
            min_records=100,
            thresholds={"psi": monitoring_pb2.Thresholds(warning=0.15, critical=0.3)},
            webhook_url="https://hooks.example.com/secret-token",
        ),
        windows=[window(index, last=index == 3) for index in range(4)],
        actions=[
            monitoring_pb2.Action(
                at=START + 4 * WINDOW,
                kind="alert",
                detail="webhook answered 200",
                features=["amount"],
                window=monitoring_pb2.TimeRange(start=START + 3 * WINDOW, end=START + 4 * WINDOW),
            )
        ],
        records_received=1_930,
        records_dropped=12,
    )


def table_after(markdown: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table after a heading, as dictionaries keyed by the header."""
    lines = markdown.splitlines()
    following = lines[lines.index(heading) + 1 :]
    first = next(index for index, line in enumerate(following) if line.startswith("|"))
    table = []
    for line in following[first:]:
        if not line.startswith("|"):
            break
        table.append([re.sub(r"\\(.)", r"\1", cell.strip()) for cell in line.strip("|").split(" | ")])
    header, rows = table[0], table[2:]  # table[1] is the |---| line
    return [dict(zip(header, row, strict=True)) for row in rows]


@needs_matplotlib
def test_full_report_files_tables_and_images(tmp_path: Path) -> None:
    markdown_path, html_path = drift_report.render(full_report(), tmp_path)

    assert markdown_path == tmp_path / "fraud_scorer_v2-drift.md"
    assert html_path == tmp_path / "fraud_scorer_v2-drift.html"
    assert markdown_path.is_file() and html_path.is_file()
    markdown = markdown_path.read_text()

    features = table_after(markdown, "### Features")
    severities = {row["Feature"]: row["Severity"] for row in features}
    assert severities == {"income": "CRITICAL", "age": "NONE", "tenure": "NONE", "country": "NONE"}
    assert features[0]["Feature"] == "income"  # critical first
    country = next(row for row in features if row["Feature"] == "country")
    assert country["Type"] == "categorical" and country["Chi²"] == "1.5" and country["KS stat"] == "—"
    income = next(row for row in features if row["Feature"] == "income")
    assert income["PSI"] == "0.42" and income["Chi²"] == "—"

    assert table_after(markdown, "### Prediction drift") == [
        {"Output": "label", "Largest class share change": "0.02", "Severity": "NONE"}
    ]
    [concept] = table_after(markdown, "### Concept drift")
    assert concept["DDM state"] == "drift" and concept["Severity"] == "CRITICAL"
    assert concept["Accuracy"] == "0.71" and concept["Reference accuracy"] == "0.92"

    thresholds = {row["Statistic"]: row for row in table_after(markdown, "### Thresholds")}
    assert (thresholds["psi"]["Warning"], thresholds["psi"]["Critical"], thresholds["psi"]["Source"]) == (
        "0.15",
        "0.3",
        "policy",
    )
    assert (thresholds["ks"]["Warning"], thresholds["ks"]["Critical"], thresholds["ks"]["Source"]) == (
        "0.05",
        "0.1",
        "default",
    )
    assert thresholds["prediction"]["Critical"] == "0.1"
    assert "training data of version 3, 10,000 rows" in markdown
    assert "1,930 received, 12 dropped" in markdown
    assert "4 kept (4 scored)" in markdown
    assert "webhook answered 200" in markdown
    (action,) = table_after(markdown, "## Actions")
    assert action["Caused by"] == "window 2025-03-01 12:15:00 UTC .. 2025-03-01 12:20:00 UTC: amount", action
    assert "secret-token" not in markdown  # the webhook's address is not printed

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 4 + 4 + 1 + 1  # histograms, statistics over time, severity timeline, accuracy
    for link in links:
        assert link.startswith("fraud_scorer_v2-drift-png/")
        assert (tmp_path / link).read_bytes().startswith(PNG_MAGIC)

    page = html_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page and "@import" not in page and "secret-token" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(links)
    assert all(base64.b64decode(image).startswith(PNG_MAGIC) for image in images)
    assert 'class="sev sev-critical">CRITICAL</td>' in page


@needs_matplotlib
def test_histograms_are_capped_and_stale_plots_removed(tmp_path: Path) -> None:
    drift_report.render(full_report(), tmp_path)
    markdown_path, _ = drift_report.render(full_report(), tmp_path, max_histograms=2)

    markdown = markdown_path.read_text()
    histograms = sorted(path.name for path in (tmp_path / "fraud_scorer_v2-drift-png").glob("histogram-*.png"))
    assert histograms == ["histogram-01-income.png", "histogram-02-tenure.png"]  # the worst two
    assert "The 2 most drifted of 4 features are drawn." in markdown


def test_no_windows_and_no_reference(tmp_path: Path) -> None:
    markdown_path, html_path = drift_report.render(monitoring_pb2.DriftReport(endpoint="../empty"), tmp_path)

    assert markdown_path.parent == tmp_path and markdown_path.name == "empty-drift.md"
    for text in (markdown_path.read_text(), html.unescape(html_path.read_text())):
        assert "No windows yet: no sampled inference records have reached the control plane" in text
        assert "Reference: none is set, so windows cannot be scored" in text
        assert "No actions were taken." in text
        assert "data:image/png" not in text
    thresholds = {row["Statistic"]: row["Source"] for row in table_after(markdown_path.read_text(), "### Thresholds")}
    assert thresholds["psi"] == "default" and thresholds["wasserstein_normalized"] == "not set"
    assert not (tmp_path / "empty-drift-png").exists()


def test_windows_never_scored(tmp_path: Path) -> None:
    report = full_report("small")
    del report.windows[:]
    for index in range(3):
        start = START + index * WINDOW
        report.windows.append(monitoring_pb2.DriftWindow(start=start, end=start + WINDOW, records=10 + index))

    markdown_path, html_path = drift_report.render(report, tmp_path)

    markdown = markdown_path.read_text()
    sentence = "None of the 3 windows was scored: each had fewer records than the policy's minimum of 100"
    assert sentence in markdown and sentence in html.unescape(html_path.read_text())
    assert "### Features" not in markdown
    assert [row["Severity"] for row in table_after(markdown, "## Windows")] == ["NOT SCORED"] * 3


def test_latest_window_unscored_falls_back_to_latest_scored(tmp_path: Path) -> None:
    report = full_report("partial")
    start = START + 4 * WINDOW
    report.windows.append(monitoring_pb2.DriftWindow(start=start, end=start + WINDOW, records=7))

    markdown = drift_report.render(report, tmp_path)[0].read_text()

    assert "The latest window (ending 2025-03-01 12:25:00 UTC, 7 records) was not scored" in markdown
    assert {row["Feature"]: row["Severity"] for row in table_after(markdown, "### Features")}["income"] == "CRITICAL"


def test_without_matplotlib_the_plots_are_skipped_in_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drift_report, "matplotlib_available", lambda: False)

    markdown_path, html_path = drift_report.render(full_report(), tmp_path)

    for text in (markdown_path.read_text(), html_path.read_text()):
        assert "Plots skipped: matplotlib is not installed" in text
        assert "data:image/png" not in text and ".png" not in text
    assert "CRITICAL" in markdown_path.read_text()
