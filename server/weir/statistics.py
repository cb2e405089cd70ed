"""Cumulative per-version statistics in the form of Triton's ModelStatistics message.

Counters are plain integers updated on the event loop thread only, so no lock is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from weir_proto.inference import messages as pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def fill(self, target: pb.StatisticDuration) -> None:
        target.count = self.count
        target.ns = self.ns


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStatistics:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, BatchDurations] = field(default_factory=dict)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution of ``batch_size`` rows (one or several requests)."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += batch_size
        self.execution_count += 1
        batch = self.by_batch_size.setdefault(batch_size, BatchDurations())
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def record_success(self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One request answered; its compute durations are those of the execution it was part of."""
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)

    def record_cache_hit(self, total_ns: int) -> None:
        """A request answered from the response cache: Triton counts it as a success and an
        inference, but not an execution."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += 1
        self.success.add(total_ns)
        self.cache_hit.add(total_ns)

    def record_cache_miss(self, lookup_ns: int) -> None:
        self.cache_miss.add(lookup_ns)

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)

    def to_proto(self, name: str, version: str) -> pb.ModelStatistics:
        message = pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
        )
        stats = message.inference_stats
        for field_name in (
            "success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss"
        ):  # fmt: skip
            getattr(self, field_name).fill(getattr(stats, field_name))
        for batch_size in sorted(self.by_batch_size):
            durations = self.by_batch_size[batch_size]
            entry = message.batch_stats.add(batch_size=batch_size)
            durations.compute_input.fill(entry.compute_input)
            durations.compute_infer.fill(entry.compute_infer)
            durations.compute_output.fill(entry.compute_output)
        return message
