"""Feature freshness on the data plane's /metrics: each view's newest online value's age, and a
stale flag by its freshness class (static views never go stale)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from weir.enrichment import Enricher, FreshnessCollector
from weir_proto.feature_definitions import parse_definitions
from weir_proto.online_store import SqliteOnlineStore

NOW = 1_800_000_000.0


def test_views_report_their_age_and_go_stale_by_freshness_class(tmp_path: Path) -> None:
    definitions = parse_definitions(
        {
            "entity": [{"name": "e"}],
            "feature_view": [
                {"name": name, "entities": ["e"], "source": "x", "freshness": freshness,
                 "features": [{"name": "v", "dtype": "INT64"}]}
                for name, freshness in (("live", "real-time"), ("fresh", "real-time"), ("ref", "static"),
                                        ("empty", "batch"))
            ],
        },
        "test",
    )  # fmt: skip
    store = SqliteOnlineStore(tmp_path / "online.db")
    store.write("live", [("k", NOW - 100, {"v": 1})])  # real-time allows 5 s: stale
    store.write("fresh", [("k", NOW - 2, {"v": 1})])
    store.write("ref", [("k", NOW - 10**7, {"v": 1})])  # static: never stale
    enricher = Enricher(definitions, store, "SQLite")
    registry = CollectorRegistry()
    registry.register(FreshnessCollector(enricher, clock=lambda: NOW))
    samples = {
        (sample.name, sample.labels["view"]): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert samples[("weir_feature_view_age_seconds", "live")] == 100
    assert samples[("weir_feature_view_stale", "live")] == 1
    assert samples[("weir_feature_view_stale", "fresh")] == 0
    assert samples[("weir_feature_view_stale", "ref")] == 0
    assert samples[("weir_feature_view_stale", "empty")] == 1  # nothing online at all
    assert enricher.stale_views == {"live", "empty"}
    store.close()
