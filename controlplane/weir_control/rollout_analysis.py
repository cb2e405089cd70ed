"""Canary analysis: what the data planes reported over one interval, and the verdict on it.

Pure functions over the per-stream cumulative counters every attached data plane reports (as
``rollouts.RolloutController`` collects them: live attach streams or every replica's persisted ones):
the interval's totals per replica identity (``interval_totals``), the verdict over them that no single
identity decides alone (``robust_verdict`` / ``judge``), and the feedback labels' accuracy check
(``judge_accuracy``). See ``weir_control.rollouts`` for the thresholds' meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from weir_proto.control.v1 import deployments_pb2, rollouts_pb2

DEFAULT_MAX_ACCURACY_DROP = 0.05
DEFAULT_MIN_LABELLED = 30


@dataclass
class VariantWindow:
    """Counters of one variant summed over replicas (cumulative, as reported)."""

    succeeded: int = 0
    failed: int = 0
    counts: list[int] = field(default_factory=list)
    bounds: list[float] = field(default_factory=list)

    def minus(self, earlier: VariantWindow | None) -> VariantWindow:
        if earlier is None:
            return self
        previous = earlier.counts if len(earlier.counts) == len(self.counts) else [0] * len(self.counts)
        counts = [max(0, now - before) for now, before in zip(self.counts, previous, strict=True)]
        return VariantWindow(
            max(0, self.succeeded - earlier.succeeded), max(0, self.failed - earlier.failed), counts, self.bounds
        )

    @property
    def requests(self) -> int:
        return self.succeeded + self.failed

    def p99_ms(self) -> float:
        """The 99th percentile, interpolated linearly within the bucket holding it, as Prometheus'
        histogram_quantile (the first bucket starts at 0; in the +Inf bucket: the last bound). The
        bucket's upper bound instead made one bucket's difference a verdict: two variants alike with
        their p99 near 10 ms read 10 and 25 ms by chance (limit 10 x 1.5 + 5), and a healthy canary
        was rolled back on noise."""
        total = sum(self.counts)
        if not total or not self.bounds:
            return 0.0
        rank = 0.99 * total
        below = 0
        for index, count in enumerate(self.counts):
            if count and below + count >= rank:
                if index >= len(self.bounds):
                    return self.bounds[-1] * 1000.0
                lower = self.bounds[index - 1] if index else 0.0
                return (lower + (self.bounds[index] - lower) * (rank - below) / count) * 1000.0
            below += count
        return self.bounds[-1] * 1000.0


@dataclass
class Look:
    """What the attached replicas reported for one endpoint at one moment: per (attach stream,
    variant, version) the cumulative counters, and which identity each stream attached as."""

    windows: dict[tuple[str, str, int], VariantWindow] = field(default_factory=dict)
    identities: dict[str, str] = field(default_factory=dict)  # stream -> identity
    labelled: dict[str, tuple[int, int]] = field(default_factory=dict)  # variant -> (right, labelled), cumulative


def labelled_in_interval(now: Look, before: Look, variant: str) -> tuple[int, int]:
    """(answered right, labelled) for one variant between two looks (counters that went back, as after
    a control-plane restart, count from zero)."""
    right, labelled = now.labelled.get(variant, (0, 0))
    right_before, labelled_before = before.labelled.get(variant, (0, 0))
    if labelled < labelled_before or right < right_before:
        return right, labelled
    return right - right_before, labelled - labelled_before


def judge_accuracy(
    verdict: str,
    reason: str,
    canary: tuple[int, int],
    baseline: tuple[int, int],
    thresholds: rollouts_pb2.AnalysisThresholds,
) -> tuple[str, str]:
    """The request counters' verdict, failed when labels show the canary answering worse: its accuracy
    below the baseline's by more than max_accuracy_drop, each variant with min_labelled labels or more.
    Labels are not per replica: this check is applied once, over all of them."""
    (canary_right, canary_labelled), (baseline_right, baseline_labelled) = canary, baseline
    if not canary_labelled and not baseline_labelled:
        return verdict, reason
    # a rollout stored before these thresholds existed has zeros: the defaults
    max_drop = thresholds.max_accuracy_drop or DEFAULT_MAX_ACCURACY_DROP
    min_labelled = thresholds.min_labelled or DEFAULT_MIN_LABELLED
    if min(canary_labelled, baseline_labelled) < min_labelled:
        if verdict == "FAIL":
            return verdict, reason
        return verdict, (
            f"{reason}; accuracy not judged ({canary_labelled} canary and {baseline_labelled} baseline labels, "
            f"fewer than {min_labelled})"
        )
    canary_accuracy, baseline_accuracy = canary_right / canary_labelled, baseline_right / baseline_labelled
    figures = (
        f"accuracy {canary_accuracy:.3f} on {canary_labelled} labels vs baseline {baseline_accuracy:.3f} "
        f"on {baseline_labelled}"
    )
    if canary_accuracy < baseline_accuracy - max_drop:
        return "FAIL", f"{figures} (allowed drop {max_drop:g})"
    if verdict == "FAIL":
        return verdict, reason
    return verdict, f"{reason}; {figures}"


class Stream(Protocol):
    """An attach stream's accepted reports: a live ``attach.ReplicaStream`` or one persisted by any
    replica (``replica_reports.ReportedStream``)."""

    @property
    def stream(self) -> str: ...
    @property
    def identity(self) -> str: ...
    @property
    def info(self) -> deployments_pb2.ReplicaInfo: ...


def collect(replicas: Sequence[Stream], endpoint: str) -> Look:
    look = Look()
    for replica in replicas:
        look.identities[replica.stream] = replica.identity
        for stats in replica.info.status.variants:
            if stats.endpoint == endpoint:
                look.windows[(replica.stream, stats.variant, stats.version)] = VariantWindow(
                    stats.succeeded, stats.failed, list(stats.latency_counts), list(stats.latency_bounds_seconds)
                )
    return look


def interval_totals(now: Look, before: Look) -> dict[str, dict[str, VariantWindow]]:
    """Per identity, per variant: what happened between two looks, summed over that identity's
    streams. A stream absent from the earlier look counts nothing yet (its counters are a starting
    point); a variant version new on a known stream counts from zero (the attach stream bounded its
    growth from when it was sent)."""
    totals: dict[str, dict[str, VariantWindow]] = {}
    for stream, identity in now.identities.items():
        if stream in before.identities:
            totals.setdefault(identity, {})  # attached through the interval: it reports, even nothing
    for (stream, variant, version), window in now.windows.items():
        if stream not in before.identities:
            continue
        earlier = before.windows.get((stream, variant, version))
        if earlier is not None and (window.succeeded < earlier.succeeded or window.failed < earlier.failed):
            continue  # cannot happen through the attach stream (it refuses counters going back)
        delta = window.minus(earlier)
        per_variant = totals.setdefault(now.identities.get(stream, ""), {})
        _add(per_variant.setdefault(variant, VariantWindow(counts=[0] * len(delta.counts), bounds=delta.bounds)), delta)
    return totals


def _add(total: VariantWindow, delta: VariantWindow) -> None:
    total.succeeded += delta.succeeded
    total.failed += delta.failed
    if len(total.counts) == len(delta.counts):
        total.counts = [a + b for a, b in zip(total.counts, delta.counts, strict=True)]
    elif sum(delta.counts) > sum(total.counts):
        total.counts, total.bounds = list(delta.counts), delta.bounds  # histograms of another shape: keep the larger


def combined(
    per_identity: dict[str, dict[str, VariantWindow]], variant: str, leave_out: str | None = None
) -> VariantWindow:
    total = VariantWindow()
    for identity, variants in per_identity.items():
        if identity != leave_out and variant in variants:
            window = variants[variant]
            if not total.counts:
                total.counts, total.bounds = [0] * len(window.counts), window.bounds
            _add(total, window)
    return total


def robust_verdict(
    per_identity: dict[str, dict[str, VariantWindow]],
    canary_variant: str,
    baseline_variant: str,
    thresholds: rollouts_pb2.AnalysisThresholds,
) -> tuple[str, str, VariantWindow, VariantWindow]:
    """The verdict over every identity's reports, kept only when it is the same with any one
    identity's reports left out: no single replica identity decides a rollout alone while others
    are attached (a replica that serves none of the canary's traffic disagrees with one that claims
    it all). With one identity attached (one replica, or a pool sharing one token) its reports
    decide; with several, every all-but-one subset must also serve min_requests and agree."""
    canary, baseline = combined(per_identity, canary_variant), combined(per_identity, baseline_variant)
    verdict, reason = judge(canary, baseline, thresholds)
    reporting = list(per_identity)  # every identity attached through the interval, serving or not
    if len(reporting) < 2:
        return verdict, reason, canary, baseline
    for identity in sorted(reporting):
        without, _ = judge(
            combined(per_identity, canary_variant, identity),
            combined(per_identity, baseline_variant, identity),
            thresholds,
        )
        if without != verdict:
            return (
                "INCONCLUSIVE",
                (
                    f"replicas disagree: {verdict} over all reports but {without} without those of '{identity}' "
                    f"(no single replica identity decides alone; {reason})"
                ),
                canary,
                baseline,
            )
    return verdict, reason, canary, baseline


def judge(
    canary: VariantWindow, baseline: VariantWindow, thresholds: rollouts_pb2.AnalysisThresholds
) -> tuple[str, str]:
    if not canary.requests or canary.requests < thresholds.min_requests:
        return "INCONCLUSIVE", f"the canary served {canary.requests} requests, fewer than {thresholds.min_requests}"
    canary_rate = canary.failed / canary.requests
    baseline_rate = baseline.failed / baseline.requests if baseline.requests else 0.0
    if canary_rate > baseline_rate + thresholds.max_error_rate_increase:
        return "FAIL", (
            f"error rate {canary_rate:.3f} vs baseline {baseline_rate:.3f} "
            f"(allowed +{thresholds.max_error_rate_increase:g})"
        )
    canary_p99, baseline_p99 = canary.p99_ms(), baseline.p99_ms()
    limit = baseline_p99 * thresholds.max_p99_ratio + thresholds.max_p99_slack_ms
    if baseline.requests < thresholds.min_requests:  # e.g. at 100%: its leftovers' p99 is their maximum
        return "PASS", (
            f"error rate {canary_rate:.3f} vs {baseline_rate:.3f}; p99 {canary_p99:.1f} ms not compared "
            f"(the baseline served {baseline.requests} requests, fewer than {thresholds.min_requests})"
        )
    if canary_p99 > limit:
        return "FAIL", f"p99 {canary_p99:.1f} ms vs baseline {baseline_p99:.1f} ms (limit {limit:.1f} ms)"
    return "PASS", f"error rate {canary_rate:.3f} vs {baseline_rate:.3f}; p99 {canary_p99:.1f} vs {baseline_p99:.1f} ms"
