"""From the offline store to the online one: ``materialize`` a time range, ``materialize_incremental``
from each view's watermark to now, and ``push`` real-time rows (online at once, and appended to the
view's offline directory so training sees them too)."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from weir_control.features.definitions import Definitions, FeatureView
from weir_control.features.offline import check_view_columns, first_line, parquet_source, quote
from weir_control.features.paths import push_directory
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from weir_proto.online_store import OnlineStore, entity_key

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def latest_rows(
    definitions: Definitions,
    view: FeatureView,
    start: datetime.datetime,
    end: datetime.datetime,
    feature_root: Path | None = None,
) -> pa.Table:
    """Per entity, its latest row with start <= event time < end (created timestamp breaks ties)."""
    keys = ", ".join(quote(key) for key in definitions.join_keys(view))
    timestamp = quote(view.timestamp_field)
    order = f"{timestamp} DESC" + (
        f", {quote(view.created_timestamp_field)} DESC NULLS LAST" if view.created_timestamp_field else ""
    )
    features = ", ".join(quote(feature.name) for feature in view.features)
    check_view_columns(definitions, view, feature_root)
    connection = duckdb.connect()
    try:
        connection.execute("SET TimeZone = 'UTC'")
        # .sql(): a relation streams into Arrow without the extra copy a DB-API cursor makes
        return connection.sql(
            f"SELECT {keys}, epoch(CAST({timestamp} AS TIMESTAMPTZ)) AS __event_ts, {features} "
            f"FROM {parquet_source(view, feature_root)} WHERE CAST({timestamp} AS TIMESTAMPTZ) >= ? "
            f"AND CAST({timestamp} AS TIMESTAMPTZ) < ? "
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {order}) = 1",
            params=[start, end],
        ).to_arrow_table()
    except duckdb.Error as error:
        raise FailedPreconditionError(f"feature_view '{view.name}': {first_line(error)}") from None
    finally:
        connection.close()


def _write(definitions: Definitions, view: FeatureView, table: pa.Table, store: OnlineStore) -> int:
    keys = definitions.join_keys(view)
    rows = []
    for record in table.to_pylist():
        values = {feature.name: record.get(feature.name) for feature in view.features}
        event_ts = record["__event_ts"]
        rows.append((entity_key([record[key] for key in keys]), float(event_ts), values))
    written = 0
    for offset in range(0, len(rows), 1000):  # pipelines of a thousand keys
        written += store.write(view.name, rows[offset : offset + 1000])
    return written


def materialize(
    definitions: Definitions,
    store: OnlineStore,
    start: datetime.datetime,
    end: datetime.datetime,
    views: list[str] | None = None,
    feature_root: Path | None = None,
) -> dict[str, int]:
    """Latest value per entity in [start, end) for each view (all, or ``views``) into the online store;
    returns rows written per view (rows older than what is online are skipped). Sources are confined to
    ``feature_root`` when one is given (the control plane's)."""
    if end <= start:
        raise InvalidArgumentError(f"end: expected a time after start ({start.isoformat()}), got {end.isoformat()}")
    written = {}
    for name in views or list(definitions.views):
        view = definitions.views.get(name)
        if view is None:
            raise NotFoundError(f"views: no feature view '{name}' ({sorted(definitions.views)})")
        written[name] = _write(definitions, view, latest_rows(definitions, view, start, end, feature_root), store)
    return written


def materialize_incremental(
    definitions: Definitions,
    store: OnlineStore,
    end: datetime.datetime | None = None,
    views: list[str] | None = None,
    feature_root: Path | None = None,
) -> dict[str, int]:
    """Each view (all, or ``views``) from its watermark (or the beginning) to ``end`` (now), then the
    watermark moves."""
    end = end or datetime.datetime.now(datetime.UTC)
    written = {}
    for name in views or list(definitions.views):
        view = definitions.views.get(name)
        if view is None:
            raise NotFoundError(f"views: no feature view '{name}' ({sorted(definitions.views)})")
        mark = store.get_watermark(name)
        start = datetime.datetime.fromtimestamp(mark, datetime.UTC) if mark is not None else EPOCH
        if end <= start:
            written[name] = 0
            continue
        written[name] = _write(definitions, view, latest_rows(definitions, view, start, end, feature_root), store)
        store.set_watermark(name, end.timestamp())
    return written


def push(
    definitions: Definitions, store: OnlineStore, view_name: str, rows: pa.Table, feature_root: Path | None = None
) -> int:
    """Real-time rows: online now, and a Parquet file in the view's source directory for training (inside
    ``feature_root`` when one is given: the control plane's)."""
    view = definitions.views.get(view_name)
    if view is None:
        raise NotFoundError(f"view: no feature view '{view_name}' ({sorted(definitions.views)})")
    needed = [*definitions.join_keys(view), view.timestamp_field]
    missing = [column for column in needed if column not in rows.column_names]
    if missing:
        raise InvalidArgumentError(f"rows: expected columns {needed} and the features, missing {missing}")
    pushed = push_directory(view, feature_root)
    staged = pushed / f".push-{uuid.uuid4().hex}.parquet"
    pq.write_table(rows, staged)
    staged.rename(pushed / staged.name.lstrip("."))  # readers never see a half-written file
    timestamps = rows.column(view.timestamp_field).cast(pa.timestamp("us", tz="UTC")).to_pylist()
    table = rows.append_column("__event_ts", pa.array([moment.timestamp() for moment in timestamps]))
    return _write(definitions, view, table, store)
