"""Inference records for drift monitoring: the data plane samples answered requests (a rate per model
version, from config.pbtxt) into a bounded buffer; the control-plane follower ships them over the
attach stream. On the request path a sample is one random draw and one append of references to the
arrays the request already has; turning them into records happens later, in the sender.

    parameters { key: "weir_monitoring_sample_rate" value: { string_value: "0.1" } }   # 0 opts out

Each sampled row becomes a record whose inputs are the tensor's elements (``X[0]``, ``X[1]``, ... or,
for an input enriched from a feature service, the features' names) when a row has at most
``MAX_ELEMENTS`` of them, else summaries (``X.mean``, ``X.std``, ``X.min``, ``X.max``); BYTES inputs
are categorical text. Outputs the same way. Cache hits are not sampled (their outputs are bytes).
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from weir.errors import InvalidArgumentError
from weir_proto.control.v1 import monitoring_pb2
from weir_proto.inference import messages as pb

RATE_PARAMETER = "weir_monitoring_sample_rate"
DEFAULT_SAMPLE_RATE = 0.1
MAX_ELEMENTS = 32  # per row and tensor: more are summarised
MAX_ROWS_PER_REQUEST = 16  # a sampled batch request contributes at most this many rows
BUFFER_RECORDS = 10_000
BUFFER_BYTES = 64 * 1024 * 1024
"""Most tensor bytes the buffered samples may hold. A sample keeps references to its request's arrays
(up to a whole message each); without a byte bound, 10,000 samples of large requests held back by a
slow control plane could pin gigabytes."""
TEXT_LIMIT = 64
ID_LIMIT = 256  # characters of a client's request id or routing key kept in a record


@dataclass(frozen=True)
class MonitoringSpec:
    rate: float
    batched: bool  # the model's tensors carry a batch dimension first

    @classmethod
    def from_config(cls, config: pb.ModelConfig) -> MonitoringSpec | None:
        value = config.parameters.get(RATE_PARAMETER)
        text = value.string_value if value is not None else ""
        try:
            rate = float(text) if text else DEFAULT_SAMPLE_RATE
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            raise InvalidArgumentError(
                f"model '{config.name}' config.pbtxt parameters['{RATE_PARAMETER}']: expected a rate from 0 to 1, "
                f"got {text!r}"
            )
        return cls(rate, config.max_batch_size > 0) if rate > 0 else None


@dataclass(frozen=True)
class Sample:
    """What the request path keeps of a sampled request: references, no copies, no conversion."""

    endpoint: str
    variant: str
    model: str
    version: int
    request_id: str
    routing_key: str
    at: float
    latency_seconds: float
    batched: bool
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


class RecordBuffer:
    """Bounded: when the control plane is slow or away, new samples are dropped and counted, and the
    request path never waits."""

    def __init__(self, capacity: int = BUFFER_RECORDS, capacity_bytes: int = BUFFER_BYTES) -> None:
        self._samples: collections.deque[tuple[Sample, int]] = collections.deque()
        self._capacity = capacity
        self._capacity_bytes = capacity_bytes
        self._bytes = 0
        self.sampled = 0
        self.dropped = 0

    def should_sample(self, rate: float) -> bool:
        return random.random() < rate

    def offer(self, sample: Sample) -> None:
        size = sum(array.nbytes for array in sample.inputs.values()) + sum(
            array.nbytes for array in sample.outputs.values()
        )
        if len(self._samples) >= self._capacity or self._bytes + size > self._capacity_bytes:
            self.dropped += 1
            return
        self.sampled += 1
        self._bytes += size
        self._samples.append((sample, size))

    def __len__(self) -> int:
        return len(self._samples)

    def drain(self, limit: int) -> list[Sample]:
        taken: list[Sample] = []
        while self._samples and len(taken) < limit:
            sample, size = self._samples.popleft()
            self._bytes -= size
            taken.append(sample)
        return taken


def to_records(
    samples: list[Sample], element_names: Callable[[str, str], list[str] | None] = lambda model, tensor: None
) -> list[monitoring_pb2.InferenceRecord]:
    """Records, one per sampled row. ``element_names(model, input)`` may name a tensor's elements (an
    enriched input: its feature service's features)."""
    records = []
    for sample in samples:
        rows = _rows(sample)
        for row in range(min(rows, MAX_ROWS_PER_REQUEST)):
            record = monitoring_pb2.InferenceRecord(
                endpoint=sample.endpoint,
                variant=sample.variant,
                version=sample.version,
                request_id=sample.request_id[:ID_LIMIT] if rows == 1 else f"{sample.request_id[:ID_LIMIT]}#{row}",
                routing_key=sample.routing_key[:ID_LIMIT],
                latency_seconds=sample.latency_seconds,
            )
            record.at.FromNanoseconds(int(sample.at * 1e9))
            for name, tensor in sample.inputs.items():
                _add_values(record.inputs, name, _row(tensor, row, sample.batched), element_names(sample.model, name))
            for name, tensor in sample.outputs.items():
                _add_values(record.outputs, name, _row(tensor, row, sample.batched), None)
            records.append(record)
    return records


def _rows(sample: Sample) -> int:
    if not sample.batched:
        return 1
    first = next(iter(sample.inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


def _row(tensor: np.ndarray, row: int, batched: bool) -> np.ndarray:
    return tensor[row] if batched and tensor.ndim > 0 and row < tensor.shape[0] else tensor


def _add_values(target: object, name: str, values: np.ndarray, names: list[str] | None) -> None:
    flat = values.reshape(-1)
    if flat.dtype == object or flat.dtype.kind in "SU":
        if flat.size:
            text = flat[0].decode("utf-8", "replace") if isinstance(flat[0], bytes) else str(flat[0])
            target.add(name=name, text=text[:TEXT_LIMIT])  # type: ignore[attr-defined]
        return
    if flat.dtype == np.bool_:
        flat = flat.astype(np.float64)
    if flat.size <= MAX_ELEMENTS:
        labels = names if names is not None and len(names) == flat.size else [f"{name}[{i}]" for i in range(flat.size)]
        for label, value in zip(labels, flat.tolist(), strict=True):
            target.add(name=label, number=float(value))  # type: ignore[attr-defined]
        return
    numbers = flat.astype(np.float64, copy=False)
    for suffix, value in (
        ("mean", numbers.mean()),
        ("std", numbers.std()),
        ("min", numbers.min()),
        ("max", numbers.max()),
    ):
        target.add(name=f"{name}.{suffix}", number=float(value))  # type: ignore[attr-defined]


class RecordCollector(Collector):
    """weir_monitoring_records_sampled_total / _dropped_total, read from the buffer at scrape time."""

    def __init__(self, buffer: RecordBuffer) -> None:
        self._buffer = buffer

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "weir_monitoring_records_sampled", "Requests sampled for drift monitoring.", value=self._buffer.sampled
        )
        yield CounterMetricFamily(
            "weir_monitoring_records_dropped",
            "Sampled requests dropped because the record buffer was full (control plane slow or away).",
            value=self._buffer.dropped,
        )
