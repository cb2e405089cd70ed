"""The server's own latency budget for a level, from two scrapes of its Prometheus text.

Weir exports ``weir_inference_stage_duration_seconds{model,version,stage}`` (decode, queue, infer,
encode) and ``weir_inference_request_duration_seconds{model,version}`` (end to end) as histograms. The
difference of ``_sum`` and ``_count`` between a scrape before and one after a level gives the mean time
per stage for the requests of that level alone. Servers without these metrics (Triton, MLServer) give
no totals, and the budget is skipped.

A data plane following a control plane serves an endpoint through one repository model per variant,
``endpoint@variant``, and labels its series so: the endpoint's name matches those too (summed over
the variants: the traffic the bench sends to the endpoint, whichever variant answered it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from weir.routing import SEPARATOR as VARIANT_SEPARATOR  # the model serving variant V of endpoint E is E@V

STAGE_METRIC = "weir_inference_stage_duration_seconds"
REQUEST_METRIC = "weir_inference_request_duration_seconds"
STAGES = ("decode", "queue", "infer", "encode")
END_TO_END = "end_to_end"


@dataclass(frozen=True)
class Totals:
    seconds: float
    count: float


def latency_totals(text: str, model: str, version: str = "") -> dict[str, Totals]:
    """``{stage: Totals, "end_to_end": Totals}`` for ``model`` (every version, or only ``version``), or for
    the endpoint ``model`` (its ``model@variant`` series, summed). Empty when the text holds none of
    Weir's latency metrics."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (STAGE_METRIC, REQUEST_METRIC):
            continue
        for sample in family.samples:
            labels = sample.labels
            if not _serves(labels.get("model", ""), model) or (version and labels.get("version") != version):
                continue
            key = labels.get("stage", "") if family.name == STAGE_METRIC else END_TO_END
            if not key:
                continue
            if sample.name == family.name + "_sum":
                sums[key] = sums.get(key, 0.0) + sample.value
            elif sample.name == family.name + "_count":
                counts[key] = counts.get(key, 0.0) + sample.value
    return {key: Totals(sums.get(key, 0.0), counts[key]) for key in counts}


def _serves(label: str, model: str) -> bool:
    """Whether a series labelled ``label`` counts for ``model``: the model itself, or a variant of the
    endpoint of that name (``model@variant``; not another endpoint's variant that serves ``model``)."""
    return label == model or (VARIANT_SEPARATOR not in model and label.startswith(model + VARIANT_SEPARATOR))


def stage_budget(before: Mapping[str, Totals], after: Mapping[str, Totals]) -> dict[str, Any] | None:
    """Mean milliseconds per stage over the requests between two scrapes, and each stage's share of the
    end-to-end mean. ``unaccounted_ms`` is the end-to-end mean minus the stage means (the servicer and
    routing around the stages). None when the server has no end-to-end metric or served nothing.

    Stage counts can be lower than the end-to-end count: a response-cache hit is timed end to end only.
    """
    if END_TO_END not in after:
        return None
    end_to_end = _mean_ms(before.get(END_TO_END), after[END_TO_END])
    if end_to_end is None:
        return None
    mean_ms, count = end_to_end
    stages: dict[str, Any] = {}
    for stage in STAGES:
        delta = _mean_ms(before.get(stage), after[stage]) if stage in after else None
        if delta is None:
            stages[stage] = None
            continue
        stage_ms, stage_count = delta
        stages[stage] = {"mean_ms": stage_ms, "count": stage_count, "share": stage_ms / mean_ms if mean_ms else None}
    accounted = sum(entry["mean_ms"] for entry in stages.values() if entry is not None)
    return {
        "end_to_end": {"mean_ms": mean_ms, "count": count},
        "stages": stages,
        "unaccounted_ms": mean_ms - accounted,
    }


def _mean_ms(before: Totals | None, after: Totals) -> tuple[float, int] | None:
    start = before or Totals(0.0, 0.0)
    count = after.count - start.count
    if count <= 0:
        return None
    return (after.seconds - start.seconds) / count * 1000.0, round(count)
