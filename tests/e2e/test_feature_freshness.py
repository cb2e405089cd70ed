"""Feature freshness across entities (issue 15, item 9): the data plane's freshness gauge looked only at
a view's newest row, so one push made 1,999 stale entities look fresh. `weir serve` with an online
store (embedded SQLite, then a real Redis): 2,000 entities materialized two days ago, one pushed now;
/metrics counts 1,999 stale entities of 2,000, the oldest value's age, and flags the view stale."""

from __future__ import annotations

import datetime
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, start_redis_server, start_weir
from weir_control.features.definitions import load_definitions
from weir_control.features.materialize import materialize, push
from weir_proto.online_store import open_online_store

UTC = datetime.UTC
ENTITIES = 2000
DEFINITIONS = """
[[entity]]
name = "customer"
join_keys = ["customer_id"]
value_type = "INT64"

[[feature_view]]
name = "stats"
entities = ["customer"]
source = "stats"
freshness = "batch"
features = [{ name = "orders", dtype = "INT64" }]

[[feature_view]]
name = "profile"
entities = ["customer"]
source = "profile"
freshness = "static"
features = [{ name = "tier", dtype = "INT64" }]
"""


def scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, sample.labels.get("view", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("weir_feature_view_")
    }


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_one_fresh_push_does_not_make_a_view_of_stale_entities_look_fresh(tmp_path: Path, backend: str) -> None:
    two_days_ago = datetime.datetime.now(UTC) - datetime.timedelta(days=2)
    for view, column in (("stats", "orders"), ("profile", "tier")):
        (tmp_path / view).mkdir()
        pq.write_table(
            pa.table({"customer_id": list(range(ENTITIES)), "event_timestamp": [two_days_ago] * ENTITIES,
                      column: list(range(ENTITIES))}),
            tmp_path / view / "part-0.parquet",
        )  # fmt: skip
    (tmp_path / "features.toml").write_text(DEFINITIONS)
    definitions = load_definitions(tmp_path / "features.toml")
    redis_server = None
    if backend == "redis":
        port = free_port()
        redis_server = start_redis_server(port)
        target = f"redis://127.0.0.1:{port}/0"
    else:
        target = str(tmp_path / "online.db")
    store, _ = open_online_store(target)
    materialize(definitions, store, two_days_ago - datetime.timedelta(hours=1), datetime.datetime.now(UTC))
    now = datetime.datetime.now(UTC)
    pushed = pa.table({"customer_id": [7], "event_timestamp": [now], "orders": [99]})
    assert push(definitions, store, "stats", pushed) == 1
    store.close()
    repository = tmp_path / "repository"
    repository.mkdir()
    server = start_weir(repository, "--feature-definitions", str(tmp_path / "features.toml"), "--online-store", target)
    try:
        assert server.metrics_port is not None
        before = time.time()
        samples = scrape(server.metrics_port)
        after = time.time()
        assert samples[("weir_feature_view_stale", "stats")] == 1  # the newest value alone said 0
        assert samples[("weir_feature_view_entities", "stats")] == ENTITIES
        assert samples[("weir_feature_view_stale_entities", "stats")] == ENTITIES - 1
        assert samples[("weir_feature_view_stale_ratio", "stats")] == pytest.approx((ENTITIES - 1) / ENTITIES)
        oldest = samples[("weir_feature_view_oldest_age_seconds", "stats")]
        assert before - two_days_ago.timestamp() <= oldest <= after - two_days_ago.timestamp()
        assert samples[("weir_feature_view_age_seconds", "stats")] <= after - now.timestamp()  # the pushed row
        # a static view never goes stale, however old its values
        assert samples[("weir_feature_view_entities", "profile")] == ENTITIES
        assert samples[("weir_feature_view_stale_entities", "profile")] == 0
        assert samples[("weir_feature_view_stale", "profile")] == 0
    finally:
        assert server.terminate_and_wait() == 0
        if redis_server is not None:
            redis_server.terminate()
            redis_server.wait(timeout=10)
