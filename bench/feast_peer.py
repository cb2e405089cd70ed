"""Feast's historical retrieval on the data `bench/features.py` writes: run by the Feast virtualenv's Python
as a subprocess (it never imports weir), one offline store per run.

    .peers/feast/bin/python bench/feast_peer.py --entity-rows ENTITY.parquet --source VIEW.parquet \
        --offline-store {file,duckdb} [--join-key entity_id] [--features f0,f1,...] [--ttl-seconds 604800] \
        [--result RESULT.parquet]

Builds a throwaway Feast repository in a temporary directory, in code (`RepoConfig`: provider local, the
chosen offline store, a SQLite online store and a file registry in that directory), applies one Entity, a
FileSource over the Parquet file, a FeatureView with the TTL and a FeatureService over it, then times
`store.get_historical_features(entity_df=..., features=service).to_arrow()` on the wall clock (not the
apply, not reading the entity rows into pandas). The entity Parquet file carries a `row_id` column, passed
through as an extra entity-dataframe column, so the caller can line Feast's rows (which come back in
another order) up with its own. Prints one JSON line: offline store, seconds, rows in and out, nulls,
a checksum, peak RSS. With --result, writes the rows sorted by `row_id` to that Parquet file.

Offline stores: `file` is Feast's default (Dask over pandas); `duckdb` is the ibis/DuckDB store, which
needs `feast[duckdb]`. Both take a feature row when event_timestamp <= the entity row's timestamp and,
with a TTL, event_timestamp >= entity timestamp - TTL, the latest such row winning: Weir's semantics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("FEAST_USAGE", "False")  # no telemetry; the machine is offline anyway

ENTITY_TIMESTAMP = "event_timestamp"
ROW_ID = "row_id"


def peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM): unlike getrusage's ru_maxrss, not inherited from a
    large parent across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def build_store(repo: Path, args: argparse.Namespace) -> tuple[Any, Any]:
    from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.repo_config import RepoConfig
    from feast.types import Float64

    config = RepoConfig(
        project="weir_bench",
        provider="local",
        registry=str(repo / "registry.db"),
        offline_store={"type": args.offline_store},
        online_store={"type": "sqlite", "path": str(repo / "online.db")},
        entity_key_serialization_version=3,
        repo_path=repo,
    )
    store = FeatureStore(config=config)
    entity = Entity(name="entity", join_keys=[args.join_key], value_type=ValueType.INT64)
    source = FileSource(name="view_source", path=str(args.source.resolve()), timestamp_field=args.timestamp_field)
    view = FeatureView(
        name="view",
        entities=[entity],
        ttl=timedelta(seconds=args.ttl_seconds),
        schema=[Field(name=name, dtype=Float64) for name in args.features],
        source=source,
        online=False,
    )
    service = FeatureService(name="all", features=[view])
    store.apply([entity, view, service])
    return store, store.get_feature_service("all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entity-rows", type=Path, required=True, help="Parquet: join key, event_timestamp, row_id")
    parser.add_argument("--source", type=Path, required=True, help="the feature view's Parquet file")
    parser.add_argument("--offline-store", choices=["file", "duckdb"], required=True)
    parser.add_argument("--join-key", default="entity_id")
    parser.add_argument("--timestamp-field", default="event_timestamp")
    parser.add_argument("--features", type=lambda text: text.split(","), default=[f"f{i}" for i in range(10)])
    parser.add_argument("--ttl-seconds", type=int, default=7 * 86400)
    parser.add_argument("--result", type=Path, help="write the rows, sorted by row_id, to this Parquet file")
    args = parser.parse_args(argv)

    import feast
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    entity_df = pd.read_parquet(args.entity_rows)
    # Feast expects nanosecond UTC timestamps in the entity dataframe (as from pd.to_datetime(..., utc=True)).
    entity_df[ENTITY_TIMESTAMP] = pd.to_datetime(entity_df[ENTITY_TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
    with tempfile.TemporaryDirectory(prefix="weir-feast-") as tmp:
        store, service = build_store(Path(tmp), args)
        began = time.perf_counter()
        table = store.get_historical_features(entity_df=entity_df, features=service).to_arrow()
        seconds = time.perf_counter() - began
    table = table.select([ROW_ID, args.join_key, ENTITY_TIMESTAMP, *args.features])
    table = table.sort_by(ROW_ID)
    first = table.column(args.features[0])
    report = {
        "offline_store": args.offline_store,
        "feast": feast.__version__,
        "seconds": seconds,
        "entity_rows": len(entity_df),
        "rows": table.num_rows,
        "distinct_row_ids": len(pc.unique(table.column(ROW_ID))),
        "null_rows": first.null_count,
        "checksum": {
            f"sum_{args.features[0]}": pc.sum(first).as_py(),
            "sum_row_id": pc.sum(table.column(ROW_ID)).as_py(),
        },
        "max_rss_mib": peak_rss_mib(),
    }
    if args.result:
        pq.write_table(pa.table(table), args.result)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
