"""Feedback labels land in the window of the request they label (issue 15, item 5), end to end:
`weir control` + a following `weir serve` sampling every request, labels sent with `weir drift feedback`.
A label sent before its request's record reached the control plane is held and matched when the record
comes (not "unmatched"); labels for requests of a window that has closed update that window's concept
drift at once, without new traffic, and no other window's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.e2e.test_control_plane import ControlProcess, cli, wait_until
from tests.e2e.test_drift import (
    CONFIG,
    TwoClass,
    _next_window,
    _ready,
    deploy_scorer,
    monitoring,
    planes,
    report,
    rows,
    send,
)
from weir_proto.control.v1 import monitoring_pb2

__all__ = ["planes"]  # the fixture: a control plane and a replica following it
WINDOW_SECONDS = 3.0


def feedback(control: ControlProcess, tmp_path: Path, name: str, labels: dict[str, int]) -> dict:
    """`weir drift feedback ENDPOINT --file LABELS.jsonl`."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"request_id": key, "label": value}) + "\n" for key, value in labels.items()))
    return cli(control, "drift", "feedback", "scorer", "--file", str(path))


def counts(answer: dict) -> tuple[int, int, int]:
    """(matched, unmatched, held) of a RecordFeedbackResponse as JSON (int64 are strings, zeros left out)."""
    return tuple(int(answer.get(name, 0)) for name in ("matched", "unmatched", "held"))  # type: ignore[return-value]


def window_starting(control: ControlProcess, start: float) -> monitoring_pb2.DriftWindow | None:
    for window in report(control).windows:
        if abs(window.start.ToNanoseconds() / 1e9 - start) < 1e-3:
            return window
    return None


@pytest.fixture
def served(planes: tuple[ControlProcess, str], tmp_path: Path) -> Iterator[tuple[ControlProcess, str]]:
    control, url = planes
    deploy_scorer(control, url, tmp_path)
    policy = monitoring_pb2.MonitoringPolicy(endpoint="scorer", window_seconds=WINDOW_SECONDS, min_records=10)
    monitoring(control, "SetMonitoringPolicy", policy)
    yield control, url


def test_labels_count_in_their_requests_window_late_ones_without_new_traffic_early_ones_held(
    served: tuple[ControlProcess, str], tmp_path: Path
) -> None:
    control, url = served
    data = rows(40, seed=3)

    # labels for requests of a window that has closed: that window's concept drift, at once
    start = _next_window()
    predicted = send(url, data, "late")
    wait_until(lambda: (w := window_starting(control, start)) is not None and w.records == 40, 30, "closed window")
    assert window_starting(control, start).concept.labelled == 0  # type: ignore[union-attr]
    labels = {f"late-{index}": answer if index % 4 else 1 - answer for index, answer in enumerate(predicted)}
    answer = feedback(control, tmp_path, "late", labels)
    assert counts(answer) == (40, 0, 0), answer

    def updated() -> bool:
        concept = window_starting(control, start).concept  # type: ignore[union-attr]
        return concept.labelled == 40

    wait_until(updated, 30, "the closed window's labels")  # no traffic since: nothing else closes a window
    again = feedback(control, tmp_path, "late", labels)  # a resent file counts once
    assert counts(again) == (0, 0, 0) and int(again["duplicate"]) == 40, again
    concept = window_starting(control, start).concept  # type: ignore[union-attr]
    assert concept.accuracy == pytest.approx(30 / 40), concept
    windows = report(control).windows
    assert sum(window.concept.labelled for window in windows) == 40, windows  # that window's only

    # labels sent before their requests' records reached the control plane: held, then matched
    early = rows(20, seed=4)
    ids = [f"early-{index}" for index in range(20)]
    answer = feedback(control, tmp_path, "early", dict.fromkeys(ids, 1))
    assert counts(answer) == (0, 0, 20), answer
    assert report(control).labels_held == 20
    second = _next_window()
    predicted = send(url, early, "early")
    wait_until(lambda: (w := window_starting(control, second)) is not None and w.records == 20, 30, "early window")
    late_report = report(control)
    assert (late_report.labels_held, late_report.labels_unmatched) == (0, 0), late_report
    concept = window_starting(control, second).concept  # type: ignore[union-attr]
    assert concept.labelled == 20 and concept.accuracy == pytest.approx(np.mean(np.array(predicted) == 1)), concept
    assert window_starting(control, start).concept.labelled == 40  # type: ignore[union-attr]


def test_the_concept_baseline_follows_the_serving_version(planes: tuple[ControlProcess, str], tmp_path: Path) -> None:
    """A promotion (here a deploy) of a version with another registered accuracy: the windows' reference
    accuracy is the serving version's (it stayed the first version's for ever)."""
    control, url = planes
    model = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(TwoClass()), str(model))
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    for accuracy in ("0.9", "0.6"):
        cli(
            control,
            "models",
            "push",
            "scorer",
            str(model),
            "--config",
            str(config),
            "--metric",
            f"val_accuracy={accuracy}",
        )
    cli(control, "deploy", "scorer", "scorer", "1")
    wait_until(lambda: _ready(url), 60, "the endpoint served")
    policy = monitoring_pb2.MonitoringPolicy(endpoint="scorer", window_seconds=WINDOW_SECONDS, min_records=10)
    monitoring(control, "SetMonitoringPolicy", policy)

    def labelled_window(prefix: str, seed: int) -> monitoring_pb2.ConceptDrift:
        start = _next_window()
        predicted = send(url, rows(30, seed=seed), prefix)
        wait_until(lambda: (w := window_starting(control, start)) is not None and w.records == 30, 30, "closed")
        answer = feedback(control, tmp_path, prefix, {f"{prefix}-{i}": label for i, label in enumerate(predicted)})
        assert counts(answer) == (30, 0, 0), answer
        wait_until(lambda: window_starting(control, start).concept.labelled == 30, 30, "labelled")  # type: ignore[union-attr]
        return window_starting(control, start).concept  # type: ignore[union-attr]

    first = labelled_window("first", 5)
    assert first.reference_accuracy == pytest.approx(0.9) and first.accuracy == 1.0, first
    cli(control, "deploy", "scorer", "scorer", "2")
    second = labelled_window("second", 6)
    assert second.reference_accuracy == pytest.approx(0.6), second


def test_labels_before_the_endpoints_first_record_are_held(planes: tuple[ControlProcess, str], tmp_path: Path) -> None:
    """A just deployed endpoint without a policy: labels sent before its first request are held (they
    answered NOT_FOUND) and matched when the requests' records come."""
    control, url = planes
    deploy_scorer(control, url, tmp_path)
    answer = feedback(control, tmp_path, "first", {f"first-{index}": 0 for index in range(5)})
    assert counts(answer) == (0, 0, 5), answer
    send(url, rows(5, seed=8), "first")
    wait_until(lambda: report(control).records_received == 5 and not report(control).labels_held, 30, "matched")
    assert report(control).labels_unmatched == 0
