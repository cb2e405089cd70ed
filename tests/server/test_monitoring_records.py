"""The data plane's side of drift monitoring: the sample rate from config.pbtxt (0 opts out, bad values
refused at load), a bounded buffer that drops and counts instead of waiting, and records named per
element, summarised for large tensors, text for BYTES, one per row of a batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from weir.errors import InvalidArgumentError
from weir.model_config import normalize_config, parse_config_text
from weir.monitoring import (
    DEFAULT_SAMPLE_RATE,
    ID_LIMIT,
    MAX_ELEMENTS,
    MonitoringSpec,
    RecordBuffer,
    Sample,
    to_records,
)

CONFIG = """
max_batch_size: 8
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 3 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 2 ] }} ]
{extra}
"""


def spec(extra: str = "") -> MonitoringSpec | None:
    config = normalize_config(parse_config_text(CONFIG.format(extra=extra), "config.pbtxt"), "m")
    return MonitoringSpec.from_config(config)


def rate(value: str) -> str:
    return f'parameters {{ key: "weir_monitoring_sample_rate" value: {{ string_value: "{value}" }} }}'


def test_the_rate_comes_from_the_config_and_zero_opts_out() -> None:
    assert spec() == MonitoringSpec(DEFAULT_SAMPLE_RATE, batched=True)
    assert spec(rate("0.5")) == MonitoringSpec(0.5, batched=True)
    assert spec(rate("0")) is None
    for bad in ("1.5", "-0.1", "often"):
        with pytest.raises(InvalidArgumentError, match="weir_monitoring_sample_rate'\\]: expected a rate from 0 to 1"):
            spec(rate(bad))


def sample(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], batched: bool = True) -> Sample:
    return Sample("ep", "primary", "ep@primary", 3, "req-1", "user-7", 1_790_000_000.5, 0.002, batched, inputs, outputs)


def test_a_full_buffer_drops_and_counts_instead_of_waiting() -> None:
    buffer = RecordBuffer(capacity=2)
    for _ in range(5):
        buffer.offer(sample({"X": np.zeros((1, 3), np.float32)}, {}))
    assert (len(buffer), buffer.sampled, buffer.dropped) == (2, 2, 3)
    assert len(buffer.drain(10)) == 2 and len(buffer) == 0


def test_the_buffer_also_bounds_the_tensor_bytes_its_samples_hold() -> None:
    """Issue 14: samples keep their requests' arrays; a count alone let large requests pin gigabytes."""
    buffer = RecordBuffer(capacity=100, capacity_bytes=3 * 4096)
    large = np.zeros((1, 1024), np.float32)  # 4096 bytes
    for _ in range(5):
        buffer.offer(sample({"X": large}, {}))
    assert (len(buffer), buffer.sampled, buffer.dropped) == (3, 3, 2)
    buffer.drain(1)
    buffer.offer(sample({"X": large}, {}))  # room again once the sender took one
    assert (len(buffer), buffer.sampled) == (3, 4)


def test_records_keep_a_bounded_request_id_and_routing_key() -> None:
    long = dataclasses.replace(
        sample({"X": np.zeros((1, 3), np.float32)}, {}), request_id="r" * 100_000, routing_key="k" * 100_000
    )
    (record,) = to_records([long])
    assert record.request_id == "r" * ID_LIMIT and record.routing_key == "k" * ID_LIMIT


def test_records_name_elements_summarise_large_tensors_and_split_batches() -> None:
    batch = np.arange(6, dtype=np.float32).reshape(2, 3)
    wide = np.ones((2, MAX_ELEMENTS + 1), np.float32)
    words = np.array([[b"red"], [b"blue"]], dtype=object)
    outputs = {"Y": np.array([[0.2, 0.8], [0.9, 0.1]], np.float32)}
    records = to_records(
        [sample({"X": batch, "W": wide, "T": words}, outputs)],
        element_names=lambda model, tensor: ["age", "income", "tenure"] if tensor == "X" else None,
    )
    assert [record.request_id for record in records] == ["req-1#0", "req-1#1"]  # a record per row
    first = {value.name: value for value in records[0].inputs}
    assert [first[name].number for name in ("age", "income", "tenure")] == [0.0, 1.0, 2.0]
    assert {"W.mean", "W.std", "W.min", "W.max"} <= set(first) and first["W.mean"].number == 1.0
    assert first["T"].text == "red" and {value.name: value.text for value in records[1].inputs}["T"] == "blue"
    assert [(value.name, value.number) for value in records[1].outputs] == [
        ("Y[0]", pytest.approx(0.9)),
        ("Y[1]", pytest.approx(0.1)),
    ]
    record = records[0]
    assert (record.endpoint, record.variant, record.version, record.routing_key) == ("ep", "primary", 3, "user-7")
    assert record.at.ToNanoseconds() == 1_790_000_000_500_000_000 and record.latency_seconds == 0.002
