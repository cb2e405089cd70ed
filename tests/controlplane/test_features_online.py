"""The online store on real Redis and on the embedded SQLite store: typed round trips in one read,
newer-wins writes, materialize of a range, incremental materialization by watermark, push (online at
once, offline log for training), and Redis stopped -> a clear error, then recovery."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from tests.conftest import free_port, start_redis_server
from weir_control.features.definitions import parse_definitions
from weir_control.features.materialize import materialize, materialize_incremental, push
from weir_control.features.offline import get_historical_features
from weir_proto.online_store import OnlineStore, RedisOnlineStore, SqliteOnlineStore

UTC = datetime.UTC


def at(hour: int) -> datetime.datetime:
    return datetime.datetime(2026, 11, 1, hour, tzinfo=UTC)


@pytest.fixture(params=["redis", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OnlineStore]:
    if request.param == "redis":
        online: OnlineStore = RedisOnlineStore("redis://127.0.0.1:6379/0")
    else:
        online = SqliteOnlineStore(tmp_path / "online.db")
    yield online
    online.close()


@pytest.fixture
def definitions(tmp_path: Path):
    view = f"stats_{uuid.uuid4().hex[:8]}"  # its own Redis keys: tests never see each other's rows
    (tmp_path / "stats").mkdir()
    pq.write_table(
        pa.table(
            {
                "driver_id": [1, 1, 2, 3],
                "event_timestamp": [at(1), at(5), at(2), at(9)],
                "trips": [10, 50, 20, 90],
                "rating": [4.0, 4.5, 3.5, 5.0],
                "active": [True, False, True, True],
                "city": ["Oslo", "Oslo", "Lima", "Pune"],
            }
        ),
        tmp_path / "stats" / "part-0.parquet",
    )
    return parse_definitions(
        {
            "entity": [{"name": "driver", "join_keys": ["driver_id"], "value_type": "INT64"}],
            "feature_view": [
                {
                    "name": view, "entities": ["driver"], "source": str(tmp_path / "stats"),
                    "features": [
                        {"name": "trips", "dtype": "INT64"}, {"name": "rating", "dtype": "FLOAT64"},
                        {"name": "active", "dtype": "BOOL"}, {"name": "city", "dtype": "STRING"},
                    ],
                }
            ],
            "feature_service": [{"name": "ranking", "features": [view]}],
        },
        "test",
    )  # fmt: skip


def features_of(definitions) -> dict[str, dict[str, str]]:
    view = next(iter(definitions.views.values()))
    return {view.name: {feature.name: feature.dtype for feature in view.features}}


def test_materialize_writes_the_latest_row_per_entity_in_the_range_typed(store, definitions) -> None:
    view = next(iter(definitions.views))
    assert materialize(definitions, store, at(0), at(6)) == {view: 2}  # drivers 1 and 2; 3 is later
    event_ts, values = store.read("1", features_of(definitions))[view]
    assert values == {"trips": 50, "rating": 4.5, "active": False, "city": "Oslo"}
    assert event_ts == at(5).timestamp()
    assert store.read("3", features_of(definitions))[view] == (None, dict.fromkeys(values))
    # an older range never overwrites a newer value
    assert materialize(definitions, store, at(0), at(2)) == {view: 0}
    assert store.read("1", features_of(definitions))[view][1]["trips"] == 50


def test_incremental_materialization_moves_a_watermark(store, definitions) -> None:
    view = next(iter(definitions.views))
    assert materialize_incremental(definitions, store, end=at(6)) == {view: 2}
    assert store.get_watermark(view) == at(6).timestamp()
    assert materialize_incremental(definitions, store, end=at(10)) == {view: 1}  # only driver 3 is new
    assert store.read("3", features_of(definitions))[view][1]["trips"] == 90
    assert materialize_incremental(definitions, store, end=at(10)) == {view: 0}


def test_pushed_rows_are_online_at_once_and_in_the_offline_log(store, definitions, tmp_path: Path) -> None:
    view = next(iter(definitions.views))
    rows = pa.table(
        {"driver_id": [7], "event_timestamp": [at(12)], "trips": [1], "rating": [2.5], "active": [True],
         "city": ["Rome"]}
    )  # fmt: skip
    assert push(definitions, store, view, rows, feature_root=tmp_path) == 1
    assert store.read("7", features_of(definitions))[view][1]["city"] == "Rome"
    history = get_historical_features(definitions, "ranking", pa.table({"driver_id": [7], "event_timestamp": [at(13)]}))
    assert history.column("trips").to_pylist() == [1]  # training sees the pushed row


def test_redis_stopped_raises_a_connection_error_and_recovers() -> None:
    port = free_port()
    server = start_redis_server(port)
    store = RedisOnlineStore(f"redis://127.0.0.1:{port}/0", timeout_seconds=0.2)
    view = {"v": {"x": "INT64"}}
    try:
        store.write("v", [("k", 1.0, {"x": 3})])
        server.terminate()
        server.wait(timeout=10)
        with pytest.raises(redis.ConnectionError):
            store.read("k", view)
        server = start_redis_server(port)
        store.write("v", [("k", 2.0, {"x": 4})])
        assert store.read("k", view)["v"] == (2.0, {"x": 4})
    finally:
        store.close()
        server.terminate()
        server.wait(timeout=10)


def test_the_features_cli_validates_retrieves_materializes_and_pushes(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    (tmp_path / "stats").mkdir()
    pq.write_table(
        pa.table({"driver_id": [1, 2], "event_timestamp": [at(1), at(2)], "trips": [10, 20]}),
        tmp_path / "stats" / "part-0.parquet",
    )
    definitions = tmp_path / "features.toml"
    definitions.write_text(
        '[[entity]]\nname = "driver"\njoin_keys = ["driver_id"]\nvalue_type = "INT64"\n\n'
        '[[feature_view]]\nname = "stats"\nentities = ["driver"]\nsource = "stats"\n'
        'features = [{ name = "trips", dtype = "INT64" }]\n\n'
        '[[feature_service]]\nname = "svc"\nfeatures = ["stats"]\n'
    )

    def weir(*args: str) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "weir.cli", "features", *args, "--json"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    assert weir("validate", str(definitions))["feature_services"] == ["svc"]
    pq.write_table(pa.table({"driver_id": [2, 1], "event_timestamp": [at(3), at(0)]}), tmp_path / "rows.parquet")
    out = tmp_path / "training.parquet"
    assert weir("historical", str(definitions), "--service", "svc", "--entities", str(tmp_path / "rows.parquet"),
                "--out", str(out))["rows"] == 2  # fmt: skip
    assert pq.read_table(out).column("trips").to_pylist() == [20, None]
    assert weir("materialize", str(definitions), "2026-11-01T00:00", "2026-11-02T00:00")["written"] == {"stats": 2}
    pq.write_table(pa.table({"driver_id": [3], "event_timestamp": [at(5)], "trips": [30]}), tmp_path / "push.parquet")
    assert weir("push", str(definitions), "--view", "stats", "--rows", str(tmp_path / "push.parquet"))["written"] == {
        "stats": 1
    }
    online = SqliteOnlineStore(tmp_path / "online.db")
    assert online.read("3", {"stats": {"trips": "INT64"}})["stats"][1] == {"trips": 30}
    online.close()
    bad = subprocess.run(
        [sys.executable, "-m", "weir.cli", "features", "materialize", str(definitions), "yesterday", "now", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1 and "start: expected an ISO 8601 time" in bad.stdout


def test_a_batch_of_entities_is_read_in_one_call_in_key_order() -> None:
    store = RedisOnlineStore("redis://127.0.0.1:6379/0")
    view = f"batch_{uuid.uuid4().hex[:8]}"
    try:
        store.write(view, [("a", 1.0, {"x": 1}), ("b", 2.0, {"x": 2})])
        results = store.read_many(["b", "missing", "a"], {view: {"x": "INT64"}})
        assert [result[view] for result in results] == [(2.0, {"x": 2}), (None, {"x": None}), (1.0, {"x": 1})]
    finally:
        store._client.delete(f"weir:fs:{view}:a", f"weir:fs:{view}:b")
        store.close()
