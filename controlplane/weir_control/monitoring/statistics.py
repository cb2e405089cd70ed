"""Drift statistics between a reference profile and a window, severities, and a concept-drift detector.

Definitions (so the numbers in a DriftReport mean one thing):

- **PSI** (population stability index) = sum over bins of ``(c - r) * ln(c / r)``, natural log, over the
  reference's decile bins for numeric features and over the union of categories for categorical ones.
  A proportion below ``EPSILON`` (an empty bin) is raised to ``EPSILON`` = 1e-4 first, so a bin the
  reference never saw scores large but finite. Rule of thumb: < 0.1 no change, >= 0.2 significant.
- **Jensen-Shannon distance**: the square root of the JS divergence with log base 2, so 0..1 (what
  ``scipy.spatial.distance.jensenshannon(p, q, base=2)`` returns). It needs no epsilon: the mixture
  is positive wherever either side is.
- **KS**: the two-sample statistic ``D = max |F_ref(x) - F_cur(x)|`` evaluated on both sketches at the
  union of their quantiles on a fine rank grid (the sketches' retained values, in effect). Its p-value
  is scipy's, as ``ks_2samp`` computes it for large samples: ``kstwo.sf(D, round(n*m/(n+m)))``, except
  that ``n`` and ``m`` are *effective* sizes that fold in the sketches' own rank error (see
  ``effective_size``): at tens of thousands of values the KLL error (~0.5% std at k=200) is as large as
  the sampling noise of D, and without it two windows of one distribution would look significantly
  different. The cost: a sketch-based KS cannot resolve D below about 0.01-0.02, under the KS warning
  threshold anyway.
- **Wasserstein-1** = ``integral over u in (0, 1) of |Q_ref(u) - Q_cur(u)| du`` on a midpoint grid of
  the sketches' quantile functions; ``wasserstein_normalized`` divides it by the reference's (population)
  standard deviation, so one threshold fits features of any scale.
- **chi-square**: Pearson's test of independence on the 2 x K table of reference and current counts
  (``scipy.stats.chi2_contingency`` without Yates' correction, so the statistic means the same for every
  K), over the categories, or a numeric feature's decile bins. It is not thresholded (with the
  reference's row count in the table, any real change is significant; PSI and JSD measure *how much*
  changed) but gates CRITICAL, below.

Severity: a statistic ``>= warning`` is WARNING, ``> critical`` is CRITICAL; the feature takes the worst.
KS counts only when its p-value is below ``KS_P_VALUE_GATE`` too: on a small window D is noisy (a
window of 100 values has D ~ 0.1 between two samples of the *same* distribution), and the p-value says
whether D is more than that noise.

PSI, JSD and Wasserstein are gated the same way by the chi-square test on their bins: on windows of a
few hundred records they pass their thresholds on an unchanged feature (PSI ~0.1 on average at 100
records, JSD over 0.1 in most windows of 170). And CRITICAL, which may retrain a model, needs the change
beyond the window's noise at ``CRITICAL_P_VALUE_GATE`` (KS's p-value for KS, the chi-square test's for
the others; Bonferroni-corrected for the features tested), else it stays WARNING: the 5% gate alone let
about one unshifted window in 20 turn CRITICAL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special, stats

from weir_control.monitoring.profiles import OTHER, CategoricalReference, NumericReference, WindowProfile
from weir_proto.control.v1 import monitoring_pb2

EPSILON = 1e-4
KS_P_VALUE_GATE = 0.05
CRITICAL_P_VALUE_GATE = 0.001  # a CRITICAL statistic's change must be this significant (module docstring)
# (warning, critical) per statistic (DESIGN §4); "wasserstein_normalized" only when a policy sets it.
DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {
    "psi": (0.1, 0.2),
    "ks": (0.05, 0.1),
    "jsd": (0.1, 0.2),
    "prediction": (0.05, 0.10),
}
# Ranks at which both sketches are evaluated: finer than the ~600 values a k=200 sketch retains.
RANK_GRID = 2001
# Standard deviations in the sketch's normalized rank error, which DataSketches states at 99% confidence.
_RANK_ERROR_SIGMAS = 2.576


# --- statistics on proportions -----------------------------------------------------------------------


def psi(reference: np.ndarray, current: np.ndarray, epsilon: float = EPSILON) -> float:
    """Population stability index of two proportion vectors over the same bins (natural log)."""
    ref = np.maximum(np.asarray(reference, dtype=np.float64), epsilon)
    cur = np.maximum(np.asarray(current, dtype=np.float64), epsilon)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def jensen_shannon(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen-Shannon distance, log base 2 (0 identical .. 1 disjoint); inputs are normalised first."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(current, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    mixture = (p + q) / 2
    divergence = (special.rel_entr(p, mixture).sum() + special.rel_entr(q, mixture).sum()) / 2
    return float(min(math.sqrt(max(divergence, 0.0) / math.log(2)), 1.0))


# --- statistics on sketches --------------------------------------------------------------------------


def effective_size(sketch: Any) -> float:
    """The sample size whose ECDF noise equals the sketch's: sampling variance F(1-F)/n (at most 1/4n)
    plus the sketch's rank-error variance. Exact below its first compaction (not in estimation mode)."""
    if not sketch.is_estimation_mode():
        return float(sketch.n)
    sigma = sketch.normalized_rank_error(False) / _RANK_ERROR_SIGMAS
    return 1.0 / (1.0 / sketch.n + 4.0 * sigma * sigma)


def ks_from_sketches(reference_sketch: Any, current_sketch: Any) -> tuple[float, float]:
    """Two-sample KS statistic and asymptotic p-value from two KLL sketches (see the module docstring)."""
    if reference_sketch.is_empty() or current_sketch.is_empty():
        return 0.0, 1.0
    ranks = np.linspace(0.0, 1.0, RANK_GRID).tolist()
    points = np.unique(np.concatenate([reference_sketch.get_quantiles(ranks), current_sketch.get_quantiles(ranks)]))
    # inclusive: F(x) = P(X <= x), the right-continuous ECDF whose jumps are at the retained values.
    split_points = points.tolist()
    reference_cdf = np.asarray(reference_sketch.get_cdf(split_points, inclusive=True))[:-1]
    current_cdf = np.asarray(current_sketch.get_cdf(split_points, inclusive=True))[:-1]
    statistic = float(np.max(np.abs(reference_cdf - current_cdf)))
    n, m = effective_size(reference_sketch), effective_size(current_sketch)
    size = max(1, round(n * m / (n + m)))
    return statistic, float(np.clip(stats.kstwo.sf(statistic, size), 0.0, 1.0))


def wasserstein_from_sketches(reference_sketch: Any, current_sketch: Any) -> float:
    """Wasserstein-1 distance: the mean |Q_ref(u) - Q_cur(u)| over a midpoint grid of ranks."""
    if reference_sketch.is_empty() or current_sketch.is_empty():
        return 0.0
    ranks = ((np.arange(RANK_GRID - 1) + 0.5) / (RANK_GRID - 1)).tolist()
    reference_quantiles = np.asarray(reference_sketch.get_quantiles(ranks))
    current_quantiles = np.asarray(current_sketch.get_quantiles(ranks))
    return float(np.mean(np.abs(reference_quantiles - current_quantiles)))


# --- per-feature scores ------------------------------------------------------------------------------


@dataclass
class FeatureScores:
    """The statistics of one feature in one window: the FeatureDrift message less role and severity.
    Statistics that do not apply to the feature's kind stay 0 (KS/Wasserstein for categorical features,
    chi-square for numeric ones), as in the message."""

    name: str
    categorical: bool
    count: int
    psi: float = 0.0
    ks_statistic: float = 0.0
    ks_p_value: float = 0.0
    jensen_shannon: float = 0.0
    wasserstein: float = 0.0
    wasserstein_normalized: float = 0.0
    chi_square: float = 0.0
    chi_square_p_value: float = 0.0
    histogram_edges: list[float] = field(default_factory=list)
    histogram_categories: list[str] = field(default_factory=list)
    histogram_reference: list[float] = field(default_factory=list)
    histogram_current: list[float] = field(default_factory=list)

    @property
    def histogram(self) -> monitoring_pb2.Histogram:
        return monitoring_pb2.Histogram(
            edges=self.histogram_edges,
            categories=self.histogram_categories,
            reference=self.histogram_reference,
            current=self.histogram_current,
        )

    def to_proto(self, role: str, severity: int, reasons: list[str]) -> monitoring_pb2.FeatureDrift:
        return monitoring_pb2.FeatureDrift(
            name=self.name,
            role=role,
            categorical=self.categorical,
            count=self.count,
            psi=self.psi,
            ks_statistic=self.ks_statistic,
            ks_p_value=self.ks_p_value,
            jensen_shannon=self.jensen_shannon,
            wasserstein=self.wasserstein,
            wasserstein_normalized=self.wasserstein_normalized,
            chi_square=self.chi_square,
            chi_square_p_value=self.chi_square_p_value,
            severity=monitoring_pb2.Severity.ValueType(severity),
            reasons=reasons,
            histogram=self.histogram,
        )


def score_numeric(name: str, reference: NumericReference, window: WindowProfile) -> FeatureScores:
    """PSI and JSD over the reference's decile bins, KS and Wasserstein from the sketches. A window
    without a value of the feature gets count 0 and zero statistics (callers skip it by min_records)."""
    count = window.numeric_count(name)
    scores = FeatureScores(
        name=name,
        categorical=False,
        count=count,
        histogram_edges=reference.edges.tolist(),
        histogram_reference=reference.proportions.tolist(),
    )
    current = window.bin_proportions(name, reference.edges)
    scores.histogram_current = current.tolist()
    if count == 0 or reference.count == 0:
        return scores
    scores.psi = psi(reference.proportions, current)
    scores.jensen_shannon = jensen_shannon(reference.proportions, current)
    scores.chi_square, scores.chi_square_p_value = chi_square_test(
        np.rint(reference.proportions * reference.count), np.rint(current * count)
    )
    sketch = window.numeric_sketch(name)
    scores.ks_statistic, scores.ks_p_value = ks_from_sketches(reference.sketch, sketch)
    scores.wasserstein = wasserstein_from_sketches(reference.sketch, sketch)
    # A constant reference has no scale to normalise by: the raw distance is the honest number.
    scores.wasserstein_normalized = scores.wasserstein / reference.std if reference.std > 0 else scores.wasserstein
    return scores


def current_categories(reference: CategoricalReference, window: WindowProfile, name: str) -> dict[str, int]:
    """The window's counts in the reference's terms: when the reference folded its rare categories into
    ``OTHER``, a category it does not name is one of those, so it is counted as ``OTHER`` too."""
    counts = window.category_counts(name)
    if OTHER not in reference.proportions:
        return counts
    folded: dict[str, int] = {}
    for text, n in counts.items():
        key = text if text in reference.proportions else OTHER
        folded[key] = folded.get(key, 0) + n
    return folded


def category_order(reference: Mapping[str, float], current: Mapping[str, int]) -> list[str]:
    """The reference's categories, most frequent first, then the new ones, most frequent first."""
    known = sorted(reference, key=lambda text: (-reference[text], text))
    new = sorted((text for text in current if text not in reference), key=lambda text: (-current[text], text))
    return known + new


def chi_square_test(reference_counts: np.ndarray, current_counts: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-square test of independence on the 2 x K table; (0, 1) when there is nothing to
    test (one category, or an empty row). Categories empty on both sides are dropped: their expected
    frequency would be 0."""
    table = np.vstack([reference_counts, current_counts])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    result = stats.chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


def score_categorical(name: str, reference: CategoricalReference, window: WindowProfile) -> FeatureScores:
    """PSI and JSD over the union of categories, and the chi-square test; KS/Wasserstein stay 0."""
    counts = current_categories(reference, window, name)
    total = sum(counts.values())
    categories = category_order(reference.proportions, counts)
    reference_shares = np.array([reference.proportions.get(text, 0.0) for text in categories])
    current_shares = np.array([counts.get(text, 0) / total if total else 0.0 for text in categories])
    scores = FeatureScores(
        name=name,
        categorical=True,
        count=total,
        histogram_categories=categories,
        histogram_reference=reference_shares.tolist(),
        histogram_current=current_shares.tolist(),
    )
    if total == 0 or reference.count == 0:
        return scores
    scores.psi = psi(reference_shares, current_shares)
    scores.jensen_shannon = jensen_shannon(reference_shares, current_shares)
    reference_counts = np.rint(reference_shares * reference.count)
    current_counts = np.array([counts.get(text, 0) for text in categories], dtype=np.float64)
    scores.chi_square, scores.chi_square_p_value = chi_square_test(reference_counts, current_counts)
    return scores


def prediction_share_change(reference: CategoricalReference, window: WindowProfile, name: str) -> float:
    """The largest absolute change of one class's share between the reference and the window (0..1)."""
    counts = current_categories(reference, window, name)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    classes = set(reference.proportions) | set(counts)
    return max(abs(counts.get(text, 0) / total - reference.proportions.get(text, 0.0)) for text in classes)


# --- severity ----------------------------------------------------------------------------------------


def level(value: float, bounds: tuple[float, float]) -> int:
    """NONE, WARNING (value >= warning) or CRITICAL (value > critical) for one statistic."""
    warning, critical = bounds
    if value > critical:
        return int(monitoring_pb2.CRITICAL)
    if value >= warning:
        return int(monitoring_pb2.WARNING)
    return int(monitoring_pb2.NONE)


def _reason(statistic: str, value: float, bounds: tuple[float, float], severity: int) -> str:
    if severity == monitoring_pb2.CRITICAL:
        return f"{statistic} {value:.3g} > {bounds[1]:g}"
    return f"{statistic} {value:.3g} >= {bounds[0]:g}"


def severity(
    scores: FeatureScores, thresholds: Mapping[str, tuple[float, float]], features_tested: int = 1
) -> tuple[int, list[str]]:
    """The feature's severity (``monitoring_pb2.Severity``) and one reason per statistic that crossed
    its warning threshold, e.g. ``"psi 0.31 > 0.2"``. Thresholds without a per-feature statistic
    ("prediction") are ignored; KS is gated by its p-value (module docstring), Bonferroni-corrected for
    the ``features_tested`` in the window as Alibi Detect does: without it, each of 20 unchanged
    features would raise a false alarm in 5% of windows."""
    values = {}
    if scores.chi_square_p_value < KS_P_VALUE_GATE / max(1, features_tested):  # the binned statistics' gate
        values = {"psi": scores.psi, "jsd": scores.jensen_shannon}
        if not scores.categorical:
            values["wasserstein_normalized"] = scores.wasserstein_normalized
    if not scores.categorical and scores.ks_p_value < KS_P_VALUE_GATE / max(1, features_tested):
        values["ks"] = scores.ks_statistic
    worst = int(monitoring_pb2.NONE)
    reasons: list[str] = []
    gate = CRITICAL_P_VALUE_GATE / max(1, features_tested)
    for statistic, value in values.items():
        bounds = thresholds.get(statistic)
        if bounds is None:
            continue
        found = level(value, bounds)
        significance = scores.ks_p_value if statistic == "ks" else scores.chi_square_p_value
        if found == monitoring_pb2.CRITICAL and significance >= gate:
            found = int(monitoring_pb2.WARNING)  # past the threshold, not beyond the window's noise
            reasons.append(f"{statistic} {value:.3g} > {bounds[1]:g} but p={significance:.2g} >= {gate:.2g}")
            worst = max(worst, found)
            continue
        if found != monitoring_pb2.NONE:
            reason = _reason(statistic, value, bounds, found)
            reasons.append(f"{reason} (p={scores.ks_p_value:.2g})" if statistic == "ks" else reason)
            worst = max(worst, found)
    return worst, reasons


# --- concept drift -----------------------------------------------------------------------------------

STABLE, WARNING_STATE, DRIFT = "stable", "warning", "drift"
NORMAL_APPROXIMATION_COUNT = 5


class DDM:
    """Drift Detection Method (Gama, Medas, Castillo and Rodrigues, 2004) on a stream of prediction
    errors. The error count is binomial, so after ``i`` labels the error rate ``p`` has standard
    deviation ``s = sqrt(p (1 - p) / i)``. The detector remembers ``p_min`` and ``s_min`` where
    ``p + s`` was lowest and signals a warning when ``p + s > p_min + warning_level * s_min`` and drift
    when ``p + s > p_min + drift_level * s_min``; on drift it forgets everything and learns the new
    concept's error rate afresh, as in the paper. No decision is taken before the error count is
    roughly normal (``_normal_enough``)."""

    def __init__(self, min_samples: int = 30, warning_level: float = 2.0, drift_level: float = 3.0) -> None:
        self.min_samples = min_samples
        self.warning_level = warning_level
        self.drift_level = drift_level
        self.state = STABLE
        self._reset()

    def _reset(self) -> None:
        self.samples = 0
        self.errors = 0
        self.p_min = math.inf
        self.s_min = math.inf

    @property
    def error_rate(self) -> float:
        return self.errors / self.samples if self.samples else 0.0

    def _normal_enough(self) -> bool:
        """Whether the binomial error count is close enough to normal for ``p +- s`` to mean anything:
        ``min_samples`` labels, as in the paper, and the usual rule of thumb of at least
        ``NORMAL_APPROXIMATION_COUNT`` errors and as many successes. Without the latter, a minimum taken
        from 1 error in 30 (or 0, where s = 0) makes the next few errors look like drift: on a stable
        10% (1%) error stream of 5000 labels the paper's rule alone signals drift in ~45% (~60%) of
        streams, this one in ~30% (~18%), with the same delay on a real change. False alarms over long
        stable streams remain a property of DDM (its minimum is taken over a noisy path)."""
        return (
            self.samples >= self.min_samples
            and self.errors >= NORMAL_APPROXIMATION_COUNT
            and self.samples - self.errors >= NORMAL_APPROXIMATION_COUNT
        )

    def update(self, error: bool) -> str:
        """Adds one prediction's outcome (True: wrong) and returns the state: stable, warning or drift."""
        self.samples += 1
        self.errors += int(error)
        p = self.error_rate
        s = math.sqrt(p * (1.0 - p) / self.samples)
        if not self._normal_enough():
            self.state = STABLE
            return self.state
        if p + s <= self.p_min + self.s_min:
            self.p_min, self.s_min = p, s
        if p + s > self.p_min + self.drift_level * self.s_min:
            self.state = DRIFT
            self._reset()
        elif p + s > self.p_min + self.warning_level * self.s_min:
            self.state = WARNING_STATE
        else:
            self.state = STABLE
        return self.state

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state (infinities, before the first decision, as None)."""
        return {
            "min_samples": self.min_samples,
            "warning_level": self.warning_level,
            "drift_level": self.drift_level,
            "state": self.state,
            "samples": self.samples,
            "errors": self.errors,
            "p_min": None if math.isinf(self.p_min) else self.p_min,
            "s_min": None if math.isinf(self.s_min) else self.s_min,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DDM:
        """The detector ``to_dict`` saved; missing keys take their defaults (``from_dict({})`` is a new one)."""
        fresh = cls()
        detector = cls(
            int(data.get("min_samples", fresh.min_samples)),
            float(data.get("warning_level", fresh.warning_level)),
            float(data.get("drift_level", fresh.drift_level)),
        )
        detector.state = str(data.get("state", STABLE))
        detector.samples = int(data.get("samples", 0))
        detector.errors = int(data.get("errors", 0))
        p_min, s_min = data.get("p_min"), data.get("s_min")
        detector.p_min = math.inf if p_min is None else float(p_min)
        detector.s_min = math.inf if s_min is None else float(s_min)
        return detector
