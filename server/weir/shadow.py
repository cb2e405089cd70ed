"""Shadow variants: mirror part of an endpoint's traffic to a variant that never answers callers,
and compare its outputs with the answers callers got.

A mirror starts only after the primary's outputs exist and runs as its own task, so the caller's
answer never waits for it. At most ``max_in_flight`` mirrors run at once; beyond that a mirror is
dropped and counted. A shadow that fails is counted; the caller never sees it. Comparison per output
both answers have: the largest absolute difference, and per row whether the argmax over the last
axis agrees and whether every element is within ``TOLERANCE``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from weir import codec
from weir.datatypes import BYTES_INPUTS_ARE_TEXT
from weir.repository import ModelRepository
from weir.routing import EndpointRoute, ShadowRoute
from weir_proto.inference import messages as pb

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
DEFAULT_MAX_IN_FLIGHT = 64


@dataclass
class ShadowStats:
    mirrored: int = 0
    errors: int = 0
    dropped: int = 0
    rows: int = 0
    rows_agreeing: int = 0
    rows_within_tolerance: int = 0
    max_abs_diff: float = 0.0

    def compare(self, primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray]) -> None:
        rows = agreeing = within = 0
        for name, expected in primary.items():
            got = shadow.get(name)
            if got is None or got.shape != expected.shape or expected.dtype == object:
                continue
            difference = np.abs(expected.astype(np.float64) - got.astype(np.float64))
            if difference.size:
                self.max_abs_diff = max(self.max_abs_diff, float(difference.max()))
            flat_expected = expected.reshape(expected.shape[0], -1) if expected.ndim > 1 else expected.reshape(-1, 1)
            flat_got = got.reshape(flat_expected.shape)
            rows = flat_expected.shape[0]
            agreeing = int((flat_expected.argmax(axis=1) == flat_got.argmax(axis=1)).sum())
            within = int((difference.reshape(rows, -1) <= TOLERANCE).all(axis=1).sum())
            break  # the first comparable output decides a row's agreement
        self.rows += rows
        self.rows_agreeing += agreeing
        self.rows_within_tolerance += within


class ShadowMirror:
    def __init__(
        self,
        repository: ModelRepository,
        max_tensor_elements: int,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        draw: Callable[[], float] = random.random,
        max_bytes_elements: int = codec.DEFAULT_MAX_BYTES_ELEMENTS,
    ) -> None:
        self._repository = repository
        self._max_tensor_elements = max_tensor_elements
        self._max_bytes_elements = max_bytes_elements
        self._max_in_flight = max_in_flight
        self._draw = draw
        self._in_flight: set[asyncio.Task[None]] = set()  # strong references: tasks outlive the request
        self.stats: dict[tuple[str, str], ShadowStats] = {}

    def maybe_mirror(
        self, route: EndpointRoute, request: pb.ModelInferRequest, primary_outputs: dict[str, np.ndarray]
    ) -> None:
        for shadow in route.shadows:
            if self._draw() * 100 >= shadow.percent:
                continue
            stats = self.stats.setdefault((route.endpoint, shadow.name), ShadowStats())
            if len(self._in_flight) >= self._max_in_flight:
                stats.dropped += 1
                continue
            task = asyncio.get_running_loop().create_task(self._mirror(shadow, request, primary_outputs, stats))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _mirror(
        self,
        shadow: ShadowRoute,
        request: pb.ModelInferRequest,
        primary_outputs: dict[str, np.ndarray],
        stats: ShadowStats,
    ) -> None:
        stats.mirrored += 1
        try:
            loaded = self._repository.resolve(shadow.model, "")
            decoded = codec.decode_request(
                request,
                loaded.signature,
                self._max_tensor_elements,
                max_bytes_elements=self._max_bytes_elements,
                bytes_as_text=BYTES_INPUTS_ARE_TEXT,
            )
            result = await loaded.batcher.infer(decoded.inputs, decoded.requested_outputs, decoded.batch_size, {}, None)
            stats.compare(primary_outputs, result.outputs)
        except Exception as error:  # a shadow's failure is data, never the caller's problem
            stats.errors += 1
            log.debug("shadow request failed", extra={"model": shadow.model, "reason": str(error)})

    async def drain(self) -> None:
        """Wait for the mirrors in flight (tests, and a clean stop)."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)


class ShadowCollector(Collector):
    def __init__(self, mirror: ShadowMirror) -> None:
        self._mirror = mirror

    def collect(self) -> Iterator[Metric]:
        labels = ["endpoint", "shadow"]
        counters = {
            "mirrored": CounterMetricFamily("weir_shadow_mirrored", "Requests mirrored to a shadow.", labels=labels),
            "errors": CounterMetricFamily("weir_shadow_errors", "Mirrored requests the shadow failed.", labels=labels),
            "dropped": CounterMetricFamily(
                "weir_shadow_dropped", "Mirrors not started: too many in flight.", labels=labels
            ),
            "rows": CounterMetricFamily("weir_shadow_rows", "Rows compared with the primary's.", labels=labels),
            "rows_agreeing": CounterMetricFamily(
                "weir_shadow_rows_agreeing", "Compared rows whose argmax matched the primary's.", labels=labels
            ),
        }
        largest = GaugeMetricFamily(
            "weir_shadow_max_abs_diff", "Largest absolute output difference from the primary.", labels=labels
        )
        for (endpoint, shadow), stats in list(self._mirror.stats.items()):
            for field, family in counters.items():
                family.add_metric([endpoint, shadow], getattr(stats, field))
            largest.add_metric([endpoint, shadow], stats.max_abs_diff)
        yield from counters.values()
        yield largest
