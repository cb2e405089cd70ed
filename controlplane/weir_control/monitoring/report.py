"""A DriftReport as files: Markdown (PNG plots linked) and self-contained HTML (PNG plots embedded).

Both documents are rendered from one list of blocks (headings, paragraphs, tables, images), so they
never disagree. matplotlib is imported lazily, only when plots are drawn, and used through its
object-oriented API on the Agg canvas (no pyplot state, no display): safe in a server process.
Without matplotlib the reports are still written, with a sentence saying the plots were skipped.
"""

from __future__ import annotations

import base64
import html
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import timestamp_pb2

from weir_control.monitoring.policy import (
    DEFAULT_COOLDOWN_SECONDS,
    DEFAULT_MAX_WINDOWS,
    DEFAULT_MIN_RECORDS,
    DEFAULT_WINDOW_SECONDS,
)
from weir_control.monitoring.statistics import DEFAULT_THRESHOLDS
from weir_proto.control.v1 import monitoring_pb2

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

UNSPECIFIED = int(monitoring_pb2.SEVERITY_UNSPECIFIED)
NONE = int(monitoring_pb2.NONE)
WARNING = int(monitoring_pb2.WARNING)
CRITICAL = int(monitoring_pb2.CRITICAL)

SEVERITY_TEXT = {UNSPECIFIED: "NOT SCORED", NONE: "NONE", WARNING: "WARNING", CRITICAL: "CRITICAL"}
SEVERITY_COLOUR = {UNSPECIFIED: "#bdbdbd", NONE: "#43a047", WARNING: "#fb8c00", CRITICAL: "#e53935"}
REFERENCE_COLOUR = "#78909c"

THRESHOLD_NAMES = ("psi", "ks", "jsd", "wasserstein_normalized", "prediction")

MAX_HISTOGRAMS = 24  # per-feature histograms drawn: the worst features of the latest scored window
MAX_LINES = 10  # features per statistic-over-time figure: those with the largest values
MAX_TIMELINE_ROWS = 40  # features in the severity timeline: the worst over all windows
MAX_BINS = 40  # categorical bins drawn; the smaller categories are merged into "(other)"
MAX_NAMES = 12  # feature names listed in the reference line
RECENT_WINDOWS = 12  # rows of the windows table
MAX_ACTIONS = 50  # rows of the actions table: the latest
DPI = 90


@dataclass(frozen=True)
class Statistic:
    field: str  # FeatureDrift field
    label: str
    threshold: str  # key of the policy's thresholds
    numeric_only: bool
    slug: str


STATISTICS = (
    Statistic("psi", "PSI", "psi", False, "psi"),
    Statistic("ks_statistic", "KS statistic", "ks", True, "ks"),
    Statistic("jensen_shannon", "Jensen-Shannon distance", "jsd", False, "jsd"),
    Statistic("wasserstein_normalized", "Wasserstein (normalised)", "wasserstein_normalized", True, "wasserstein"),
)


@dataclass(frozen=True)
class Threshold:
    warning: float | None
    critical: float | None
    source: str  # policy, default or not set


# --- blocks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    severity_column: int | None = None


@dataclass(frozen=True)
class Image:
    path: Path
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image


# --- entry point -------------------------------------------------------------------------------------


def render(
    report: monitoring_pb2.DriftReport, out_dir: Path, *, max_histograms: int = MAX_HISTOGRAMS
) -> tuple[Path, Path]:
    """Write ``<endpoint>-drift.md``, ``<endpoint>-drift.html`` and the plots in ``<endpoint>-drift-png/``
    under ``out_dir``; returns the Markdown and HTML paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{safe_name(report.endpoint)}-drift"
    png_dir = out_dir / f"{stem}-png"
    _clear_pngs(png_dir)
    blocks = build_blocks(report, png_dir, max_histograms)
    markdown_path = out_dir / f"{stem}.md"
    markdown_path.write_text(to_markdown(blocks, out_dir), encoding="utf-8")
    html_path = out_dir / f"{stem}.html"
    html_path.write_text(to_html(blocks, f"Drift report: {report.endpoint or '(unnamed endpoint)'}"), encoding="utf-8")
    return markdown_path, html_path


def safe_name(name: str) -> str:
    """A file-name-safe form of an endpoint or feature name (no separators, no leading dots)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "endpoint"


def _clear_pngs(png_dir: Path) -> None:
    """Remove the plots of an earlier rendering, so the folder holds only those the new report links."""
    if png_dir.is_dir():
        for stale in png_dir.glob("*.png"):
            stale.unlink()


def build_blocks(report: monitoring_pb2.DriftReport, png_dir: Path, max_histograms: int) -> list[Block]:
    thresholds = resolve_thresholds(report.policy)
    latest = latest_scored(report.windows)
    blocks: list[Block] = [Heading(1, f"Drift report: {report.endpoint or '(unnamed endpoint)'}")]
    blocks += overview_blocks(report, thresholds)
    blocks += windows_blocks(report, latest)
    if latest is not None:
        blocks += latest_window_blocks(latest, thresholds)
    blocks += plot_blocks(report, latest, thresholds, png_dir, max_histograms)
    blocks += actions_blocks(report.actions)
    return blocks


# --- facts -------------------------------------------------------------------------------------------


def resolve_thresholds(policy: monitoring_pb2.MonitoringPolicy) -> dict[str, Threshold]:
    """The thresholds in force: the policy's, with the defaults for the ones it leaves unset."""
    resolved = {name: _threshold(policy, name) for name in THRESHOLD_NAMES}
    for name in sorted(set(policy.thresholds) - set(THRESHOLD_NAMES)):
        resolved[name] = _threshold(policy, name)
    return resolved


def _threshold(policy: monitoring_pb2.MonitoringPolicy, name: str) -> Threshold:
    """A threshold the policy names is used as given (like the monitor does); the others take the default.
    The source says "default" whenever the values are the defaults (a resolved policy holds them)."""
    default = DEFAULT_THRESHOLDS.get(name)
    if name not in policy.thresholds:
        return Threshold(default[0], default[1], "default") if default else Threshold(None, None, "not set")
    given = (policy.thresholds[name].warning, policy.thresholds[name].critical)
    return Threshold(*given, "default" if given == default else "policy")


def latest_scored(windows: Sequence[monitoring_pb2.DriftWindow]) -> monitoring_pb2.DriftWindow | None:
    for window in reversed(windows):
        if window.severity != UNSPECIFIED:
            return window
    return None


def has_reference(report: monitoring_pb2.DriftReport) -> bool:
    reference = report.reference
    return report.HasField("reference") and bool(
        reference.source or reference.rows or reference.numeric_features or reference.categorical_features
    )


def feature_label(feature: monitoring_pb2.FeatureDrift) -> str:
    return feature.name if feature.role in ("", "input") else f"{feature.name} ({feature.role})"


def drift_score(feature: monitoring_pb2.FeatureDrift, thresholds: dict[str, Threshold]) -> float:
    """How far past its critical thresholds a feature is (the largest ratio): orders features of one severity."""
    ratios = [0.0]
    for statistic in STATISTICS:
        critical = thresholds[statistic.threshold].critical
        if critical and not (statistic.numeric_only and feature.categorical):
            value = float(getattr(feature, statistic.field))
            if math.isfinite(value):
                ratios.append(value / critical)
    return max(ratios)


def worst_first(
    features: Iterable[monitoring_pb2.FeatureDrift], thresholds: dict[str, Threshold]
) -> list[monitoring_pb2.FeatureDrift]:
    return sorted(features, key=lambda f: (-f.severity, -drift_score(f, thresholds), feature_label(f)))


# --- formatting --------------------------------------------------------------------------------------


def as_datetime(timestamp: timestamp_pb2.Timestamp) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)


def fmt_time(timestamp: timestamp_pb2.Timestamp) -> str:
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return "—"
    return as_datetime(timestamp).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_number(value: float, digits: int = 4) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def fmt_threshold(value: float | None) -> str:
    return "—" if value is None else fmt_number(value)


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    parts.append(f"{secs}s" if secs or not any(parts) else "")
    return " ".join(part for part in parts if part)


def fmt_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f", … (+{len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else "")


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def severity_text(severity: int) -> str:
    return SEVERITY_TEXT.get(severity, str(severity))


# --- sections ----------------------------------------------------------------------------------------


def overview_blocks(report: monitoring_pb2.DriftReport, thresholds: dict[str, Threshold]) -> list[Block]:
    items = (
        f"Endpoint: {report.endpoint or '(unnamed endpoint)'}",
        reference_line(report),
        policy_line(report),
        records_line(report),
        windows_line(report.windows),
    )
    rows = tuple(
        (name, fmt_threshold(t.warning), fmt_threshold(t.critical), t.source) for name, t in thresholds.items()
    )
    return [
        Heading(2, "Overview"),
        Bullets(items),
        Heading(3, "Thresholds"),
        Table(("Statistic", "Warning", "Critical", "Source"), rows),
    ]


def reference_line(report: monitoring_pb2.DriftReport) -> str:
    if not has_reference(report):
        return "Reference: none is set, so windows cannot be scored (set one with SetReference)."
    reference = report.reference
    parts = [f"Reference: {reference.source or 'source not described'}, {reference.rows:,} rows"]
    for kind, names in (("numeric", reference.numeric_features), ("categorical", reference.categorical_features)):
        parts.append(f"{plural(len(names), kind + ' feature')}" + (f" ({fmt_names(names)})" if names else ""))
    if reference.HasField("set_at"):
        parts.append(f"set at {fmt_time(reference.set_at)}")
    return "; ".join(parts) + "."


def policy_line(report: monitoring_pb2.DriftReport) -> str:
    policy = report.policy
    window = policy.window_seconds or DEFAULT_WINDOW_SECONDS
    cooldown = policy.cooldown_seconds or DEFAULT_COOLDOWN_SECONDS
    origin = "" if report.HasField("policy") else " (no policy set: defaults)"
    # The webhook's address is not printed: such URLs often carry a secret token.
    webhook = "webhook alert configured" if policy.webhook_url else "no webhook alert"
    retrain = "retraining on" if policy.retrain else "retraining off"
    return (
        f"Policy{origin}: windows of {fmt_duration(window)}, scored from {policy.min_records or DEFAULT_MIN_RECORDS} "
        f"records, {policy.max_windows or DEFAULT_MAX_WINDOWS} scored windows kept; on critical drift: {webhook}, "
        f"{retrain}, {fmt_duration(cooldown)} cooldown between actions."
    )


def records_line(report: monitoring_pb2.DriftReport) -> str:
    received, dropped = report.records_received, report.records_dropped
    offered = received + dropped
    share = f" ({dropped / offered:.1%} of the records sampled)" if dropped and offered else ""
    return f"Records: {received:,} received, {dropped:,} dropped by the replicas{share}."


def windows_line(windows: Sequence[monitoring_pb2.DriftWindow]) -> str:
    if not windows:
        return "Windows: none yet."
    scored = sum(1 for window in windows if window.severity != UNSPECIFIED)
    first, last = windows[0].start, windows[-1].end
    span = (as_datetime(last) - as_datetime(first)).total_seconds()
    return (
        f"Windows: {len(windows)} kept ({scored} scored), from {fmt_time(first)} to {fmt_time(last)} "
        f"({fmt_duration(max(span, 0.0))})."
    )


def windows_blocks(report: monitoring_pb2.DriftReport, latest: monitoring_pb2.DriftWindow | None) -> list[Block]:
    windows = report.windows
    blocks: list[Block] = [Heading(2, "Windows")]
    if not windows:
        return [
            *blocks,
            Paragraph(
                "No windows yet: no sampled inference records have reached the control plane for this endpoint, "
                "so there is nothing to compare with the reference."
            ),
        ]
    if latest is None:
        blocks.append(Paragraph(unscored_sentence(report)))
    elif latest is not windows[-1] and windows[-1].severity == UNSPECIFIED:
        blocks.append(
            Paragraph(
                f"The latest window (ending {fmt_time(windows[-1].end)}, {windows[-1].records:,} records) was not "
                f"scored; the tables below show the latest scored window, ending {fmt_time(latest.end)}."
            )
        )
    recent = windows[-RECENT_WINDOWS:]
    if len(windows) > len(recent):
        blocks.append(Paragraph(f"The latest {len(recent)} of {len(windows)} windows:"))
    rows = tuple(
        (fmt_time(w.start), fmt_time(w.end), f"{w.records:,}", severity_text(w.severity)) for w in reversed(recent)
    )
    blocks.append(Table(("Start", "End", "Records", "Severity"), rows, severity_column=3))
    return blocks


def unscored_sentence(report: monitoring_pb2.DriftReport) -> str:
    windows = report.windows
    count = plural(len(windows), "window")
    if not has_reference(report):
        return f"None of the {count} was scored: no reference is set to compare them with."
    minimum = report.policy.min_records or DEFAULT_MIN_RECORDS
    most = max(window.records for window in windows)
    if most < minimum:
        return (
            f"None of the {count} was scored: each had fewer records than the policy's minimum of {minimum:,} "
            f"(the largest had {most:,}). Drift statistics appear once a window receives enough sampled records."
        )
    return f"None of the {count} has been scored yet (the largest had {most:,} records; the minimum is {minimum:,})."


def latest_window_blocks(window: monitoring_pb2.DriftWindow, thresholds: dict[str, Threshold]) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Latest scored window"),
        Paragraph(
            f"From {fmt_time(window.start)} to {fmt_time(window.end)}: {window.records:,} records, "
            f"severity {severity_text(window.severity)}."
        ),
        Heading(3, "Features"),
    ]
    if window.features:
        blocks.append(feature_table(worst_first(window.features, thresholds)))
    else:
        blocks.append(Paragraph("No feature statistics were computed for this window."))
    blocks += prediction_blocks(window.predictions)
    blocks += concept_blocks(window)
    return blocks


FEATURE_HEADER = (
    "Feature",
    "Role",
    "Type",
    "Count",
    "PSI",
    "KS stat",
    "KS p",
    "JSD",
    "Wasserstein",
    "W. norm",
    "Chi²",
    "Chi² p",
    "Severity",
    "Reasons",
)


def feature_table(features: Sequence[monitoring_pb2.FeatureDrift]) -> Table:
    return Table(FEATURE_HEADER, tuple(feature_row(f) for f in features), severity_column=12)


def feature_row(feature: monitoring_pb2.FeatureDrift) -> tuple[str, ...]:
    numeric = not feature.categorical

    def only(applies: bool, value: float, digits: int = 4) -> str:
        return fmt_number(value, digits) if applies else "—"

    return (
        feature.name,
        feature.role or "input",
        "categorical" if feature.categorical else "numeric",
        f"{feature.count:,}",
        fmt_number(feature.psi),
        only(numeric, feature.ks_statistic),
        only(numeric, feature.ks_p_value, 3),
        fmt_number(feature.jensen_shannon),
        only(numeric, feature.wasserstein),
        only(numeric, feature.wasserstein_normalized),
        only(not numeric, feature.chi_square),
        only(not numeric, feature.chi_square_p_value, 3),
        severity_text(feature.severity),
        "; ".join(feature.reasons) or "—",
    )


def prediction_blocks(predictions: Sequence[monitoring_pb2.PredictionDrift]) -> list[Block]:
    blocks: list[Block] = [Heading(3, "Prediction drift")]
    if not predictions:
        return [*blocks, Paragraph("No prediction drift was measured for this window (no categorical outputs).")]
    ordered = sorted(predictions, key=lambda p: (-p.severity, -p.max_share_change, p.output))
    rows = tuple((p.output, fmt_number(p.max_share_change), severity_text(p.severity)) for p in ordered)
    return [*blocks, Table(("Output", "Largest class share change", "Severity"), rows, severity_column=2)]


def concept_blocks(window: monitoring_pb2.DriftWindow) -> list[Block]:
    blocks: list[Block] = [Heading(3, "Concept drift")]
    concept = window.concept
    if not window.HasField("concept") or concept.labelled == 0:
        return [
            *blocks,
            Paragraph("No labels were recorded for this window's requests, so concept drift was not measured."),
        ]
    row = (
        f"{concept.labelled:,}",
        fmt_number(concept.accuracy),
        fmt_number(concept.reference_accuracy),
        concept.detector_state or "—",
        severity_text(concept.severity),
    )
    header = ("Labelled", "Accuracy", "Reference accuracy", "DDM state", "Severity")
    return [*blocks, Table(header, (row,), severity_column=4)]


def actions_blocks(actions: Sequence[monitoring_pb2.Action]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Actions")]
    if not actions:
        return [*blocks, Paragraph("No actions were taken.")]
    shown = actions[-MAX_ACTIONS:]
    if len(actions) > len(shown):
        blocks.append(Paragraph(f"The latest {len(shown)} of {len(actions)} actions:"))
    rows = tuple((fmt_time(a.at), a.kind, a.detail or "—", _cause(a)) for a in reversed(shown))
    return [*blocks, Table(("Time", "Kind", "Detail", "Caused by"), rows)]


def _cause(action: monitoring_pb2.Action) -> str:
    """The CRITICAL window that caused the action, and its CRITICAL features."""
    if not action.HasField("window"):
        return "—"
    features = ", ".join(action.features[:20]) + (", ..." if len(action.features) > 20 else "")
    return f"window {fmt_time(action.window.start)} .. {fmt_time(action.window.end)}: {features or 'CRITICAL'}"


# --- plots -------------------------------------------------------------------------------------------


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_blocks(
    report: monitoring_pb2.DriftReport,
    latest: monitoring_pb2.DriftWindow | None,
    thresholds: dict[str, Threshold],
    png_dir: Path,
    max_histograms: int,
) -> list[Block]:
    if latest is None:
        return []
    if not matplotlib_available():
        return [Heading(2, "Plots"), Paragraph("Plots skipped: matplotlib is not installed (pip install matplotlib).")]
    blocks: list[Block] = []
    blocks += histogram_blocks(latest, thresholds, png_dir, max_histograms)
    blocks += statistic_blocks(report.windows, thresholds, png_dir)
    blocks += timeline_blocks(report.windows, png_dir)
    blocks += accuracy_blocks(report.windows, png_dir)
    return blocks


def new_figure(width: float, height: float) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def histogram_blocks(
    window: monitoring_pb2.DriftWindow, thresholds: dict[str, Threshold], png_dir: Path, limit: int
) -> list[Block]:
    drawable = [f for f in worst_first(window.features, thresholds) if f.histogram.reference or f.histogram.current]
    if not drawable or limit <= 0:
        return []
    blocks: list[Block] = [Heading(2, "Distributions in the latest scored window")]
    if len(drawable) > limit:
        blocks.append(Paragraph(f"The {limit} most drifted of {len(drawable)} features are drawn."))
    for index, feature in enumerate(drawable[:limit], start=1):
        path = png_dir / f"histogram-{index:02d}-{safe_name(feature.name)}.png"
        blocks.append(Image(draw_histogram(feature, path), f"{feature_label(feature)}: reference vs current"))
    return blocks


def bin_labels(histogram: monitoring_pb2.Histogram, bins: int) -> list[str]:
    """Category names, or the numeric ranges of the bins: the first and the last are open-ended."""
    if histogram.categories:
        labels = [name if len(name) <= 24 else name[:23] + "…" for name in histogram.categories]
    elif histogram.edges:
        edges = [fmt_number(edge, 3) for edge in histogram.edges]
        labels = [f"< {edges[0]}", *(f"[{low}, {high})" for low, high in itertools.pairwise(edges))]
        labels.append(f"≥ {edges[-1]}")
    else:
        labels = []
    return labels if len(labels) == bins else [f"bin {index + 1}" for index in range(bins)]


def histogram_bins(histogram: monitoring_pb2.Histogram) -> tuple[list[str], list[float], list[float]]:
    """Labels and the reference and current shares per bin; past MAX_BINS categories, the smaller ones are merged."""
    bins = max(len(histogram.reference), len(histogram.current))
    reference = list(histogram.reference) + [0.0] * (bins - len(histogram.reference))
    current = list(histogram.current) + [0.0] * (bins - len(histogram.current))
    labels = bin_labels(histogram, bins)
    if bins <= MAX_BINS or not histogram.categories:
        return labels, reference, current
    order = sorted(range(bins), key=lambda i: -max(reference[i], current[i]))
    kept, merged = sorted(order[: MAX_BINS - 1]), order[MAX_BINS - 1 :]
    return (
        [labels[i] for i in kept] + ["(other)"],
        [reference[i] for i in kept] + [sum(reference[i] for i in merged)],
        [current[i] for i in kept] + [sum(current[i] for i in merged)],
    )


def draw_histogram(feature: monitoring_pb2.FeatureDrift, path: Path) -> Path:
    labels, reference, current = histogram_bins(feature.histogram)
    figure, axes = new_figure(max(6.0, min(14.0, 0.35 * len(labels) + 3.0)), 3.8)
    positions = list(range(len(labels)))
    axes.bar([x - 0.2 for x in positions], reference, 0.4, label="reference", color=REFERENCE_COLOUR)
    colour = SEVERITY_COLOUR.get(feature.severity, SEVERITY_COLOUR[UNSPECIFIED])
    axes.bar([x + 0.2 for x in positions], current, 0.4, label="current", color=colour)
    axes.set_xticks(positions)
    rotate = len(labels) > 6 or any(len(label) > 10 for label in labels)
    axes.set_xticklabels(labels, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    axes.set_ylabel("share of records")
    kind = "categorical" if feature.categorical else "numeric"
    axes.set_title(
        f"{feature_label(feature)} ({kind}): {severity_text(feature.severity)}, "
        f"PSI {fmt_number(feature.psi, 3)}, JSD {fmt_number(feature.jensen_shannon, 3)}",
        fontsize=10,
    )
    axes.legend(fontsize=8)
    axes.grid(True, axis="y", alpha=0.3)
    return save(figure, path)


Series = dict[str, tuple[list[datetime], list[float]]]


def statistic_series(windows: Sequence[monitoring_pb2.DriftWindow], statistic: Statistic) -> Series:
    series: Series = {}
    for window in windows:
        if window.severity == UNSPECIFIED:
            continue
        for feature in window.features:
            value = float(getattr(feature, statistic.field))
            skip = feature.severity == UNSPECIFIED or (statistic.numeric_only and feature.categorical)
            if skip or not math.isfinite(value):
                continue
            times, values = series.setdefault(feature_label(feature), ([], []))
            times.append(as_datetime(window.end))
            values.append(value)
    return series


def statistic_blocks(
    windows: Sequence[monitoring_pb2.DriftWindow], thresholds: dict[str, Threshold], png_dir: Path
) -> list[Block]:
    blocks: list[Block] = []
    for statistic in STATISTICS:
        series = statistic_series(windows, statistic)
        if not series:
            continue
        path = png_dir / f"over-time-{statistic.slug}.png"
        blocks.append(Image(draw_statistic(statistic, series, thresholds[statistic.threshold], path), statistic.label))
        if len(series) > MAX_LINES:
            blocks.append(
                Paragraph(
                    f"{statistic.label}: the {MAX_LINES} of {len(series)} features reaching the "
                    "largest values are drawn."
                )
            )
    return [Heading(2, "Statistics over time"), *blocks] if blocks else []


def draw_statistic(statistic: Statistic, series: Series, threshold: Threshold, path: Path) -> Path:
    figure, axes = new_figure(9.0, 4.2)
    shown = sorted(series, key=lambda name: -max(series[name][1]))[:MAX_LINES]
    for name in sorted(shown):
        times, values = series[name]
        marker = "o" if len(times) <= 60 else ""
        axes.plot(date_numbers(times), values, marker=marker, markersize=3, linewidth=1.2, label=name)
    for level, value in (("warning", threshold.warning), ("critical", threshold.critical)):
        if value is not None:
            colour = SEVERITY_COLOUR[WARNING if level == "warning" else CRITICAL]
            axes.axhline(value, linestyle="--", linewidth=1, color=colour, label=f"{level} {fmt_number(value, 3)}")
    format_time_axis(axes)
    axes.set_ylabel(statistic.label)
    axes.set_title(f"{statistic.label} per window", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(figure, path)


def date_numbers(times: Sequence[datetime]) -> list[float]:
    """matplotlib's day numbers for times (its date axis works on these)."""
    from matplotlib.dates import date2num

    return [float(number) for number in date2num(list(times))]


def format_time_axis(axes: Axes) -> None:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator(tz=UTC)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=UTC))
    axes.set_xlabel("window end (UTC)")


TimelineRow = tuple[str, list[int]]


def timeline_rows(windows: Sequence[monitoring_pb2.DriftWindow]) -> tuple[list[TimelineRow], int]:
    """One row of severities per feature (the worst first, capped), per prediction output and for the concept;
    also returns the number of features left out."""
    features: dict[str, list[int]] = {}
    predictions: dict[str, list[int]] = {}
    concept = [UNSPECIFIED] * len(windows)
    for column, window in enumerate(windows):
        for feature in window.features:
            features.setdefault(feature_label(feature), [UNSPECIFIED] * len(windows))[column] = feature.severity
        for prediction in window.predictions:
            predictions.setdefault(prediction.output, [UNSPECIFIED] * len(windows))[column] = prediction.severity
        if window.concept.labelled:
            concept[column] = window.concept.severity
    ranked = sorted(features, key=lambda name: (-max(features[name]), -sum(features[name]), name))
    rows = [(name, features[name]) for name in ranked[:MAX_TIMELINE_ROWS]]
    rows += [(f"prediction: {name}", predictions[name]) for name in sorted(predictions)]
    if any(concept):
        rows.append(("concept (accuracy)", concept))
    return rows, max(0, len(ranked) - MAX_TIMELINE_ROWS)


def timeline_blocks(windows: Sequence[monitoring_pb2.DriftWindow], png_dir: Path) -> list[Block]:
    rows, left_out = timeline_rows(windows)
    if not rows:
        return []
    blocks: list[Block] = [
        Heading(2, "Severity timeline"),
        Image(draw_timeline(windows, rows, png_dir / "severity-timeline.png"), "Severity per window"),
    ]
    if left_out:
        blocks.append(Paragraph(f"{left_out} features that drifted least are left out of the timeline."))
    return blocks


def draw_timeline(windows: Sequence[monitoring_pb2.DriftWindow], rows: list[TimelineRow], path: Path) -> Path:
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    levels = (UNSPECIFIED, NONE, WARNING, CRITICAL)
    colormap = ListedColormap([SEVERITY_COLOUR[level] for level in levels])
    norm = BoundaryNorm([level - 0.5 for level in levels] + [CRITICAL + 0.5], colormap.N)
    figure, axes = new_figure(min(14.0, max(7.0, 0.22 * len(windows) + 4.0)), 0.28 * len(rows) + 1.8)
    edges = 0.5 if len(windows) <= 60 else 0.0  # cell borders would hide narrow cells
    axes.pcolormesh([values for _, values in rows], cmap=colormap, norm=norm, edgecolors="white", linewidth=edges)
    axes.set_yticks([index + 0.5 for index in range(len(rows))])
    axes.set_yticklabels([label for label, _ in rows], fontsize=8)
    axes.invert_yaxis()
    step = max(1, math.ceil(len(windows) / 12))
    columns = list(range(0, len(windows), step))
    axes.set_xticks([column + 0.5 for column in columns])
    axes.set_xticklabels([window_tick(windows, column) for column in columns], rotation=45, ha="right", fontsize=8)
    axes.set_xlabel("window end (UTC)")
    handles = [Patch(color=SEVERITY_COLOUR[level], label=SEVERITY_TEXT[level]) for level in reversed(levels)]
    axes.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.set_title("Severity per window", fontsize=10)
    return save(figure, path)


def window_tick(windows: Sequence[monitoring_pb2.DriftWindow], column: int) -> str:
    span = (as_datetime(windows[-1].end) - as_datetime(windows[0].start)).total_seconds()
    return as_datetime(windows[column].end).strftime("%H:%M" if span < 86400 else "%m-%d %H:%M")


def accuracy_blocks(windows: Sequence[monitoring_pb2.DriftWindow], png_dir: Path) -> list[Block]:
    labelled = [window for window in windows if window.concept.labelled > 0]
    if not labelled:
        return []
    path = draw_accuracy(labelled, png_dir / "concept-accuracy.png")
    return [Heading(2, "Concept drift: accuracy over time"), Image(path, "Accuracy vs reference accuracy")]


def draw_accuracy(windows: Sequence[monitoring_pb2.DriftWindow], path: Path) -> Path:
    figure, axes = new_figure(9.0, 3.8)
    times = date_numbers([as_datetime(window.end) for window in windows])
    axes.plot(times, [w.concept.accuracy for w in windows], color="#1e88e5", linewidth=1.2, label="accuracy")
    axes.plot(
        times,
        [w.concept.reference_accuracy for w in windows],
        color=REFERENCE_COLOUR,
        linestyle="--",
        linewidth=1.2,
        label="reference accuracy",
    )
    colours = [SEVERITY_COLOUR.get(w.concept.severity, SEVERITY_COLOUR[UNSPECIFIED]) for w in windows]
    axes.scatter(times, [w.concept.accuracy for w in windows], c=colours, s=28, zorder=3)
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("accuracy (labelled requests)")
    axes.set_title("Concept drift: accuracy per window (points coloured by severity)", fontsize=10)
    format_time_axis(axes)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    return save(figure, path)


# --- Markdown ----------------------------------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_|<>\[\]])")


def md_escape(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text.replace("\n", " "))


def to_markdown(blocks: Sequence[Block], out_dir: Path) -> str:
    return "\n\n".join(markdown_block(block, out_dir) for block in blocks) + "\n"


def markdown_block(block: Block, out_dir: Path) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {md_escape(block.text)}"
    if isinstance(block, Paragraph):
        return md_escape(block.text)
    if isinstance(block, Bullets):
        return "\n".join(f"- {md_escape(item)}" for item in block.items)
    if isinstance(block, Table):
        return markdown_table(block)
    return f"![{md_escape(block.alt)}]({block.path.relative_to(out_dir).as_posix()})"


def markdown_table(table: Table) -> str:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(md_escape(cell) for cell in cells) + " |"

    lines = [line(table.header), "|" + "|".join("---" for _ in table.header) + "|"]
    return "\n".join(lines + [line(row) for row in table.rows])


# --- HTML --------------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1280px; padding: 0 1em; color: #212121; line-height: 1.45; }
h1 { border-bottom: 2px solid #e0e0e0; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eeeeee; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #e0e0e0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
tr:nth-child(even) td { background: #fafafa; }
td.sev { font-weight: 600; text-align: center; }
td.sev-none { background: #e8f5e9 !important; color: #1b5e20; }
td.sev-warning { background: #fff3e0 !important; color: #e65100; }
td.sev-critical { background: #ffebee !important; color: #b71c1c; }
td.sev-not-scored { background: #eeeeee !important; color: #616161; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eeeeee; }
figcaption { font-size: 12px; color: #616161; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    body = "\n".join(html_block(block) for block in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>\n" + "\n".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "\n</ul>"
    if isinstance(block, Table):
        return html_table(block)
    data = base64.b64encode(block.path.read_bytes()).decode("ascii")
    alt = html.escape(block.alt)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption></figure>'


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table.header)
    rows = [
        "<tr>" + "".join(html_cell(cell, i == table.severity_column) for i, cell in enumerate(row)) + "</tr>"
        for row in table.rows
    ]
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"


def html_cell(text: str, severity: bool) -> str:
    if not severity:
        return f"<td>{html.escape(text)}</td>"
    css = "sev sev-" + text.lower().replace(" ", "-")
    return f'<td class="{html.escape(css)}">{html.escape(text)}</td>'
