"""Feature definitions (shared by both planes), declared in TOML (`weir features apply FILE`)::

    [[entity]]
    name = "driver"
    join_keys = ["driver_id"]
    value_type = "INT64"          # INT64 or STRING

    [[feature_view]]
    name = "driver_stats"
    entities = ["driver"]
    source = "data/driver_stats/*.parquet"   # a file, a glob or a directory of Parquet files
    timestamp_field = "event_timestamp"
    created_timestamp_field = "created"      # optional: breaks ties between rows of one event time
    ttl_seconds = 86400                      # 0: rows never expire
    freshness = "batch"                      # static, batch, near-real-time or real-time
    features = [{ name = "trips", dtype = "INT64" }, { name = "rating", dtype = "FLOAT64" }]

    [[feature_service]]
    name = "driver_ranking"
    features = ["driver_stats:trips", "driver_stats:rating"]   # or "driver_stats" for all of a view

A relative ``source`` is resolved against the top-level ``base_directory`` key when the document has
one, else against the file's own directory (``load_definitions``) or the caller's base (the control
plane's feature root; ``weir features apply`` sends the file's directory, which the control plane
records as ``base_directory``). Validation errors name the table, the entry and the field.

The control plane confines what it reads and writes to its operator's feature root (``weir control
--feature-root``): a ``base_directory`` and every ``source`` must resolve inside that root, whatever a
document declares (``weir_control.features.paths``); parsing here only resolves paths.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weir_proto.errors import InvalidArgumentError

VALUE_TYPES = ("INT64", "STRING")
DTYPES = ("INT64", "INT32", "FLOAT64", "FLOAT32", "BOOL", "STRING")
FRESHNESS = {"static": None, "batch": 86400.0, "near-real-time": 300.0, "real-time": 5.0}  # max age, seconds
# Bounds on a document (it reaches every data plane): entries per table, features per view, name length, TTL.
MAX_ENTRIES = 1000
MAX_VIEW_FEATURES = 1000
MAX_NAME_CHARS = 256
MAX_TTL_SECONDS = 100 * 365 * 86400.0


@dataclass(frozen=True)
class Entity:
    name: str
    join_keys: tuple[str, ...]
    value_type: str


@dataclass(frozen=True)
class Feature:
    name: str
    dtype: str


@dataclass(frozen=True)
class FeatureView:
    name: str
    entities: tuple[str, ...]
    source: str
    timestamp_field: str
    features: tuple[Feature, ...]
    created_timestamp_field: str = ""
    ttl_seconds: float = 0.0
    freshness: str = "batch"

    def feature(self, name: str) -> Feature | None:
        return next((feature for feature in self.features if feature.name == name), None)


@dataclass(frozen=True)
class FeatureService:
    name: str
    features: tuple[tuple[str, str], ...]  # (view, feature)


@dataclass(frozen=True)
class Definitions:
    entities: dict[str, Entity]
    views: dict[str, FeatureView]
    services: dict[str, FeatureService]

    def join_keys(self, view: FeatureView) -> tuple[str, ...]:
        return tuple(key for entity in view.entities for key in self.entities[entity].join_keys)


def load_definitions(path: Path) -> Definitions:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise InvalidArgumentError(f"{path}: cannot read the feature definitions: {error}") from error
    return parse_definitions(document, str(path), base=path.parent)


def parse_definitions(document: dict[str, Any], source: str, base: Path | None = None) -> Definitions:
    declared_base = document.get("base_directory")
    if declared_base is not None:
        if not isinstance(declared_base, str) or not Path(declared_base).is_absolute():
            raise InvalidArgumentError(f"{source}: base_directory: expected an absolute path, got {declared_base!r}")
        base = Path(declared_base)
    for table in ("entity", "feature_view", "feature_service"):
        entries = document.get(table, [])
        if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
            count = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise InvalidArgumentError(
                f"{source}: {table}: expected at most {MAX_ENTRIES} [[{table}]] tables, got {count}"
            )
    entities: dict[str, Entity] = {}
    for index, item in enumerate(document.get("entity", [])):
        where = f"{source}: entity #{index + 1}"
        name = _name(item, where)
        keys = item.get("join_keys") or [name]
        if not isinstance(keys, list) or not all(isinstance(key, str) and key for key in keys):
            raise InvalidArgumentError(f"{where} ({name}) join_keys: expected a list of column names, got {keys!r}")
        value_type = str(item.get("value_type", "STRING")).upper()
        if value_type not in VALUE_TYPES:
            raise InvalidArgumentError(
                f"{where} ({name}) value_type: expected one of {VALUE_TYPES}, got {value_type!r}"
            )
        entities[name] = Entity(name, tuple(keys), value_type)
    views: dict[str, FeatureView] = {}
    for index, item in enumerate(document.get("feature_view", [])):
        where = f"{source}: feature_view #{index + 1}"
        name = _name(item, where)
        where = f"{where} ({name})"
        view_entities = item.get("entities", [])
        unknown = [entity for entity in view_entities if entity not in entities]
        if not view_entities or unknown:
            raise InvalidArgumentError(
                f"{where} entities: expected names of declared entities {sorted(entities)}, got {view_entities!r}"
            )
        source_path = str(item.get("source", ""))
        if not source_path:
            raise InvalidArgumentError(f"{where} source: expected a Parquet file, glob or directory, got none")
        if base is not None and not Path(source_path).is_absolute():
            source_path = str(base / source_path)
        declared = item.get("features", [])
        if not isinstance(declared, list) or len(declared) > MAX_VIEW_FEATURES:
            count = len(declared) if isinstance(declared, list) else type(declared).__name__
            raise InvalidArgumentError(f"{where} features: expected at most {MAX_VIEW_FEATURES} features, got {count}")
        features = []
        for position, feature in enumerate(declared):
            feature_name = _name(feature, f"{where} features #{position + 1}")
            dtype = str(feature.get("dtype", "")).upper()
            if dtype not in DTYPES:
                raise InvalidArgumentError(
                    f"{where} features #{position + 1} ({feature_name}) dtype: expected one of {DTYPES}, got {dtype!r}"
                )
            features.append(Feature(feature_name, dtype))
        if not features:
            raise InvalidArgumentError(f"{where} features: expected at least one feature, got none")
        freshness = str(item.get("freshness", "batch"))
        if freshness not in FRESHNESS:
            raise InvalidArgumentError(f"{where} freshness: expected one of {sorted(FRESHNESS)}, got {freshness!r}")
        ttl = item.get("ttl_seconds", 0)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 <= ttl <= MAX_TTL_SECONDS:
            raise InvalidArgumentError(
                f"{where} ttl_seconds: expected 0 to {MAX_TTL_SECONDS:.0f} seconds (100 years), got {ttl!r}"
            )
        views[name] = FeatureView(
            name=name,
            entities=tuple(view_entities),
            source=source_path,
            timestamp_field=str(item.get("timestamp_field", "event_timestamp")),
            created_timestamp_field=str(item.get("created_timestamp_field", "")),
            ttl_seconds=float(ttl),
            freshness=freshness,
            features=tuple(features),
        )
    services: dict[str, FeatureService] = {}
    for index, item in enumerate(document.get("feature_service", [])):
        where = f"{source}: feature_service #{index + 1}"
        name = _name(item, where)
        chosen: list[tuple[str, str]] = []
        for reference in item.get("features", []):
            view_name, _, feature_name = str(reference).partition(":")
            view = views.get(view_name)
            if view is None:
                raise InvalidArgumentError(
                    f"{where} ({name}) features: expected view:feature with a declared view {sorted(views)}, "
                    f"got {reference!r}"
                )
            if not feature_name:
                chosen += [(view_name, feature.name) for feature in view.features]
            elif view.feature(feature_name) is None:
                raise InvalidArgumentError(
                    f"{where} ({name}) features: view '{view_name}' has no feature '{feature_name}' "
                    f"({[feature.name for feature in view.features]})"
                )
            else:
                chosen.append((view_name, feature_name))
        if not chosen:
            raise InvalidArgumentError(f"{where} ({name}) features: expected at least one feature, got none")
        services[name] = FeatureService(name, tuple(chosen))
    return Definitions(entities, views, services)


def _name(item: Any, where: str) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_NAME_CHARS
        or not name.replace("_", "").replace("-", "").isalnum()
    ):
        shown = name[:MAX_NAME_CHARS] + "..." if isinstance(name, str) and len(name) > MAX_NAME_CHARS else name
        raise InvalidArgumentError(
            f"{where} name: expected up to {MAX_NAME_CHARS} letters, digits, '_' or '-', got {shown!r}"
        )
    return name
