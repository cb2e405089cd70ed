"""Historical retrieval with Feast's point-in-time semantics, on DuckDB over Parquet.

For each entity row (join keys + ``event_timestamp``) and each feature view the service uses: the
latest feature row of the same keys whose event timestamp is at or before the row's, and, when the
view has a TTL, no older than the TTL; among rows with the same event timestamp the one with the
latest created timestamp wins. An entity row with nothing valid gets nulls. The input order of the
entity rows is kept.

DuckDB's ASOF LEFT JOIN does the "latest at or before" in one pass per view; ties on the event
timestamp are settled first (one row per keys + event time, by created timestamp), so the ASOF match
is unambiguous.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import duckdb
import pyarrow as pa

from weir_control.features.definitions import Definitions, FeatureView
from weir_control.features.paths import parquet_files
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

ENTITY_TIMESTAMP = "event_timestamp"
_ROW = "__weir_row"
_TS = "__weir_feature_ts"


def quote(identifier: str) -> str:
    """A SQL identifier, quoted for DuckDB."""
    return '"' + identifier.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def parquet_source(view: FeatureView, feature_root: Path | None = None) -> str:
    """``read_parquet(...)`` for a view's file, glob or directory. With a ``feature_root`` (the control
    plane's), the explicit list of the files it matches, each checked to lie inside that root; without
    one (a user's own definitions, read by their own process), the pattern itself."""
    if feature_root is not None:
        files = ", ".join(_literal(file) for file in parquet_files(view, feature_root))
        return f"read_parquet([{files}], union_by_name = true)"
    path = Path(view.source)
    pattern = str(path / "**" / "*.parquet") if path.is_dir() else view.source
    return f"read_parquet({_literal(pattern)}, union_by_name = true)"


def _view_query(
    definitions: Definitions, view: FeatureView, features: list[str], feature_root: Path | None = None
) -> str:
    keys = definitions.join_keys(view)
    key_list = ", ".join(quote(key) for key in keys)
    columns = ", ".join(quote(feature) for feature in features)
    query = (
        f"SELECT {key_list}, CAST({quote(view.timestamp_field)} AS TIMESTAMPTZ) AS {_TS}, {columns} "
        f"FROM {parquet_source(view, feature_root)}"
    )
    if not view.created_timestamp_field:
        return query  # no tie-breaker declared: like Feast, any one row of a tied event time will do
    created = quote(view.created_timestamp_field)
    # One row per keys + event time, the latest created, so the ASOF match below is unambiguous.
    return (
        f"{query} QUALIFY row_number() OVER "
        f"(PARTITION BY {key_list}, {quote(view.timestamp_field)} ORDER BY {created} DESC NULLS LAST) = 1"
    )


def historical_query(
    definitions: Definitions, service_name: str, entity_columns: list[str], feature_root: Path | None = None
) -> str:
    """The SQL over a registered ``entity_rows`` relation (sources confined to ``feature_root`` if given)."""
    service = definitions.services.get(service_name)
    if service is None:
        raise NotFoundError(f"feature_service: no feature service '{service_name}' ({sorted(definitions.services)})")
    if ENTITY_TIMESTAMP not in entity_columns:
        raise InvalidArgumentError(f"entity rows: expected a column '{ENTITY_TIMESTAMP}', got {entity_columns}")
    names = [feature for _, feature in service.features]
    duplicated = {name for name in names if names.count(name) > 1}
    by_view: dict[str, list[str]] = {}
    for view_name, feature in service.features:
        by_view.setdefault(view_name, []).append(feature)
    relation = (
        f"(SELECT *, CAST({quote(ENTITY_TIMESTAMP)} AS TIMESTAMPTZ) AS __weir_entity_ts, "
        f"row_number() OVER () AS {_ROW} FROM entity_rows)"
    )
    selected: list[str] = []
    for step, (view_name, features) in enumerate(by_view.items()):
        view = definitions.views[view_name]
        keys = definitions.join_keys(view)
        missing = [key for key in keys if key not in entity_columns]
        if missing:
            raise InvalidArgumentError(
                f"entity rows: feature view '{view_name}' joins on {list(keys)}, the rows lack {missing}"
            )
        alias = f"v{step}"
        ttl = (
            f" AND b.__weir_entity_ts - {alias}.{_TS} <= INTERVAL {float(view.ttl_seconds)!r} SECOND"
            if view.ttl_seconds
            else ""
        )
        outputs = []
        for feature in features:
            name = f"{view_name}__{feature}" if feature in duplicated else feature
            outputs.append(
                f"CASE WHEN {alias}.{_TS} IS NOT NULL{ttl} THEN {alias}.{quote(feature)} END AS {quote(name)}"
            )
            selected.append(name)
        on = " AND ".join(f"b.{quote(key)} = {alias}.{quote(key)}" for key in keys)
        relation = (
            f"(SELECT b.*, {', '.join(outputs)} FROM {relation} b "
            f"ASOF LEFT JOIN ({_view_query(definitions, view, features, feature_root)}) {alias} "
            f"ON {on} AND b.__weir_entity_ts >= {alias}.{_TS})"
        )
    columns = ", ".join(quote(column) for column in [*entity_columns, *selected])
    return f"SELECT {columns} FROM {relation} ORDER BY {_ROW}"


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:500] if lines else type(error).__name__


def source_columns(view: FeatureView, feature_root: Path | None = None) -> list[str]:
    """The columns DuckDB sees in a view's source (its Parquet files' footers only)."""
    source = parquet_source(view, feature_root)
    connection = _connect()
    try:
        return [row[0] for row in connection.sql(f"DESCRIBE SELECT * FROM {source}").fetchall()]
    except duckdb.Error as error:
        raise FailedPreconditionError(
            f"feature_view '{view.name}' source {view.source!r}: cannot read its Parquet files: {first_line(error)}"
        ) from None
    finally:
        connection.close()


def check_view_columns(definitions: Definitions, view: FeatureView, feature_root: Path | None = None) -> None:
    """Every column the definitions name for ``view`` (join keys, timestamps, features) is in its source:
    a wrong name is one clear error naming the view and the column, not DuckDB's BinderException."""
    wanted = [(key, "join key") for key in definitions.join_keys(view)]
    wanted.append((view.timestamp_field, "timestamp_field"))
    if view.created_timestamp_field:
        wanted.append((view.created_timestamp_field, "created_timestamp_field"))
    wanted += [(feature.name, "feature") for feature in view.features]
    columns = source_columns(view, feature_root)
    missing = [f"'{name}' ({role})" for name, role in wanted if name not in columns]
    if missing:
        raise FailedPreconditionError(
            f"feature_view '{view.name}': expected the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"in its source {view.source!r}, got columns {columns}"
        )


def check_service_columns(definitions: Definitions, service_name: str, feature_root: Path | None = None) -> None:
    service = definitions.services.get(service_name)
    if service is None:
        return  # historical_query names it
    for view_name in dict.fromkeys(view for view, _ in service.features):
        check_view_columns(definitions, definitions.views[view_name], feature_root)


def _connect() -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    return connection


def get_historical_features(
    definitions: Definitions, service_name: str, entity_rows: pa.Table, feature_root: Path | None = None
) -> pa.Table:
    query = historical_query(definitions, service_name, entity_rows.column_names, feature_root)
    check_service_columns(definitions, service_name, feature_root)
    connection = _connect()
    try:
        connection.register("entity_rows", entity_rows)
        # .sql(): a relation streams into Arrow without the extra copy a DB-API cursor makes
        return connection.sql(query).to_arrow_table()
    except duckdb.Error as error:
        raise FailedPreconditionError(f"feature service '{service_name}': {first_line(error)}") from None
    finally:
        connection.close()


def stream_historical_features(
    definitions: Definitions,
    service_name: str,
    entity_rows: pa.Table,
    batch_rows: int = 65536,
    feature_root: Path | None = None,
) -> Generator[pa.RecordBatch]:
    """The same, in record batches: large outputs never sit in memory whole."""
    query = historical_query(definitions, service_name, entity_rows.column_names, feature_root)
    check_service_columns(definitions, service_name, feature_root)
    connection = _connect()
    try:
        connection.register("entity_rows", entity_rows)
        try:
            relation = connection.sql(query)
            yield from relation.to_arrow_reader(batch_rows)
        except duckdb.Error as error:
            raise FailedPreconditionError(f"feature service '{service_name}': {first_line(error)}") from None
    finally:
        connection.close()
