"""`weir features ...`: the feature store's operations, through the control plane or locally.

    weir features validate FILE
    weir features apply FILE                                   # to the control plane
    weir features historical [FILE] --service S --entities ROWS.parquet --out OUT.parquet
    weir features materialize [FILE] START END [--view V ...]
    weir features materialize-incremental [FILE] [--view V ...]
    weir features push [FILE] --view V --rows ROWS.parquet
    weir features list [FILE]                                  # entities, views (features, dtypes), services
    weir features get SERVICE_OR_VIEW --entity KEY [--entity KEY ...]   # online values (control plane)

Without FILE the command runs on the control plane (`--control-plane`, default $WEIR_CONTROL_PLANE or
127.0.0.1:8011) with its applied definitions and its online store; with FILE it runs here against
that file, its Parquet sources and `--online-store` (default online.db beside FILE). Times are ISO
8601 (a zone-less time is UTC). Every command prints JSON with `--json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

from weir_control.cli_common import report_error, token_of
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, WeirError


def add_commands(subcommands: Any) -> None:
    features = subcommands.add_parser("features", help="feature store: apply, historical, materialize, push")
    actions = features.add_subparsers(dest="features_command", required=True)

    def command(name: str, text: str, local_only: bool = False, file_required: bool = False) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=text)
        parser.add_argument(
            "definitions",
            type=Path,
            nargs=None if file_required else "?",
            help="the TOML definitions file" + ("" if file_required else " (omit: run on the control plane)"),
        )
        parser.add_argument("--json", action="store_true")
        if local_only:
            return parser
        parser.add_argument("--online-store", default="", help="with FILE: redis:// URL or SQLite file")
        parser.add_argument("--control-plane", default=os.environ.get("WEIR_CONTROL_PLANE", "127.0.0.1:8011"))
        parser.add_argument("--token", default=os.environ.get("WEIR_TOKEN"), help="bearer token [env WEIR_TOKEN]")
        parser.add_argument("--tls-ca", type=Path, help="CA bundle: talk TLS to the control plane")
        return parser

    command("validate", "check a definitions file", local_only=True, file_required=True)
    command("apply", "send the definitions to the control plane (data planes enrich with them)", file_required=True)
    historical = command("historical", "point-in-time correct training data (Parquet out)")
    historical.add_argument("--service", required=True)
    historical.add_argument("--entities", type=Path, required=True, help="Parquet: join keys + event_timestamp")
    historical.add_argument("--out", type=Path, required=True)
    materialize = command("materialize", "latest values in [START, END) into the online store")
    materialize.add_argument("start")
    materialize.add_argument("end")
    materialize.add_argument("--view", action="append", default=None)
    incremental = command("materialize-incremental", "from each view's watermark to now")
    incremental.add_argument("--view", action="append", default=None)
    push = command("push", "real-time rows: online now, offline log for training")
    push.add_argument("--view", required=True)
    push.add_argument("--rows", type=Path, required=True, help="Parquet with the join keys, timestamp and features")
    command("list", "the definitions: entities, feature views (features, dtypes, freshness), services")
    get = actions.add_parser("get", help="online feature values of a feature service or view for entity keys")
    get.add_argument("name", help="a feature service, or a feature view (all its features)")
    get.add_argument(
        "--entity", action="append", required=True, metavar="KEY", help="an entity key (join-key values joined by '|')"
    )
    get.add_argument("--json", action="store_true")
    get.add_argument("--control-plane", default=os.environ.get("WEIR_CONTROL_PLANE", "127.0.0.1:8011"))
    get.add_argument("--token", default=os.environ.get("WEIR_TOKEN"), help="bearer token [env WEIR_TOKEN]")
    get.add_argument("--tls-ca", type=Path, help="CA bundle: talk TLS to the control plane")


def _time(text: str, field: str) -> datetime.datetime:
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgumentError(f"{field}: expected an ISO 8601 time, got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def run(args: argparse.Namespace) -> int:
    try:
        if args.features_command == "get":
            return _get(args)
        local = getattr(args, "definitions", None) and args.features_command != "apply"
        result = _run_local(args) if local else _run_remote(args)
    except WeirError as error:
        return report_error(args, error)
    if args.features_command == "list" and not args.json:
        print(_listing_text(result))
    else:
        print(
            json.dumps(result, indent=2) if args.json else "\n".join(f"{key}: {value}" for key, value in result.items())
        )
    return 0


def _listing(definitions: Any, revision: int | None) -> dict[str, Any]:
    """The definitions as a document: what `weir features list` prints."""
    document: dict[str, Any] = {} if revision is None else {"revision": revision}
    document["entities"] = [
        {"name": entity.name, "join_keys": list(entity.join_keys), "value_type": entity.value_type}
        for entity in sorted(definitions.entities.values(), key=lambda entity: entity.name)
    ]
    document["feature_views"] = [
        {
            "name": view.name,
            "entities": list(view.entities),
            "source": view.source,
            "timestamp_field": view.timestamp_field,
            "ttl_seconds": view.ttl_seconds,
            "freshness": view.freshness,
            "features": [{"name": feature.name, "dtype": feature.dtype} for feature in view.features],
        }
        for view in sorted(definitions.views.values(), key=lambda view: view.name)
    ]
    document["feature_services"] = [
        {"name": service.name, "features": [f"{view}:{feature}" for view, feature in service.features]}
        for service in sorted(definitions.services.values(), key=lambda service: service.name)
    ]
    return document


def _listing_text(document: dict[str, Any]) -> str:
    lines = [f"revision {document['revision']}"] if "revision" in document else []
    for entity in document["entities"]:
        lines.append(f"entity {entity['name']}: join keys {', '.join(entity['join_keys'])} ({entity['value_type']})")
    for view in document["feature_views"]:
        ttl = f"ttl {view['ttl_seconds']:g} s" if view["ttl_seconds"] else "no ttl"
        lines.append(
            f"feature_view {view['name']}: entities {', '.join(view['entities'])}; freshness {view['freshness']}; "
            f"{ttl}; source {view['source']}"
        )
        lines += [f"  {feature['name']}\t{feature['dtype']}" for feature in view["features"]]
    for service in document["feature_services"]:
        lines.append(f"feature_service {service['name']}: {', '.join(service['features'])}")
    return "\n".join(lines)


def _get(args: argparse.Namespace) -> int:
    """Online values through the control plane (its applied definitions and online store)."""
    from google.protobuf import json_format

    from weir_control.features.client import FeatureStoreClient

    certificates = args.tls_ca.read_bytes() if args.tls_ca else None
    with FeatureStoreClient(args.control_plane, token_of(args), certificates) as client:
        response = client.online_features(args.name, args.entity)
    rows = []
    for row in response.rows:
        values = {}
        for name, value in zip(response.feature_names, row.values, strict=True):
            kind = value.WhichOneof("kind")
            values[name] = getattr(value, kind) if kind else None
        times = {view: json_format.MessageToJson(time).strip('"') for view, time in sorted(row.event_times.items())}
        rows.append({"entity_key": row.entity_key, "features": values, "event_times": times})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("\t".join(["entity_key", *response.feature_names]))
    for row_document in rows:
        cells = ["-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
                 for value in row_document["features"].values()]  # fmt: skip
        print("\t".join([row_document["entity_key"], *cells]))
    return 0


def _write_parquet(batches: Any, out: Path) -> int:
    """Stream record batches into a Parquet file; returns the rows written."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    rows = 0
    writer = None
    try:
        with tqdm(unit=" rows", unit_scale=True, desc="historical", disable=None, file=sys.stderr) as progress:
            for batch in batches:
                if writer is None:
                    writer = pq.ParquetWriter(out, batch.schema)
                writer.write_batch(batch)
                rows += batch.num_rows
                progress.update(batch.num_rows)
    finally:
        if writer is not None:
            writer.close()
    return rows


def read_rows(path: Path, flag: str) -> Any:
    """A Parquet file the user named, or one clear error naming the flag (never a traceback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InvalidArgumentError(f"{flag}: expected a Parquet file, {path} does not exist or is not a file")
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise InvalidArgumentError(f"{flag}: expected a Parquet file, cannot read {path}: {error}") from None


def _run_remote(args: argparse.Namespace) -> dict[str, Any]:
    from weir_control.features.client import FeatureStoreClient

    token = token_of(args)
    certificates = args.tls_ca.read_bytes() if args.tls_ca else None
    command = args.features_command
    with FeatureStoreClient(args.control_plane, token, certificates) as client:
        if command == "apply":
            applied = client.apply(args.definitions)
            return {"revision": applied.revision, "feature_services": list(applied.feature_services)}
        if command == "list":
            import tomllib

            from weir_control.features.definitions import parse_definitions

            current = client.definitions()
            if not current.revision:
                raise FailedPreconditionError("feature definitions: none applied yet (weir features apply FILE)")
            definitions = parse_definitions(tomllib.loads(current.definitions_toml), "the applied definitions")
            return _listing(definitions, current.revision)
        if command == "historical":
            rows = _write_parquet(
                client.stream_historical_features(args.service, read_rows(args.entities, "--entities")), args.out
            )
            return {"rows": rows, "out": str(args.out)}
        if command == "materialize":
            return {"written": client.materialize(_time(args.start, "start"), _time(args.end, "end"), args.view)}
        if command == "materialize-incremental":
            return {"written": client.materialize_incremental(views=args.view)}
        return {"written": {args.view: client.push(args.view, read_rows(args.rows, "--rows"))}}


def _run_local(args: argparse.Namespace) -> dict[str, Any]:
    from weir_control.features.definitions import load_definitions

    definitions = load_definitions(args.definitions)
    command = args.features_command
    if command == "validate":
        from weir_control.features.offline import check_view_columns

        for view in definitions.views.values():  # the sources' columns too, not only the TOML
            check_view_columns(definitions, view)
        return {
            "entities": sorted(definitions.entities),
            "feature_views": sorted(definitions.views),
            "feature_services": sorted(definitions.services),
        }
    if command == "list":
        return _listing(definitions, None)
    if command == "historical":
        from weir_control.features.offline import stream_historical_features

        batches = stream_historical_features(definitions, args.service, read_rows(args.entities, "--entities"))
        return {"rows": _write_parquet(batches, args.out), "out": str(args.out)}
    from weir_control.features import materialize as operations
    from weir_proto.online_store import open_online_store

    store, _ = open_online_store(args.online_store or str(args.definitions.parent / "online.db"))
    try:
        if command == "materialize":
            written = operations.materialize(
                definitions, store, _time(args.start, "start"), _time(args.end, "end"), args.view
            )
        elif command == "materialize-incremental":
            written = operations.materialize_incremental(definitions, store, views=args.view)
        else:
            written = {args.view: operations.push(definitions, store, args.view, read_rows(args.rows, "--rows"))}
    finally:
        store.close()
    return {"written": written}
