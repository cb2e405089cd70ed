"""weir.shadow: output comparison, the in-flight bound (dropped, counted) and failures counted, never
raised."""

from __future__ import annotations

import asyncio

import numpy as np

from weir.errors import NotFoundError
from weir.routing import EndpointRoute, ShadowRoute, VariantRoute
from weir.shadow import ShadowMirror, ShadowStats
from weir_proto.inference import messages as pb


def test_comparison_counts_argmax_agreement_tolerance_and_the_largest_difference() -> None:
    stats = ShadowStats()
    primary = {"y": np.array([[0.0, 1.0], [3.0, 2.0], [1.0, 1.0]], np.float32)}
    stats.compare(primary, {"y": np.array([[0.0, 1.00001], [2.0, 3.0], [1.0, 1.0]], np.float32)})
    assert (stats.rows, stats.rows_agreeing, stats.rows_within_tolerance) == (3, 2, 2)
    assert abs(stats.max_abs_diff - 1.0) < 1e-6
    stats.compare(primary, {"other": primary["y"]})  # nothing comparable: nothing counted
    assert stats.rows == 3


class _Missing:
    def resolve(self, name: str, version: str) -> object:
        raise NotFoundError(f"model_name: unknown model '{name}'")


async def test_mirrors_beyond_the_bound_are_dropped_and_failures_only_counted() -> None:
    mirror = ShadowMirror(_Missing(), 1000, max_in_flight=2, draw=lambda: 0.0)  # type: ignore[arg-type]
    route = EndpointRoute("web", (VariantRoute("stable", "web@stable", 1),), shadows=(ShadowRoute("s", "web@s", 100),))
    for _ in range(5):
        mirror.maybe_mirror(route, pb.ModelInferRequest(model_name="web"), {})
    await mirror.drain()
    stats = mirror.stats[("web", "s")]
    assert (stats.mirrored, stats.errors, stats.dropped) == (2, 2, 3)
    for _ in range(3):
        mirror.maybe_mirror(route, pb.ModelInferRequest(model_name="web"), {})
        await asyncio.sleep(0)
    await mirror.drain()
    assert stats.mirrored == 5 and stats.errors == 5
