"""`weir features ...`: the feature store's operations run locally against the definitions file, the
Parquet sources and the online store (the control-plane RPCs for them are still to come).

    weir features validate FILE
    weir features historical FILE --service S --entities ROWS.parquet --out OUT.parquet
    weir features materialize FILE START END [--online-store redis://...|DB] [--view V ...]
    weir features materialize-incremental FILE [--online-store ...]
    weir features push FILE VIEW ROWS.parquet [--online-store ...]

Times are ISO 8601 (a zone-less time is UTC). `--online-store` defaults to online.db beside FILE.
Every command prints JSON with `--json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

from weir_proto.errors import InvalidArgumentError, WeirError


def add_commands(subcommands: Any) -> None:
    features = subcommands.add_parser("features", help="feature store: validate, historical, materialize, push")
    actions = features.add_subparsers(dest="features_command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=text)
        parser.add_argument("definitions", type=Path, help="the TOML definitions file")
        parser.add_argument("--online-store", default="", help="redis:// URL or SQLite file")
        parser.add_argument("--json", action="store_true")
        return parser

    command("validate", "check a definitions file")
    apply = command("apply", "send the definitions to the control plane (data planes enrich with them)")
    apply.add_argument("--control-plane", default=os.environ.get("WEIR_CONTROL_PLANE", "127.0.0.1:8011"))
    apply.add_argument("--token", default=os.environ.get("WEIR_TOKEN"), help="bearer token [env WEIR_TOKEN]")
    historical = command("historical", "point-in-time correct training data (Parquet out)")
    historical.add_argument("--service", required=True)
    historical.add_argument("--entities", type=Path, required=True, help="Parquet: join keys + event_timestamp")
    historical.add_argument("--out", type=Path, required=True)
    materialize = command("materialize", "latest values in [START, END) into the online store")
    materialize.add_argument("start")
    materialize.add_argument("end")
    materialize.add_argument("--view", action="append", default=None)
    command("materialize-incremental", "from each view's watermark to now")
    push = command("push", "real-time rows: online now, offline log for training")
    push.add_argument("view")
    push.add_argument("rows", type=Path, help="Parquet with the join keys, timestamp and features")


def _time(text: str, field: str) -> datetime.datetime:
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgumentError(f"{field}: expected an ISO 8601 time, got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def run(args: argparse.Namespace) -> int:
    try:
        result = _run(args)
    except WeirError as error:
        if args.json:
            print(json.dumps({"error": {"code": error.kind.name, "message": error.message}}))
        else:
            print(f"weir features: {error.message}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else "\n".join(f"{key}: {value}" for key, value in result.items()))
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from weir_control.features.definitions import load_definitions

    definitions = load_definitions(args.definitions)
    command = args.features_command
    if command == "apply":
        import grpc

        from weir_control.cli import DEFAULT_TOKEN_FILE
        from weir_proto.auth import client_metadata
        from weir_proto.control.v1 import features_pb2, features_pb2_grpc

        token = args.token or (DEFAULT_TOKEN_FILE.read_text().strip() if DEFAULT_TOKEN_FILE.is_file() else None)
        with grpc.insecure_channel(args.control_plane) as channel:
            try:
                applied = features_pb2_grpc.FeaturesStub(channel).ApplyFeatures(
                    features_pb2.ApplyFeaturesRequest(definitions_toml=args.definitions.read_text(encoding="utf-8")),
                    metadata=client_metadata(token),
                    timeout=30,
                )
            except grpc.RpcError as error:
                raise WeirError(f"{error.code().name}: {error.details()}") from error
        return {"revision": applied.revision, "feature_services": list(applied.feature_services)}
    if command == "validate":
        return {
            "entities": sorted(definitions.entities),
            "feature_views": sorted(definitions.views),
            "feature_services": sorted(definitions.services),
        }
    if command == "historical":
        import pyarrow.parquet as pq

        from weir_control.features.offline import stream_historical_features

        rows = 0
        writer = None
        try:
            for batch in stream_historical_features(definitions, args.service, pq.read_table(args.entities)):
                if writer is None:
                    writer = pq.ParquetWriter(args.out, batch.schema)
                writer.write_batch(batch)
                rows += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
        return {"rows": rows, "out": str(args.out)}
    from weir_control.features import materialize as operations
    from weir_proto.online_store import open_online_store

    store, _ = open_online_store(args.online_store or str(args.definitions.parent / "online.db"))
    try:
        if command == "materialize":
            written = operations.materialize(
                definitions, store, _time(args.start, "start"), _time(args.end, "end"), args.view
            )
        elif command == "materialize-incremental":
            written = operations.materialize_incremental(definitions, store)
        else:
            import pyarrow.parquet as pq

            written = {args.view: operations.push(definitions, store, args.view, pq.read_table(args.rows))}
    finally:
        store.close()
    return {"written": written}
