"""Reference and window profiles: bounded summaries of feature values that drift statistics compare.

A ``ReferenceProfile`` summarises what a model is compared with (its training data, a Parquet
dataset, or a traffic window); a ``WindowProfile`` accumulates one tumbling window of sampled
inference records. Both keep, per feature:

- numeric: a KLL quantile sketch (Apache DataSketches, ``k = SKETCH_K``, rank error about 1.3% at
  99% confidence whatever the count) for KS and Wasserstein, and proportions over *reference decile
  bins* for PSI and Jensen-Shannon. The bins' inner edges are the reference's quantiles at 0.1..0.9
  (deduplicated, so a discrete feature has fewer bins); the outer bins are open-ended and every bin is
  closed on the left: ``[e[i-1], e[i])``, the convention of the sketch's ``get_pmf``. A window that has
  a reference also counts its values over the reference's bins exactly, so PSI does not carry the
  sketch's error;
- categorical: counts, at most ``MAX_CATEGORIES`` categories the reference does not know; later new
  categories are counted as ``OTHER``, so a feature with unbounded cardinality (ids) cannot grow a window.

Missing values (NaN, and infinities, which have no place on a histogram or in a Wasserstein distance)
are dropped from numeric features; ``None`` is dropped from categorical ones.

``WindowProfile.add`` is called once per record on the ingest path, so it only appends numeric values
to per-feature buffers; every ``FLUSH_RECORDS`` records (and before any read) the buffers go into the
sketches and bin counts in vectorised chunks. The serialized form (``to_bytes``) is a magic tag, a JSON
header and the sketches' own binary serializations: compact, versioned, and no pickle.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasketches import kll_doubles_sketch

NUMERIC_BINS = 10
SKETCH_K = 200
MAX_CATEGORIES = 200
OTHER = "__other__"
# Features (numeric and categorical together) a window tracks: a data plane that flattens a huge tensor
# into X[0..n], or a client inventing names, must not grow a window without bound; values of later
# features are counted in ``WindowProfile.ignored_values`` instead.
MAX_FEATURES = 1000
# Categories a window admits beyond the reference's, all its features together (each feature also has
# its own MAX_CATEGORIES); later new categories are counted as OTHER.
MAX_WINDOW_CATEGORIES = 20_000
# Records buffered between flushes into the sketches: big enough for vectorised updates to amortise
# the per-call cost, small enough (8 bytes x features x this) to stay a small part of a window.
FLUSH_RECORDS = 1024

DECILE_RANKS = tuple(i / NUMERIC_BINS for i in range(1, NUMERIC_BINS))
_REFERENCE_MAGIC = b"WRP1"
_WINDOW_MAGIC = b"WWP1"
_HEADER_LENGTH = struct.Struct("<I")
_SKETCH_OVERHEAD_BYTES = 96  # the KLL object besides its retained items (levels, min, max, counters)


# --- small helpers -----------------------------------------------------------------------------------


def finite(values: Any) -> np.ndarray:
    """The values as float64 without NaN and infinities (missing values are not a distribution's part)."""
    array_values = np.asarray(values, dtype=np.float64).ravel()
    return array_values[np.isfinite(array_values)]


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts over the left-closed bins ``(-inf, e0), [e0, e1), ..., [e_last, inf)``."""
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1).astype(np.int64)


def same_edges(left: np.ndarray | None, right: np.ndarray | None) -> bool:
    return left is not None and right is not None and np.array_equal(left, right)


def new_sketch(values: np.ndarray | None = None) -> Any:
    sketch = kll_doubles_sketch(SKETCH_K)
    if values is not None and len(values):
        sketch.update(values)
    return sketch


def copy_sketch(sketch: Any) -> Any:
    """An independent copy: merging into a profile must never alias another profile's sketch."""
    return kll_doubles_sketch.deserialize(sketch.serialize())


def sketch_proportions(sketch: Any, edges: np.ndarray) -> np.ndarray:
    """Proportions over the bins of ``edges`` estimated by the sketch (same left-closed convention)."""
    if sketch.is_empty():
        return np.zeros(len(edges) + 1)
    return np.asarray(sketch.get_pmf(edges.tolist()), dtype=np.float64)


def sketch_edges(sketch: Any) -> np.ndarray:
    """Inner decile edges estimated by the sketch, deduplicated like the exact ones."""
    return np.unique(np.asarray(sketch.get_quantiles(list(DECILE_RANKS)), dtype=np.float64))


def proportions_of(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {category: n / total for category, n in counts.items()} if total else {}


@dataclass
class Moments:
    """Count, mean and sum of squared deviations, combined chunk by chunk (Chan et al.), so the mean and
    standard deviation of a window need neither its values nor the cancellation-prone sum of squares."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: np.ndarray) -> None:
        if len(values):
            mean = float(values.mean())
            self.merge(Moments(len(values), mean, float(np.square(values - mean).sum())))

    def merge(self, other: Moments) -> None:
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0), the scale Wasserstein distances are normalised by."""
        return math.sqrt(max(self.m2, 0.0) / self.count) if self.count else 0.0


# --- serialization container -------------------------------------------------------------------------


def pack(magic: bytes, header: dict[str, Any], blobs: Sequence[bytes]) -> bytes:
    """``magic | uint32 header length | JSON header | blobs``; the header lists the blobs' sizes."""
    header = {**header, "blob_sizes": [len(blob) for blob in blobs]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([magic, _HEADER_LENGTH.pack(len(encoded)), encoded, *blobs])


def unpack(magic: bytes, data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    if data[:4] != magic:
        raise ValueError(f"not a serialized profile: expected tag {magic!r}, received {bytes(data[:4])!r}")
    (length,) = _HEADER_LENGTH.unpack_from(data, 4)
    start = 4 + _HEADER_LENGTH.size
    header: dict[str, Any] = json.loads(data[start : start + length])
    blobs: list[bytes] = []
    offset = start + length
    for size in header.pop("blob_sizes"):
        blobs.append(bytes(data[offset : offset + size]))
        offset += size
    if offset != len(data):
        raise ValueError(f"serialized profile has {len(data)} bytes, its header describes {offset}")
    return header, blobs


# --- the reference -----------------------------------------------------------------------------------


@dataclass
class NumericReference:
    edges: np.ndarray  # inner bin edges: the reference's deciles, deduplicated
    proportions: np.ndarray  # len(edges) + 1 bins; the outer ones are open-ended
    sketch: Any  # KLL sketch of the reference's values
    count: int
    mean: float
    std: float

    @classmethod
    def from_values(cls, values: np.ndarray) -> NumericReference:
        """Exact deciles and proportions (``values`` finite and not empty)."""
        edges = np.unique(np.quantile(values, DECILE_RANKS))
        proportions = bin_counts(values, edges) / len(values)
        return cls(edges, proportions, new_sketch(values), len(values), float(values.mean()), float(values.std()))


@dataclass
class CategoricalReference:
    proportions: dict[str, float]
    count: int

    @classmethod
    def from_values(cls, values: Iterable[str | None]) -> CategoricalReference:
        """Exact proportions; beyond the ``MAX_CATEGORIES`` most frequent categories the rest are ``OTHER``."""
        counts = Counter(value for value in values if value is not None)
        total = sum(counts.values())
        kept = dict(counts.most_common(MAX_CATEGORIES))
        if len(kept) < len(counts):
            kept[OTHER] = kept.get(OTHER, 0) + total - sum(kept.values())
        return cls(proportions_of(kept), total)


@dataclass
class ReferenceProfile:
    numeric: dict[str, NumericReference] = field(default_factory=dict)
    categorical: dict[str, CategoricalReference] = field(default_factory=dict)
    rows: int = 0

    @classmethod
    def from_columns(
        cls, numeric: Mapping[str, np.ndarray], categorical: Mapping[str, Sequence[str | None]]
    ) -> ReferenceProfile:
        """The exact profile of a dataset's columns. A column without a single value is left out: it
        cannot be scored, and an empty sketch cannot answer quantile queries."""
        profile = cls()
        for name, column in numeric.items():
            values = finite(column)
            profile.rows = max(profile.rows, len(column))
            if len(values):
                profile.numeric[name] = NumericReference.from_values(values)
        for name, texts in categorical.items():
            reference = CategoricalReference.from_values(texts)
            profile.rows = max(profile.rows, len(texts))
            if reference.count:
                profile.categorical[name] = reference
        return profile

    def to_bytes(self) -> bytes:
        blobs: list[bytes] = []
        numeric: dict[str, Any] = {}
        for name, reference in self.numeric.items():
            numeric[name] = {
                "edges": reference.edges.tolist(),
                "proportions": reference.proportions.tolist(),
                "count": reference.count,
                "mean": reference.mean,
                "std": reference.std,
                "sketch": len(blobs),
            }
            blobs.append(reference.sketch.serialize())
        categorical = {
            name: {"proportions": reference.proportions, "count": reference.count}
            for name, reference in self.categorical.items()
        }
        return pack(_REFERENCE_MAGIC, {"rows": self.rows, "numeric": numeric, "categorical": categorical}, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceProfile:
        header, blobs = unpack(_REFERENCE_MAGIC, data)
        numeric = {
            name: NumericReference(
                edges=np.asarray(item["edges"], dtype=np.float64),
                proportions=np.asarray(item["proportions"], dtype=np.float64),
                sketch=kll_doubles_sketch.deserialize(blobs[item["sketch"]]),
                count=int(item["count"]),
                mean=float(item["mean"]),
                std=float(item["std"]),
            )
            for name, item in header["numeric"].items()
        }
        categorical = {
            name: CategoricalReference({k: float(v) for k, v in item["proportions"].items()}, int(item["count"]))
            for name, item in header["categorical"].items()
        }
        return cls(numeric, categorical, int(header["rows"]))


# --- a window ----------------------------------------------------------------------------------------


@dataclass
class NumericState:
    """One numeric feature of a window. ``counts`` are exact counts over ``edges`` (the reference's bins)
    and are None when there is no reference bin for the feature, or when a merge mixed in values that
    were not counted over the same edges: from then on the sketch answers."""

    sketch: Any = field(default_factory=new_sketch)
    moments: Moments = field(default_factory=Moments)
    edges: np.ndarray | None = None
    counts: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        if len(values):
            self.sketch.update(values)
            self.moments.add(values)
            if self.edges is not None and self.counts is not None:
                self.counts += bin_counts(values, self.edges)

    def merge(self, other: NumericState) -> None:
        if other.moments.count == 0:
            return
        # Exact counts survive only if both sides counted every value over the same edges.
        if self.counts is not None and other.counts is not None and same_edges(self.edges, other.edges):
            self.counts = self.counts + other.counts
        else:
            self.counts = None
        self.sketch.merge(other.sketch)
        self.moments.merge(other.moments)

    def nbytes(self) -> int:
        total = _SKETCH_OVERHEAD_BYTES + 8 * int(self.sketch.num_retained)
        for array_value in (self.edges, self.counts):
            total += 0 if array_value is None else array_value.nbytes
        return total


class WindowProfile:
    """One tumbling window's accumulator; its memory is bounded whatever the traffic (see the module's
    docstring). Reads flush the buffered values first, so they always see every record added."""

    def __init__(self, reference: ReferenceProfile | None) -> None:
        self.reference = reference
        self.count = 0  # records added
        self.ignored_values = 0  # values of features beyond MAX_FEATURES
        self._numeric: dict[str, NumericState] = {}
        self._buffers: dict[str, array[float]] = {}
        self._categories: dict[str, dict[str, int]] = {}
        self._new_categories: dict[str, int] = {}  # per feature: categories admitted that the reference lacks
        self._new_categories_total = 0
        self._pending = 0  # records since the last flush

    # -- ingest (hot path) --

    def add(self, numeric: Mapping[str, float], categorical: Mapping[str, str]) -> None:
        """One record. Numeric values are only buffered here; ``flush`` does the work in chunks."""
        self.count += 1
        buffers = self._buffers
        for name, value in numeric.items():
            buffer = buffers.get(name)
            if buffer is None:
                buffer = self._start_numeric(name)
                if buffer is None:
                    continue
            buffer.append(value)
        categories = self._categories
        for name, text in categorical.items():
            counts = categories.get(name)
            if counts is None:
                counts = self._start_categorical(name)
                if counts is None:
                    continue
            if text in counts:
                counts[text] += 1
            elif text is not None:
                self._count_new_category(name, counts, text)
        self._pending += 1
        if self._pending >= FLUSH_RECORDS:
            self.flush()

    def _full(self) -> bool:
        return len(self._numeric) + len(self._categories) >= MAX_FEATURES

    def _start_numeric(self, name: str) -> array[float] | None:
        if self._full():
            self.ignored_values += 1
            return None
        self._numeric[name] = self._new_numeric_state(name)
        buffer: array[float] = array("d")
        self._buffers[name] = buffer
        return buffer

    def _new_numeric_state(self, name: str) -> NumericState:
        reference = self.reference.numeric.get(name) if self.reference else None
        if reference is None:
            return NumericState()
        return NumericState(edges=reference.edges, counts=np.zeros(len(reference.edges) + 1, dtype=np.int64))

    def _start_categorical(self, name: str) -> dict[str, int] | None:
        if self._full():
            self.ignored_values += 1
            return None
        counts: dict[str, int] = {}
        self._categories[name] = counts
        self._new_categories[name] = 0
        return counts

    def _known_categories(self, name: str) -> Mapping[str, float]:
        reference = self.reference.categorical.get(name) if self.reference else None
        return reference.proportions if reference else {}

    def _count_new_category(self, name: str, counts: dict[str, int], text: str) -> None:
        """A category first seen in this window: its own count while the budget of categories the
        reference does not know lasts, then ``OTHER``. The reference's own categories are always admitted
        (they are bounded by the reference's own cap)."""
        if text not in self._known_categories(name):
            if self._new_categories[name] >= MAX_CATEGORIES or self._new_categories_total >= MAX_WINDOW_CATEGORIES:
                text = OTHER
            else:
                self._new_categories[name] += 1
                self._new_categories_total += 1
        counts[text] = counts.get(text, 0) + 1

    def flush(self) -> None:
        """Moves the buffered values into the sketches and bin counts. Reads do it themselves; a caller
        closing a window calls it to release the buffers (up to 8 KiB per numeric feature)."""
        for name, buffer in self._buffers.items():
            if buffer:
                self._numeric[name].add(finite(np.frombuffer(buffer, dtype=np.float64)))
                # A fresh buffer: the old one may still back the array numpy made from it.
                self._buffers[name] = array("d")
        self._pending = 0

    # -- reads --

    def numeric_names(self) -> list[str]:
        return list(self._numeric)

    def categorical_names(self) -> list[str]:
        return list(self._categories)

    def numeric_count(self, name: str) -> int:
        """Finite values of the feature in the window."""
        self.flush()
        state = self._numeric.get(name)
        return state.moments.count if state else 0

    def numeric_moments(self, name: str) -> Moments:
        self.flush()
        state = self._numeric.get(name)
        return Moments(state.moments.count, state.moments.mean, state.moments.m2) if state else Moments()

    def numeric_sketch(self, name: str) -> Any:
        """The feature's KLL sketch (empty when the window has no value of it); not a copy: read it only."""
        self.flush()
        state = self._numeric.get(name)
        return state.sketch if state else new_sketch()

    def bin_proportions(self, name: str, edges: np.ndarray) -> np.ndarray:
        """Proportions over the bins of ``edges``: exact when the window counted over these very edges
        (its reference's), else estimated by the sketch. Zeros when the window has no value."""
        self.flush()
        state = self._numeric.get(name)
        if state is None or state.moments.count == 0:
            return np.zeros(len(edges) + 1)
        if state.counts is not None and same_edges(state.edges, edges):
            return state.counts / state.counts.sum()
        return sketch_proportions(state.sketch, np.asarray(edges, dtype=np.float64))

    def has_exact_bins(self, name: str, edges: np.ndarray) -> bool:
        state = self._numeric.get(name)
        return state is not None and state.counts is not None and same_edges(state.edges, edges)

    def category_counts(self, name: str) -> dict[str, int]:
        """A copy of the feature's counts (empty when the window has no value of it)."""
        return dict(self._categories.get(name, {}))

    def nbytes(self) -> int:
        """Approximate memory of the window: sketches, bin counts, buffered values and category counts."""
        total = sum(state.nbytes() for state in self._numeric.values())
        total += sum(8 * len(buffer) for buffer in self._buffers.values())
        for counts in self._categories.values():
            total += sys.getsizeof(counts) + sum(sys.getsizeof(text) + 32 for text in counts)
        return total

    # -- combining --

    def merge(self, other: WindowProfile) -> None:
        """Adds ``other``'s records (windows of several replicas, or several windows for a reference)."""
        self.flush()
        other.flush()
        self.count += other.count
        self.ignored_values += other.ignored_values
        for name, state in other._numeric.items():
            mine = self._numeric.get(name)
            if mine is None:
                if self._full():
                    self.ignored_values += state.moments.count
                    continue
                mine = self._numeric[name] = self._new_numeric_state(name)
                self._buffers[name] = array("d")
            mine.merge(state)
        for name, counts in other._categories.items():
            if name not in self._categories:
                if self._full():
                    self.ignored_values += sum(counts.values())
                    continue
                self._start_categorical(name)
            merged = Counter(self._categories[name])
            merged.update(counts)
            self._set_categories(name, merged)

    def _set_categories(self, name: str, counts: Mapping[str, int]) -> None:
        """Installs counts, re-applying the cap on categories unknown to the reference (largest kept)."""
        known = self._known_categories(name)
        capped: dict[str, int] = {}
        admitted = 0
        for text, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            if text in known or text == OTHER:
                capped[text] = capped.get(text, 0) + n
            elif admitted < MAX_CATEGORIES:
                capped[text] = n
                admitted += 1
            else:
                capped[OTHER] = capped.get(OTHER, 0) + n
        self._categories[name] = capped
        self._new_categories[name] = admitted

    # -- serialization --

    def to_bytes(self) -> bytes:
        self.flush()
        blobs: list[bytes] = []
        numeric: dict[str, Any] = {}
        for name, state in self._numeric.items():
            numeric[name] = {
                "count": state.moments.count,
                "mean": state.moments.mean,
                "m2": state.moments.m2,
                "sketch": len(blobs),
                "edges": None if state.edges is None or state.counts is None else state.edges.tolist(),
                "counts": None if state.counts is None else state.counts.tolist(),
            }
            blobs.append(state.sketch.serialize())
        header = {
            "count": self.count,
            "ignored_values": self.ignored_values,
            "numeric": numeric,
            "categorical": self._categories,
        }
        return pack(_WINDOW_MAGIC, header, blobs)

    @classmethod
    def from_bytes(cls, data: bytes, reference: ReferenceProfile | None) -> WindowProfile:
        """A window restored against ``reference``. Exact bin counts are kept only where they were counted
        over this reference's edges; elsewhere the sketch answers."""
        header, blobs = unpack(_WINDOW_MAGIC, data)
        window = cls(reference)
        window.count = int(header["count"])
        window.ignored_values = int(header["ignored_values"])
        for name, item in header["numeric"].items():
            state = window._new_numeric_state(name)
            stored_edges = None if item["edges"] is None else np.asarray(item["edges"], dtype=np.float64)
            if same_edges(state.edges, stored_edges):
                state.counts = np.asarray(item["counts"], dtype=np.int64)
            else:
                state.counts = None
            state.sketch = kll_doubles_sketch.deserialize(blobs[item["sketch"]])
            state.moments = Moments(int(item["count"]), float(item["mean"]), float(item["m2"]))
            window._numeric[name] = state
            window._buffers[name] = array("d")
        for name, counts in header["categorical"].items():
            window._set_categories(name, {text: int(n) for text, n in counts.items()})
        return window

    def to_reference(self) -> ReferenceProfile:
        """This window as a reference: deciles and proportions from the sketch (the window never kept
        its values), categorical proportions from the counts."""
        self.flush()
        profile = ReferenceProfile(rows=self.count)
        for name, state in self._numeric.items():
            if state.moments.count == 0:
                continue
            edges = sketch_edges(state.sketch)
            profile.numeric[name] = NumericReference(
                edges=edges,
                proportions=sketch_proportions(state.sketch, edges),
                sketch=copy_sketch(state.sketch),
                count=state.moments.count,
                mean=state.moments.mean,
                std=state.moments.std,
            )
        for name, counts in self._categories.items():
            total = sum(counts.values())
            if total:
                profile.categorical[name] = CategoricalReference(proportions_of(counts), total)
        return profile
