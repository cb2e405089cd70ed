"""Point-in-time correct historical retrieval (Feast's semantics) on crafted data: the latest row at
or before each entity row, late-arriving rows, TTL expiry, created-timestamp ties, entities with no
data, several views, input order kept, streaming."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from weir_control.features import arrow_wire
from weir_control.features.definitions import load_definitions, parse_definitions
from weir_control.features.offline import get_historical_features, stream_historical_features
from weir_proto.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError

UTC = datetime.UTC


def at(hour: int, minute: int = 0) -> datetime.datetime:
    return datetime.datetime(2026, 11, 1, hour, minute, tzinfo=UTC)


def write_driver_repo(tmp_path: Path) -> Path:
    """Crafted driver data (a directory of stats files, a static profile file) and its definitions
    file with relative sources; returns the file."""
    stats = pa.table(
        {
            "driver_id": [1, 1, 1, 1, 2, 3],
            "event_timestamp": [at(1), at(3), at(3), at(5), at(2), at(1)],
            # at 03:00 driver 1 has two rows: the later-created one (a correction) wins
            "created": [at(1), at(3), at(4), at(5), at(2), at(1)],
            "trips": [10, 30, 31, 50, 200, 7],
            "rating": [4.0, 4.3, 4.4, 4.5, 3.9, 5.0],
        }
    )
    (tmp_path / "stats").mkdir()
    pq.write_table(stats.slice(0, 4), tmp_path / "stats" / "part-0.parquet")
    pq.write_table(stats.slice(4), tmp_path / "stats" / "part-1.parquet")  # a directory of files
    pq.write_table(
        pa.table({"driver_id": [1, 2], "event_timestamp": [at(0), at(0)], "city": ["Oslo", "Lima"]}),
        tmp_path / "profile.parquet",
    )
    (tmp_path / "features.toml").write_text(
        """
[[entity]]
name = "driver"
join_keys = ["driver_id"]
value_type = "INT64"

[[feature_view]]
name = "driver_stats"
entities = ["driver"]
source = "stats"
timestamp_field = "event_timestamp"
created_timestamp_field = "created"
ttl_seconds = 7200
features = [{ name = "trips", dtype = "INT64" }, { name = "rating", dtype = "FLOAT64" }]

[[feature_view]]
name = "driver_profile"
entities = ["driver"]
source = "profile.parquet"
freshness = "static"
features = [{ name = "city", dtype = "STRING" }]

[[feature_service]]
name = "ranking"
features = ["driver_stats:trips", "driver_stats:rating", "driver_profile"]
"""
    )
    return tmp_path / "features.toml"


@pytest.fixture
def definitions(tmp_path: Path):
    return load_definitions(write_driver_repo(tmp_path))


def rows(*pairs: tuple[int, datetime.datetime]) -> pa.Table:
    return pa.table({"driver_id": [p[0] for p in pairs], "event_timestamp": [p[1] for p in pairs]})


def test_each_row_gets_the_latest_value_at_or_before_its_time_within_the_ttl(definitions) -> None:
    entity_rows = rows(
        (1, at(0, 30)),  # before any stats row: nulls (but the static profile is there)
        (1, at(1)),  # exactly at a row's time: that row
        (1, at(2, 59)),  # 01:00 is the latest: still within the 2 h TTL
        (1, at(3, 30)),  # two rows at 03:00: the later-created correction (31)
        (1, at(8)),  # latest is 05:00, three hours old: expired by the TTL
        (2, at(3)),
        (4, at(3)),  # an entity with no data at all
        (3, at(0, 59)),  # its only row comes later
    )
    result = get_historical_features(definitions, "ranking", entity_rows).to_pylist()
    assert [(row["trips"], row["rating"], row["city"]) for row in result] == [
        (None, None, "Oslo"),
        (10, 4.0, "Oslo"),
        (10, 4.0, "Oslo"),
        (31, 4.4, "Oslo"),
        (None, None, "Oslo"),
        (200, 3.9, "Lima"),
        (None, None, None),
        (None, None, None),
    ]
    assert [row["driver_id"] for row in result] == [1, 1, 1, 1, 1, 2, 4, 3]  # input order kept


def test_a_late_arriving_row_counts_by_its_event_time(definitions, tmp_path: Path) -> None:
    # written last, created at 06:00, but its event time is 02:00: a query at 02:30 sees it
    pq.write_table(
        pa.table({"driver_id": [1], "event_timestamp": [at(2)], "created": [at(6)], "trips": [20], "rating": [4.1]}),
        tmp_path / "stats" / "part-2-late.parquet",
    )
    result = get_historical_features(definitions, "ranking", rows((1, at(2, 30)))).to_pylist()
    assert (result[0]["trips"], result[0]["rating"]) == (20, 4.1)


def test_results_stream_in_batches(definitions) -> None:
    entity_rows = rows(*[(1 + index % 3, at(4)) for index in range(1000)])
    batches = list(stream_historical_features(definitions, "ranking", entity_rows, batch_rows=256))
    assert len(batches) >= 4 and sum(batch.num_rows for batch in batches) == 1000
    assert pa.Table.from_batches(batches).column("trips").to_pylist()[:3] == [31, 200, None]


def test_bad_requests_and_definitions_name_what_is_wrong(definitions) -> None:
    with pytest.raises(NotFoundError, match="no feature service 'nope'"):
        get_historical_features(definitions, "nope", rows((1, at(1))))
    with pytest.raises(InvalidArgumentError, match="expected a column 'event_timestamp'"):
        get_historical_features(definitions, "ranking", pa.table({"driver_id": [1]}))
    with pytest.raises(InvalidArgumentError, match="the rows lack \\['driver_id'\\]"):
        get_historical_features(definitions, "ranking", pa.table({"event_timestamp": [at(1)]}))
    with pytest.raises(InvalidArgumentError, match=r"feature_view #1 \(v\) entities: expected names of declared"):
        parse_definitions({"feature_view": [{"name": "v", "entities": ["ghost"]}]}, "f.toml")
    with pytest.raises(InvalidArgumentError, match="dtype: expected one of"):
        parse_definitions(
            {
                "entity": [{"name": "e"}],
                "feature_view": [{"name": "v", "entities": ["e"], "source": "x", "features": [{"name": "a"}]}],
            },
            "f.toml",
        )
    with pytest.raises(InvalidArgumentError, match="view 'driver_stats' has no feature 'speed'"):
        parse_definitions(
            {
                "entity": [{"name": "e"}],
                "feature_view": [
                    {"name": "driver_stats", "entities": ["e"], "source": "x",
                     "features": [{"name": "a", "dtype": "INT64"}]}
                ],
                "feature_service": [{"name": "s", "features": ["driver_stats:speed"]}],
            },
            "f.toml",
        )  # fmt: skip


def test_a_request_table_is_bounded_in_decoded_bytes() -> None:
    """A client stream of Arrow messages cannot grow the control plane past the bound (checked batch by
    batch as each message is decoded, IPC body compression included)."""
    table = pa.table({"x": pa.array([0] * 100_000, pa.int64())})  # 800 kB decoded
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        for batch in table.to_batches(max_chunksize=10_000):
            writer.write_batch(batch)
    payload = sink.getvalue().to_pybytes()
    assert len(payload) < 10_000  # a small message inflating 80-fold
    assert arrow_wire.decode(payload, "rows").equals(table)
    with pytest.raises(ResourceExhaustedError, match=r"^rows: expected at most 512 MiB"):
        arrow_wire.decode(payload, "rows", budget=500_000)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"feature_view": [{"name": "v", "entities": ["e"], "source": "x", "ttl_seconds": math.nan}]}, "ttl_seconds"),
        ({"feature_view": [{"name": "v", "entities": ["e"], "source": "x", "ttl_seconds": math.inf}]}, "ttl_seconds"),
        ({"feature_view": [{"name": "v", "entities": ["e"], "source": "x", "ttl_seconds": True}]}, "ttl_seconds"),
        ({"feature_view": [{"name": "v", "entities": ["e"], "source": "x", "features": [{}] * 1001}]}, "at most 1000"),
        ({"feature_view": [{"name": f"v{index}"} for index in range(1001)]}, "at most 1000 \\[\\[feature_view\\]\\]"),
        ({"entity": [{"name": "e" * 300}]}, "name: expected up to 256"),
    ],
)
def test_definitions_numbers_counts_and_names_are_bounded(document: dict, message: str) -> None:
    """A TOML document may say nan or inf; a TTL of NaN once reached DuckDB as INTERVAL nan (INTERNAL)."""
    document = {"entity": [{"name": "e"}], **document}
    features = [{"name": "a", "dtype": "INT64"}]
    for view in document.get("feature_view", []):
        view.setdefault("features", features)
    with pytest.raises(InvalidArgumentError, match=message):
        parse_definitions(document, "f.toml")
