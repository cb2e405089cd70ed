"""The MLOps loop's report (``examples/mlops_loop.py``): one self-contained HTML file (plots inlined as
PNG) with the timeline, the drift charts before and after the retraining, the canary analysis of each
step, each version's held-out accuracy and the retrained version's lineage; and ``report.json`` beside it
with everything the report was made from."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
from pathlib import Path
from typing import Any

SEVERITY_COLOURS = {"NONE": "#2e7d32", "WARNING": "#ef6c00", "CRITICAL": "#c62828"}
ACTORS = ("drift-monitor", "training-runner", "rollout-controller")


def _system(actor: str) -> bool:
    """One of Weir's controllers (a training job starts its canary under its own name)."""
    return actor in ACTORS or actor.startswith("training-job:")


def _seconds(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _png(figure: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{classes[index]}"' if classes and classes[index] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _markers(result: Any) -> list[tuple[float, str, str]]:
    """(time, label, colour) of the transitions the charts mark."""
    marks = [(result.shift_at, "shift", "#6a1b9a")]
    for event in result.events:
        if event.actor == "drift-monitor" and "SubmitRetraining" in event.what:
            marks.append((event.at, "retrain", "#c62828"))
        elif event.actor == "rollout-controller" and ("promoted" in event.what or "rolled back" in event.what):
            marks.append((event.at, "promoted" if "promoted" in event.what else "rolled back", "#1565c0"))
    return marks


def _drift_chart(result: Any) -> str:
    from matplotlib.figure import Figure

    windows = [window for window in result.windows if window.get("features")]
    if not windows:
        return "<p>No window was judged.</p>"
    figure = Figure(figsize=(11, 6.2))
    top, middle, bottom = figure.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 1]})
    origin = result.started
    names = sorted({feature["name"] for window in windows for feature in window["features"]})
    for name in names:
        points = [
            ((_seconds(w["start"]) + _seconds(w["end"])) / 2 - origin, max(feature.get("psi", 0.0), 0.003))
            for w in windows for feature in w["features"] if feature["name"] == name
        ]  # fmt: skip
        style = "--" if name.endswith(".argmax") else "-"
        top.plot(*zip(*points, strict=True), style, marker="o", markersize=3, label=name)
    top.axhline(0.2, color="#c62828", linewidth=0.8, linestyle=":")
    top.axhline(0.1, color="#ef6c00", linewidth=0.8, linestyle=":")
    top.set_yscale("log")
    top.set_ylabel("PSI per window (log)")
    top.legend(fontsize=8, loc="upper left", ncol=3)
    labelled = [w for w in result.windows if int(w.get("concept", {}).get("labelled", 0))]
    if labelled:
        middle.plot(
            [(_seconds(w["start"]) + _seconds(w["end"])) / 2 - origin for w in labelled],
            [w["concept"].get("accuracy", 0.0) for w in labelled],
            marker="o", markersize=3, color="#37474f", label="accuracy on labelled requests",
        )  # fmt: skip
        middle.set_ylim(0.0, 1.02)
        middle.set_ylabel("accuracy")
        middle.legend(fontsize=8, loc="lower left")
    for window in windows:
        start, end = _seconds(window["start"]) - origin, _seconds(window["end"]) - origin
        bottom.axvspan(start, end, color=SEVERITY_COLOURS.get(window.get("severity", "NONE"), "#9e9e9e"), alpha=0.8)
    bottom.set_yticks([])
    bottom.set_ylabel("severity", rotation=0, ha="right", va="center")
    bottom.set_xlabel("seconds since the loop started (green NONE, orange WARNING, red CRITICAL)")
    for at, label, colour in _markers(result):
        for axis in (top, middle, bottom):
            axis.axvline(at - origin, color=colour, linewidth=1.0)
        top.annotate(label, (at - origin, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=8,
                     va="top", ha="right", color=colour)  # fmt: skip
    return _png(figure)


def _histograms(result: Any, feature: str) -> str:
    """The shifted feature against its reference: an unshifted window, the window that retrained, and a
    window against the retrained version's own reference."""
    from matplotlib.figure import Figure

    def pick(predicate: Any) -> dict[str, Any] | None:
        return next((w for w in result.windows if w.get("features") and predicate(w)), None)

    critical = result.critical
    panels = [
        ("before the shift", result.quiet[-1] if result.quiet else None),
        ("the window that retrained", critical),
        ("after: against the new version's reference",
         pick(lambda w: _seconds(w["start"]) > result.reference_after_at) if result.reference_after_at else None),
    ]  # fmt: skip
    panels = [(title, window) for title, window in panels if window is not None]
    if not panels:
        return ""
    figure = Figure(figsize=(11, 2.8))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, window) in zip(axes, panels, strict=True):
        found = next((f for f in window["features"] if f["name"] == feature), None)
        if not found or not found.get("histogram"):
            axis.set_visible(False)
            continue
        histogram = found["histogram"]
        edges = histogram.get("edges", [])
        labels = ["<" + f"{edges[0]:.0f}"] + [f"{edges[i]:.0f}-{edges[i + 1]:.0f}" for i in range(len(edges) - 1)]
        labels.append(">" + f"{edges[-1]:.0f}")
        positions = list(range(len(histogram.get("reference", []))))
        axis.bar(
            [p - 0.2 for p in positions], histogram.get("reference", []), width=0.4, label="reference", color="#90a4ae"
        )
        axis.bar([p + 0.2 for p in positions], histogram.get("current", []), width=0.4, label="window",
                 color=SEVERITY_COLOURS.get(found.get("severity", "NONE"), "#9e9e9e"))  # fmt: skip
        axis.set_xticks(positions, labels[: len(positions)], rotation=60, fontsize=7)
        axis.set_title(
            f"{title}\n{feature}: PSI {found.get('psi', 0.0):.2f}, {found.get('severity', 'NONE')}", fontsize=9
        )
        axis.legend(fontsize=7)
    return _png(figure)


def _accuracy_chart(result: Any) -> str:
    from matplotlib.figure import Figure

    versions = list(result.versions.values())
    figure = Figure(figsize=(7, 2.8))
    axis = figure.subplots()
    positions = list(range(len(versions)))
    axis.bar([p - 0.2 for p in positions], [v.accuracy_before for v in versions], width=0.4, label="before the shift",
             color="#78909c")  # fmt: skip
    axis.bar([p + 0.2 for p in positions], [v.accuracy_after for v in versions], width=0.4, label="after the shift",
             color="#6a1b9a")  # fmt: skip
    axis.set_xticks(positions, [f"v{v.version} ({v.outcome})" for v in versions], fontsize=8)
    axis.set_ylim(0.0, 1.0)
    axis.set_ylabel("held-out accuracy")
    axis.legend(fontsize=8, loc="lower left")
    return _png(figure)


def accuracy_figures(analysis: dict[str, Any]) -> str:
    """The canary's and the baseline's accuracy on the interval's feedback labels as Weir's analysis counted
    them (labels in brackets), and as the client saw every answer."""

    def figure(name: str, count: str = "") -> str:
        value = analysis.get(name)
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" ({analysis[count]})" if count and count in analysis else "")

    weir = f"{figure('canary_accuracy', 'canary_labelled')} / {figure('baseline_accuracy', 'baseline_labelled')}"
    client = f"{figure('labelled_canary_accuracy')} / {figure('labelled_baseline_accuracy')}"
    return f"{weir}; client {client}"


def _canary(rollout: dict[str, Any]) -> str:
    rows, classes = [], []
    for analysis in rollout.get("analyses", []):
        rows.append([
            analysis.get("at", "")[11:19], f"{analysis.get('step', 0)} ({analysis.get('canary_weight', 0)}%)",
            f"{analysis.get('canary_requests', 0)} / {analysis.get('canary_errors', 0)}",
            f"{analysis.get('baseline_requests', 0)} / {analysis.get('baseline_errors', 0)}",
            f"{analysis.get('canary_p99_ms', 0.0):.1f} / {analysis.get('baseline_p99_ms', 0.0):.1f}",
            accuracy_figures(analysis), analysis.get("verdict", ""), analysis.get("reason", ""),
        ])  # fmt: skip
        classes.append(analysis.get("verdict", "").lower())
    state = rollout.get("state", "")
    header = (
        f"<h3>Canary of version {rollout.get('version')}: {html.escape(state)}</h3>"
        f"<p>steps {rollout.get('steps')}, every {rollout.get('interval_seconds', 0):g} s; started by "
        f"<code>{html.escape(rollout.get('started_by', ''))}</code>; {html.escape(rollout.get('reason', ''))}</p>"
    )
    return header + _table(
        ["at (UTC)", "step", "canary requests / errors", "baseline requests / errors", "p99 ms canary / baseline",
         "accuracy canary / baseline (labels)", "verdict", "reason"], rows, classes,
    )  # fmt: skip


def _audit(result: Any) -> str:
    rows, feedback = [], 0
    for event in result.audit:
        if event.get("action") == "Monitoring/RecordFeedback":
            feedback += 1
            continue
        rows.append([
            event.get("at", "")[11:19], event.get("actor", ""), event.get("action", ""), event.get("target", ""),
            event.get("outcome", ""), (event.get("detail") or "")[:120],
        ])  # fmt: skip
    classes = ["system" if _system(str(row[1])) else "" for row in rows]
    note = f"<p>Plus {feedback} <code>Monitoring/RecordFeedback</code> calls (the labels), left out here.</p>"
    return _table(["at (UTC)", "actor", "action", "target", "outcome", "detail"], rows, classes) + note


def render(result: Any) -> str:
    settings = result.settings
    retrained = result.retrained
    shown, first_critical = [], True
    for event in result.events:
        if event.actor == "drift-monitor" and event.what.startswith("window "):
            if "CRITICAL" not in event.what or not first_critical:
                continue  # every window is in the drift charts; the timeline names the first critical one
            first_critical = False
        shown.append(event)
    timeline = _table(
        ["t (s)", "actor", "what"],
        [[f"{event.at - result.started:.1f}", event.actor, event.what] for event in shown],
        ["system" if _system(event.actor) else "" for event in shown],
    )
    accuracy = _table(
        ["version", "training job", "outcome", "held-out accuracy before the shift", "after the shift"],
        [[v.version, v.job, v.outcome, f"{v.accuracy_before:.3f}", f"{v.accuracy_after:.3f}"]
         for v in result.versions.values()],
    )  # fmt: skip
    lineage = ""
    if retrained is not None:
        lineage = (
            f"<h2>Lineage of version {retrained.version}</h2><pre>"
            f"{html.escape(json.dumps(retrained.lineage, indent=2, sort_keys=True))}</pre>"
        )
    critical = result.critical or {}
    summary = (
        f"<p><b>{result.requests}</b> inference requests by entity key (tritonclient, typed path), "
        f"<b>{len(result.failures)}</b> failed; answers per variant: {html.escape(str(result.variants))}. "
        f"Retraining jobs: <b>{html.escape(', '.join(result.retrain_jobs) or 'none')}</b> "
        f"(cool-down {settings.cooldown:g} s); the retrained version was <b>{html.escape(result.outcome)}</b>. "
        f"The loop took {result.finished - result.started:.0f} s ({settings.window_seconds:g} s drift windows, "
        f"at least {settings.min_records} sampled records each; canary steps {list(settings.canary_steps)} every "
        f"{settings.canary_interval:g} s).</p>"
    )
    shift = (
        f"<p>The shift: <code>{html.escape(result.shifted_feature)}</code> moved for every customer, the other "
        f"features stayed; the window from {html.escape(critical.get('start', '?'))} was CRITICAL on "
        f"{html.escape(', '.join(f['name'] for f in critical.get('features', []) if f.get('severity') == 'CRITICAL'))}"
        f" and the drift monitor submitted the retraining.</p>"
    )
    style = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #212121; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #cfd8dc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eceff1; } tr.system td { background: #e3f2fd; } tr.pass td { background: #e8f5e9; }
tr.fail td { background: #ffebee; } tr.inconclusive td { background: #fff8e1; }
pre { background: #f5f5f5; padding: 8px; font-size: 12px; } h2 { border-bottom: 1px solid #cfd8dc; }
"""
    started = datetime.datetime.fromtimestamp(result.started, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Weir: the MLOps loop</title><style>{style}</style></head>
<body>
<h1>Weir: the MLOps loop ({html.escape(started)})</h1>
{summary}
<h2>Timeline</h2>
<p>Every transition after the set-up is made by Weir's own controllers (blue rows): the drift monitor, the
training runner and the rollout controller. The loop only sends traffic and labels and waits.</p>
{timeline}
<h2>Drift</h2>
{shift}
{_drift_chart(result)}
{_histograms(result, result.shifted_feature)}
<h2>Canary analysis</h2>
{"".join(_canary(rollout) for rollout in result.rollouts)}
<h2>Accuracy of each version on held-out customers</h2>
{accuracy}
{_accuracy_chart(result)}
{lineage}
<h2>Audit log</h2>
{_audit(result)}
</body></html>
"""


def write(result: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(result), default=str, indent=1))
    path.write_text(render(result), encoding="utf-8")
