"""The control plane's commands: ``weir control`` (the service) and the client commands release
tooling uses: ``weir models push|list|show|alias``, ``weir deploy|undeploy|deployments``,
``weir audit``. Every client command takes ``--json`` for machine-readable output.

Client options come from flags or the environment: ``--control-plane`` / WEIR_CONTROL_PLANE (default
127.0.0.1:8011), ``--token`` / WEIR_TOKEN (default: the file ``.weir/admin.token`` that ``weir up``
writes, if present), ``--tls-ca`` / WEIR_TLS_CA.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from weir_proto.auth import client_metadata
from weir_proto.control.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    deployments_pb2,
    deployments_pb2_grpc,
    experiments_pb2,
    experiments_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    rollouts_pb2,
    rollouts_pb2_grpc,
)
from weir_proto.errors import WeirError, error_for_status

DEFAULT_CONTROL_PLANE = "127.0.0.1:8011"
DEFAULT_TOKEN_FILE = Path(".weir") / "admin.token"
UPLOAD_CHUNK = 1 << 20
CLIENT_COMMANDS = (
    "models", "deploy", "undeploy", "deployments", "audit", "traffic", "flags", "shadow", "rollout", "ab",
    "token",  # local: makes a token and its token-file entry (no control plane is called)
)  # fmt: skip


# --- parser --------------------------------------------------------------------------------------


def add_commands(subcommands: Any) -> None:
    control = subcommands.add_parser("control", help="run the control plane (registry, deployments, attach stream)")
    control.add_argument("--state-dir", type=Path, default=Path(".weir"), help="SQLite file and artifacts (.weir)")
    control.add_argument("--database-url", default=os.environ.get("WEIR_DATABASE_URL", ""),
                         help="postgresql+psycopg://... instead of SQLite [env WEIR_DATABASE_URL]")  # fmt: skip
    control.add_argument("--artifact-dir", type=Path, help="artifact store (default STATE_DIR/artifacts)")
    control.add_argument("--listen-address", default="127.0.0.1")
    control.add_argument("--port", type=int, default=8011, help="gRPC port (0 picks one; it is logged)")
    control.add_argument("--tokens", type=Path, help="TOML token file (else WEIR_TOKENS)")
    control.add_argument("--tls-cert", type=Path)
    control.add_argument("--tls-key", type=Path)
    control.add_argument("--tls-client-ca", type=Path, help="require client certificates it signed (mutual TLS)")
    control.add_argument("--metrics-port", type=int, default=-1, help="Prometheus /metrics port (-1: off)")
    control.add_argument(
        "--online-store", default="", help="feature online store told to data planes (redis:// or file)"
    )
    control.add_argument("--jobs-dir", type=Path, help="training jobs' directories (default STATE_DIR/jobs)")
    control.add_argument("--max-concurrent-jobs", type=int, default=2, help="training attempts running at once")
    control.add_argument("--job-user", default="weir-job", help="OS user jobs run as when root (weir-job)")
    control.add_argument(
        "--feature-root",
        type=Path,
        help="relative feature sources of documents without base_directory (default STATE_DIR/features)",
    )
    control.add_argument(
        "--webhook-allow", action="append", default=[], metavar="HOST[:PORT]|ADDRESS[:PORT]|CIDR",
        help="a destination drift webhooks may reach (repeatable; default none: no webhook may be set)",
    )  # fmt: skip
    control.add_argument(
        "--replica-id", default=os.environ.get("WEIR_REPLICA_ID", ""),
        help="this replica's name in the lease and reports (default HOST-PID-RANDOM) [env WEIR_REPLICA_ID]",
    )  # fmt: skip
    control.add_argument(
        "--lease-seconds", type=float, default=float(os.environ.get("WEIR_LEASE_SECONDS", "6")),
        help="the singleton lease's time to live: renewed every third, a dead holder is replaced within "
        "4/3 of it (6) [env WEIR_LEASE_SECONDS]",
    )  # fmt: skip
    control.add_argument(
        "--advertise-address", default=os.environ.get("WEIR_ADVERTISE_ADDRESS", ""),
        help="HOST:PORT other replicas' training jobs reach this replica at (default: the listen address "
        "and port, 127.0.0.1 for a wildcard) [env WEIR_ADVERTISE_ADDRESS]",
    )  # fmt: skip
    control.add_argument("--log-level", default="INFO")
    control.add_argument("--log-format", default="json", choices=("json", "text"))
    gc = subcommands.add_parser("control-gc", help="delete artifacts no model version references")
    gc.add_argument("--state-dir", type=Path, default=Path(".weir"))
    gc.add_argument("--database-url", default=os.environ.get("WEIR_DATABASE_URL", ""))
    gc.add_argument("--artifact-dir", type=Path)
    gc.add_argument("--min-age-seconds", type=float, default=3600.0)
    gc.add_argument("--json", action="store_true")

    models = subcommands.add_parser("models", help="the model registry")
    actions = models.add_subparsers(dest="models_command", required=True)
    push = actions.add_parser("push", help="upload a model file with its config.pbtxt as a new version")
    push.add_argument("name")
    push.add_argument(
        "model_file", type=Path,
        help="a TorchScript (torch.jit.save) or torch.export (torch.export.save) archive, any file name: it is "
        "stored as the version's model.pt or model.pt2, by its content",
    )  # fmt: skip
    push.add_argument(
        "--format", choices=("torchscript", "export"),
        help="what the file must be (default: whichever archive it is); a file that is not is refused",
    )  # fmt: skip
    push.add_argument("--config", type=Path, required=True, help="the version's config.pbtxt")
    push.add_argument(
        "--validation", type=Path, metavar="NPZ",
        help="validation inputs (numpy.savez: one array per input, numbers only, at most 64 MiB): stored with the "
        "version and served as validation.npz, where the accuracy gate of a lowered precision runs on them",
    )  # fmt: skip
    push.add_argument("--description", default="")
    push.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    push.add_argument("--metric", action="append", default=[], metavar="NAME=NUMBER")
    push.add_argument("--source-job", default="")
    push.add_argument("--dataset-hash", default="")
    push.add_argument("--code-version", default="")
    push.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="lineage parameter")
    push.add_argument("--alias", action="append", default=[], help="set this alias on the new version")
    listing = actions.add_parser("list", help="registered models")
    listing.add_argument("--name-contains", default="")
    listing.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    show = actions.add_parser("show", help="a model, or one of its versions")
    show.add_argument("name")
    show.add_argument("version", nargs="?", help="a version number or an alias")
    download = actions.add_parser("download", help="download a version's artifact (sha256 checked)")
    download.add_argument("name")
    download.add_argument("version", help="a version number or an alias")
    download.add_argument("--out", type=Path, help="file to write (default: the artifact's name, here)")
    alias = actions.add_parser("alias", help="set (or --delete) an alias")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", nargs="?", type=int)
    alias.add_argument("--delete", action="store_true")

    deploy = subcommands.add_parser("deploy", help="point an endpoint at a model version or alias")
    deploy.add_argument("endpoint")
    deploy.add_argument("model")
    deploy.add_argument("target", help="a version number or an alias")
    traffic = subcommands.add_parser("traffic", help="split an endpoint's traffic between variants")
    traffic.add_argument("endpoint")
    traffic.add_argument(
        "--variant", action="append", required=True, metavar="NAME=MODEL:VERSION_OR_ALIAS:WEIGHT",
        help="repeat for each variant, e.g. stable=mlp:champion:90 canary=mlp:4:10",
    )  # fmt: skip
    traffic.add_argument("--key-parameter", help="request parameter holding the sticky key (default routing_key)")
    traffic.add_argument("--key-header", help="gRPC metadata header holding the sticky key")
    flags = subcommands.add_parser("flags", help="per-endpoint flags (kill_switch=VARIANT sends it all traffic)")
    flag_actions = flags.add_subparsers(dest="flags_command", required=True)
    flag_set = flag_actions.add_parser("set", help="set a flag (an empty value removes it)")
    flag_set.add_argument("endpoint")
    flag_set.add_argument("name")
    flag_set.add_argument("value")
    flag_list = flag_actions.add_parser("list", help="an endpoint's flags")
    flag_list.add_argument("endpoint")
    shadow = subcommands.add_parser("shadow", help="mirror traffic to a shadow variant and compare its answers")
    shadow_actions = shadow.add_subparsers(dest="shadow_command", required=True)
    shadow_start = shadow_actions.add_parser("start", help="add (or change) a shadow variant of an endpoint")
    shadow_start.add_argument("endpoint")
    shadow_start.add_argument("variant", metavar="NAME=MODEL:VERSION_OR_ALIAS")
    shadow_start.add_argument("--percent", type=int, default=100, help="share of requests mirrored (1-100)")
    shadow_stop = shadow_actions.add_parser("stop", help="remove a shadow variant")
    shadow_stop.add_argument("endpoint")
    shadow_stop.add_argument("name")
    shadow_status = shadow_actions.add_parser("status", help="how the shadows' answers compare, all replicas")
    shadow_status.add_argument("endpoint")
    rollout = subcommands.add_parser("rollout", help="canary rollouts with automated analysis")
    rollout_actions = rollout.add_subparsers(dest="rollout_command", required=True)
    rollout_start = rollout_actions.add_parser("start", help="start a canary of MODEL:VERSION_OR_ALIAS")
    rollout_start.add_argument("endpoint")
    rollout_start.add_argument("canary", metavar="MODEL:VERSION_OR_ALIAS")
    rollout_start.add_argument("--steps", default="5,25,50,100", help="canary weights in percent")
    rollout_start.add_argument("--interval", type=float, default=60.0, help="seconds between analyses")
    rollout_start.add_argument("--max-error-rate-increase", type=float, default=0.0)
    rollout_start.add_argument("--max-p99-ratio", type=float, default=0.0)
    rollout_start.add_argument("--max-p99-slack-ms", type=float, default=0.0)
    rollout_start.add_argument("--min-requests", type=int, default=0)
    rollout_start.add_argument("--failure-limit", type=int, default=0)
    rollout_start.add_argument(
        "--max-accuracy-drop", type=float, default=0.0,
        help="fail an interval whose feedback labels give the canary an accuracy this far below the baseline's "
        "(default 0.05)",
    )  # fmt: skip
    rollout_start.add_argument(
        "--min-labelled", type=int, default=0, help="labels each variant needs in an interval to judge it (default 30)"
    )
    blue_green = rollout_actions.add_parser(
        "blue-green", help="load MODEL:VERSION_OR_ALIAS as green beside the endpoint's variant, then switch"
    )
    blue_green.add_argument("endpoint")
    blue_green.add_argument("green", metavar="MODEL:VERSION_OR_ALIAS")
    blue_green.add_argument("--keep-previous-seconds", type=float, default=300.0, help="blue stays loaded this long")
    for parser in (rollout_start, blue_green):
        parser.add_argument(
            "--progress-deadline", type=float, default=600.0, metavar="SECONDS",
            help="roll back unless the new version is READY on every data plane within this (1..86400)",
        )  # fmt: skip
    rollout_parsers = [rollout_start, blue_green]
    for action, text in (
        ("status", "the rollout's step, weights and analyses"),
        ("promote", "give the canary all traffic now"),
        ("switch", "blue-green: move all traffic to green (once it is READY everywhere)"),
        ("rollback", "give the baseline all traffic now"),
        ("pause", "stop advancing (analyses stop)"),
        ("resume", "continue a paused rollout"),
        ("approve", "approve a protected endpoint's rollout (an approver other than who started it)"),
    ):
        parser = rollout_actions.add_parser(action, help=text)
        parser.add_argument("endpoint")
        rollout_parsers.append(parser)
    ab = subcommands.add_parser("ab", help="A/B tests: sticky split, outcomes, significance")
    ab_actions = ab.add_subparsers(dest="ab_command", required=True)
    ab_start = ab_actions.add_parser("start", help="split an endpoint between arms (the first is the control)")
    ab_start.add_argument("endpoint")
    ab_start.add_argument("--arm", action="append", required=True, metavar="NAME=MODEL:VERSION_OR_ALIAS:WEIGHT")
    ab_start.add_argument("--metric", required=True)
    ab_start.add_argument("--kind", choices=("rate", "mean"), required=True)
    ab_start.add_argument("--confidence", type=float, default=0.95)
    ab_start.add_argument("--key-parameter", default="")
    ab_start.add_argument("--key-header", default="")
    ab_outcome = ab_actions.add_parser(
        "outcome",
        help="record an outcome for a routing key, or many from a file",
        description="Record one outcome (ROUTING_KEY VALUE), or many with --file: JSON Lines, one "
        '{"routing_key": "...", "value": 1} a line, sent in batches of 1,000 (each recorded all or nothing).',
    )
    ab_outcome.add_argument("endpoint")
    ab_outcome.add_argument("routing_key", nargs="?")
    ab_outcome.add_argument("value", nargs="?", type=float)
    ab_outcome.add_argument(
        "--file", metavar="PATH", help="JSON Lines of outcomes ('-': standard input) instead of one outcome"
    )
    ab_status = ab_actions.add_parser("status", help="per-arm results against the control")
    ab_status.add_argument("endpoint")
    ab_stop = ab_actions.add_parser("stop", help="stop attributing outcomes")
    ab_stop.add_argument("endpoint")
    undeploy = subcommands.add_parser("undeploy", help="remove an endpoint")
    undeploy.add_argument("endpoint")
    subcommands.add_parser("deployments", help="endpoints, and the data planes following them")
    audit = subcommands.add_parser("audit", help="the audit log, newest first")
    audit.add_argument("--actor", default="")
    audit.add_argument("--action", default="")
    audit.add_argument("--target-prefix", default="")
    audit.add_argument("--outcome", default="", choices=("", "ok", "refused", "failed"))
    audit.add_argument("--limit", type=int, default=50)
    token = subcommands.add_parser(
        "token",
        help="make a bearer token: prints it (stdout) and the [[token]] entry with its sha256 for --tokens (stderr)",
    )
    token.add_argument("--name", required=True, help="who, in the audit log (e.g. replica-eu-1)")
    token.add_argument(
        "--role", required=True, choices=("viewer", "deployer", "approver", "admin", "replica"),
        help="replica: a data plane's token for `weir serve --control-plane` (attach and download only)",
    )  # fmt: skip
    token.add_argument("--append", type=Path, help="append the entry to this token file instead of printing it")
    for parser in (
        models, push, listing, show, download, alias, deploy, traffic, flag_set, flag_list, undeploy, audit,
        shadow_start, shadow_stop, shadow_status, *rollout_parsers, ab_start, ab_outcome, ab_status, ab_stop,
        *_leaves(subcommands),
    ):  # fmt: skip
        _add_client_options(parser)


def _leaves(subcommands: Any) -> Iterator[argparse.ArgumentParser]:
    yield subcommands.choices["deployments"]


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    if any(action.dest == "control_plane" for action in parser._actions):
        return
    parser.add_argument("--control-plane", default=os.environ.get("WEIR_CONTROL_PLANE", DEFAULT_CONTROL_PLANE))
    parser.add_argument("--token", default=os.environ.get("WEIR_TOKEN"), help="bearer token [env WEIR_TOKEN]")
    parser.add_argument("--tls-ca", type=Path, default=os.environ.get("WEIR_TLS_CA") or None)
    parser.add_argument("--json", action="store_true", help="print JSON")


# --- running -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.command == "control":
        return _run_control(args)
    if args.command == "control-gc":
        return _run_gc(args)
    if args.command == "token":
        return _make_token(args)
    try:
        with _Client(args) as client:
            return client.dispatch()
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
        _fail(args, f"{code.name}: {details}", code.name)
    except WeirError as error:
        _fail(args, error.message, error.kind.name)
    except BrokenPipeError:
        raise  # stdout's reader went away (`| head`): `weir`'s entry point ends quietly
    except OSError as error:
        _fail(args, str(error), "OS_ERROR")
    return 1


def _fail(args: argparse.Namespace, message: str, code: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message}}))
    else:
        print(f"weir: {message}", file=sys.stderr)


def _run_control(args: argparse.Namespace) -> int:
    from weir_control.server import ControlPlaneServer, ControlSettings

    settings = ControlSettings(
        state_dir=args.state_dir,
        database_url=args.database_url,
        artifact_dir=args.artifact_dir,
        listen_address=args.listen_address,
        port=args.port,
        tokens_file=args.tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_port=args.metrics_port,
        online_store=args.online_store,
        feature_root=args.feature_root,
        jobs_dir=args.jobs_dir,
        max_concurrent_jobs=args.max_concurrent_jobs,
        job_user=args.job_user,
        webhook_allow=tuple(args.webhook_allow),
        replica_id=args.replica_id,
        lease_seconds=args.lease_seconds,
        advertise_address=args.advertise_address,
    )

    async def serve() -> int:
        server = ControlPlaneServer(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stop.set)
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.stop()
        return 0

    try:
        return asyncio.run(serve())
    except WeirError as error:
        print(f"weir: error: {error.message}", file=sys.stderr)
        return 2


def _run_gc(args: argparse.Namespace) -> int:
    from weir_control.artifacts import ArtifactStore
    from weir_control.store import open_store

    store = open_store(args.database_url or str(args.state_dir / "control.db"))
    try:
        artifacts = ArtifactStore(args.artifact_dir or args.state_dir / "artifacts")
        deleted = artifacts.collect_garbage(store.referenced_artifacts(), args.min_age_seconds)
    finally:
        store.close()
    print(json.dumps({"deleted": deleted}) if args.json else "\n".join(deleted) or "nothing to delete")
    return 0


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise WeirError(f"{flag}: expected KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def artifact_filename(path: Path, expected: str | None) -> str:
    """The name a version's model file has where it is served (model.pt: TorchScript, model.pt2:
    torch.export), from the archive's content: a local file may be called anything. Reads the zip
    only (nothing unpickled, torch not imported). A file whose content does not say (not an archive,
    or one refused as unsafe) is named by --format, else its extension (.pt2: torch.export), and the
    control plane refuses it with its reason, recorded as a FAILED version and in the audit log."""
    from weir_proto.artifact_safety import ArtifactKind, inspect_artifact

    try:
        kind = inspect_artifact(path, str(path))
    except WeirError:
        if path.name in ("model.pt", "model.pt2"):
            return path.name
        return "model.pt2" if (expected or path.suffix.lstrip(".")) in ("export", "pt2") else "model.pt"
    if expected is not None and ArtifactKind(expected) != kind:
        raise WeirError(f"--format {expected}: expected that kind of archive, {path} is a {kind.value} archive")
    return "model.pt" if kind == ArtifactKind.TORCHSCRIPT else "model.pt2"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Client:
    def __init__(self, args: argparse.Namespace) -> None:
        from weir_control.cli_common import channel_of, token_of

        self.args = args
        self._metadata = client_metadata(token_of(args))
        self._channel = channel_of(args)
        self._registry = registry_pb2_grpc.RegistryStub(self._channel)
        self._deployments = deployments_pb2_grpc.DeploymentsStub(self._channel)
        self._audit = audit_pb2_grpc.AuditStub(self._channel)
        self._rollouts = rollouts_pb2_grpc.RolloutsStub(self._channel)
        self._experiments = experiments_pb2_grpc.ExperimentsStub(self._channel)

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def dispatch(self) -> int:
        commands = {
            "deploy": self.deploy,
            "undeploy": self.undeploy,
            "deployments": self.list_deployments,
            "audit": self.audit_log,
            "traffic": self.set_traffic,
        }
        if self.args.command == "rollout":
            return self.rollout()
        if self.args.command == "ab":
            return self.ab()
        if self.args.command == "shadow":
            return {"start": self.shadow_start, "stop": self.shadow_stop, "status": self.shadow_status}[
                self.args.shadow_command
            ]()
        if self.args.command == "flags":
            return self.set_flag() if self.args.flags_command == "set" else self.list_flags()
        if self.args.command == "models":
            return int(getattr(self, f"models_{self.args.models_command}")())
        return commands[self.args.command]()

    def _print(self, message: Message | list[Message], text: str) -> None:
        if self.args.json:
            items = message if isinstance(message, list) else [message]
            documents = [json_format.MessageToDict(item, preserving_proto_field_name=True) for item in items]
            print(json.dumps(documents if isinstance(message, list) else documents[0], indent=2))
        else:
            print(text)

    # models

    def models_push(self) -> int:
        args = self.args
        size = args.model_file.stat().st_size
        header = registry_pb2.CreateModelVersionRequest.Header(
            model_name=args.name,
            config_pbtxt=args.config.read_text(encoding="utf-8"),
            artifact_filename=artifact_filename(args.model_file, args.format),
            artifact_sha256=file_sha256(args.model_file),
            artifact_size=size,
            description=args.description,
            tags=_pairs(args.tag, "--tag"),
            metrics={key: float(value) for key, value in _pairs(args.metric, "--metric").items()},
            lineage=registry_pb2.Lineage(
                source_job=args.source_job,
                parameters=_pairs(args.param, "--param"),
                dataset_hash=args.dataset_hash,
                code_version=args.code_version,
            ),
        )
        if args.validation is not None:
            from weir_proto.validation_inputs import check_validation_npz

            check_validation_npz(args.validation, f"--validation {args.validation}")  # before any upload
            header.validation_sha256 = file_sha256(args.validation)
            header.validation_size = args.validation.stat().st_size
        try:
            self._registry.GetRegisteredModel(
                registry_pb2.GetRegisteredModelRequest(name=args.name), metadata=self._metadata
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            self._registry.CreateRegisteredModel(
                registry_pb2.CreateRegisteredModelRequest(name=args.name), metadata=self._metadata
            )
        version = self._registry.CreateModelVersion(
            _upload_messages(header, args.model_file, size, show_progress=not args.json, validation=args.validation),
            metadata=self._metadata,
        )
        for alias in args.alias:
            version = self._registry.SetAlias(
                registry_pb2.SetAliasRequest(model_name=args.name, alias=alias, version=version.version),
                metadata=self._metadata,
            )
        self._print(
            version,
            f"{version.model_name} version {version.version}: READY ({version.artifact_sha256[:12]}; "
            f"{args.model_file.name} stored as {version.artifact_filename})",
        )
        return 0

    def models_list(self) -> int:
        models: list[Message] = []
        token = ""
        while True:
            page = self._registry.SearchRegisteredModels(
                registry_pb2.SearchRegisteredModelsRequest(
                    name_contains=self.args.name_contains, tags=_pairs(self.args.tag, "--tag"), page_token=token
                ),
                metadata=self._metadata,
            )
            models += list(page.models)
            token = page.next_page_token
            if not token:
                break
        lines = [
            f"{model.name}\tlatest {model.latest_version}\t"
            + " ".join(f"{alias}->{version}" for alias, version in sorted(model.aliases.items()))
            for model in models
        ]
        self._print(models, "\n".join(lines) or "no models")
        return 0

    def models_show(self) -> int:
        args = self.args
        if args.version is None:
            model = self._registry.GetRegisteredModel(
                registry_pb2.GetRegisteredModelRequest(name=args.name), metadata=self._metadata
            )
            self._print(model, json_format.MessageToJson(model, preserving_proto_field_name=True))
            return 0
        version = self._version_of(args.name, str(args.version))
        self._print(version, json_format.MessageToJson(version, preserving_proto_field_name=True))
        return 0

    def _version_of(self, name: str, version: str) -> registry_pb2.ModelVersion:
        if version.isdigit():
            return self._registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(model_name=name, version=int(version)), metadata=self._metadata
            )
        return self._registry.GetModelVersionByAlias(
            registry_pb2.GetModelVersionByAliasRequest(model_name=name, alias=version), metadata=self._metadata
        )

    def models_download(self) -> int:
        args = self.args
        version = self._version_of(args.name, str(args.version))
        target = args.out or Path(version.artifact_filename)
        staged = target.with_name(f".{target.name}.incoming")
        digest = hashlib.sha256()
        progress = None
        if not args.json:
            from tqdm import tqdm

            progress = tqdm(total=version.artifact_size, unit="B", unit_scale=True, desc=f"download {target.name}",
                            file=sys.stderr)  # fmt: skip
        try:
            with staged.open("wb") as handle:
                request = registry_pb2.DownloadArtifactRequest(model_name=args.name, version=version.version)
                for part in self._registry.DownloadArtifact(request, metadata=self._metadata):
                    if part.WhichOneof("part") == "chunk":
                        digest.update(part.chunk)
                        handle.write(part.chunk)
                        if progress is not None:
                            progress.update(len(part.chunk))
            if digest.hexdigest() != version.artifact_sha256:
                raise WeirError(
                    f"artifact: expected sha256 {version.artifact_sha256}, the downloaded bytes hash to "
                    f"{digest.hexdigest()}"
                )
            os.replace(staged, target)
        finally:
            if progress is not None:
                progress.close()
            staged.unlink(missing_ok=True)
        if args.json:
            print(json.dumps({"path": str(target), "sha256": version.artifact_sha256, "size": version.artifact_size}))
        else:
            print(f"{target}: {version.artifact_size} bytes, sha256 {version.artifact_sha256}")
        return 0

    def models_alias(self) -> int:
        args = self.args
        if args.delete:
            self._registry.DeleteAlias(
                registry_pb2.DeleteAliasRequest(model_name=args.name, alias=args.alias), metadata=self._metadata
            )
            if args.json:
                print(json.dumps({"deleted": {"model": args.name, "alias": args.alias}}))
            else:
                print(f"{args.name}: alias {args.alias} deleted")
            return 0
        if args.version is None:
            raise WeirError("version: expected the version the alias should point at (or --delete), got none")
        version = self._registry.SetAlias(
            registry_pb2.SetAliasRequest(model_name=args.name, alias=args.alias, version=args.version),
            metadata=self._metadata,
        )
        self._print(version, f"{args.name}: {args.alias} -> version {version.version}")
        return 0

    # deployments

    def deploy(self) -> int:
        args = self.args
        request = deployments_pb2.DeployRequest(endpoint=args.endpoint, model_name=args.model)
        if args.target.isdigit():
            request.version = int(args.target)
        else:
            request.alias = args.target
        deployment = self._deployments.Deploy(request, metadata=self._metadata)
        resolved = ", ".join(f"{ref.model_name}:{ref.version}" for ref in deployment.resolved)
        self._print(deployment, f"{deployment.endpoint} -> {resolved} (revision {deployment.revision})")
        return 0

    def set_traffic(self) -> int:
        args = self.args
        request = deployments_pb2.SetTrafficRequest(endpoint=args.endpoint)
        for item in args.variant:
            name, separator, spec = item.partition("=")
            parts = spec.split(":")
            if not separator or len(parts) != 3 or not parts[2].isdigit():
                raise WeirError(f"--variant: expected NAME=MODEL:VERSION_OR_ALIAS:WEIGHT, got {item!r}")
            variant = request.variants.add(name=name, model_name=parts[0], weight=int(parts[2]))
            if parts[1].isdigit():
                variant.version = int(parts[1])
            else:
                variant.alias = parts[1]
        if args.key_parameter is not None or args.key_header is not None:
            request.routing.key_parameter = args.key_parameter or ""
            request.routing.key_header = args.key_header or ""
        deployment = self._deployments.SetTraffic(request, metadata=self._metadata)
        split = ", ".join(
            f"{variant.name}={ref.model_name}:{ref.version}@{variant.weight}"
            for variant, ref in zip(deployment.variants, deployment.resolved, strict=True)
        )
        self._print(deployment, f"{deployment.endpoint}: {split} (revision {deployment.revision})")
        return 0

    def ab(self) -> int:
        args = self.args
        if args.ab_command == "outcome" and args.file is not None:
            return self.ab_outcomes()
        if args.ab_command == "outcome":
            if args.routing_key is None or args.value is None:
                raise WeirError("outcome: expected ROUTING_KEY VALUE, or --file PATH (JSON Lines; '-': stdin)")
            reply = self._experiments.RecordOutcome(
                experiments_pb2.RecordOutcomeRequest(endpoint=args.endpoint, routing_key=args.routing_key,
                                                     value=args.value),
                metadata=self._metadata,
            )  # fmt: skip
            self._print(reply, f"{args.routing_key} -> {reply.variant}")
            return 0
        if args.ab_command == "start":
            request = experiments_pb2.StartABTestRequest(
                endpoint=args.endpoint, metric=args.metric, confidence=args.confidence,
                kind=experiments_pb2.StartABTestRequest.Kind.Value(args.kind.upper()),
                key_parameter=args.key_parameter, key_header=args.key_header,
            )  # fmt: skip
            for item in args.arm:
                name, separator, spec = item.partition("=")
                parts = spec.split(":")
                if not separator or len(parts) != 3 or not parts[2].isdigit():
                    raise WeirError(f"--arm: expected NAME=MODEL:VERSION_OR_ALIAS:WEIGHT, got {item!r}")
                arm = request.arms.add(variant=name, model_name=parts[0], weight=int(parts[2]))
                if parts[1].isdigit():
                    arm.version = int(parts[1])
                else:
                    arm.alias = parts[1]
            test = self._experiments.StartABTest(request, metadata=self._metadata)
        elif args.ab_command == "stop":
            test = self._experiments.StopABTest(
                experiments_pb2.GetABTestRequest(endpoint=args.endpoint), metadata=self._metadata
            )
        else:
            test = self._experiments.GetABTest(
                experiments_pb2.GetABTestRequest(endpoint=args.endpoint), metadata=self._metadata
            )
        lines = [f"{test.endpoint}: {test.metric} ({test.test}), {'running' if test.running else 'stopped'}"]
        for index, result in enumerate(test.results):
            if index == 0:  # the control: what the others are compared with, no test of its own
                lines.append(f"  {result.variant}: n={result.count} mean={result.mean:.4g} (control)")
                continue
            lines.append(
                f"  {result.variant}: n={result.count} mean={result.mean:.4g} diff={result.difference:+.4g} "
                f"CI [{result.ci_low:+.4g}, {result.ci_high:+.4g}] p={result.p_value:.4g}"
                + (" SIGNIFICANT" if result.significant else "")
            )
        self._print(test, "\n".join(lines))
        return 0

    def ab_outcomes(self) -> int:
        """`weir ab outcome E --file PATH|-`: outcomes in batches, each one RecordOutcomes call."""
        args = self.args
        recorded, per_variant = 0, dict[str, int]()
        try:
            handle = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            raise WeirError(f"--file: cannot read {args.file}: {error.strerror or error}") from None
        try:
            for batch, line_numbers in _outcome_batches(handle):
                request = experiments_pb2.RecordOutcomesRequest(endpoint=args.endpoint, outcomes=batch)
                try:
                    reply = self._experiments.RecordOutcomes(request, metadata=self._metadata)
                except grpc.RpcError as error:
                    raise error_for_status(
                        error.code(),
                        f"{_outcome_error(error, line_numbers)} ({recorded} outcomes before line "
                        f"{line_numbers[0]} were recorded, none from there on)",
                    ) from None
                recorded += reply.recorded
                for variant, count in reply.per_variant.items():
                    per_variant[variant] = per_variant.get(variant, 0) + count
        except UnicodeDecodeError:
            raise WeirError(f"--file: expected UTF-8 JSON Lines, {args.file} is not text") from None
        finally:
            if handle is not sys.stdin:
                handle.close()
        if args.json:
            print(json.dumps({"recorded": recorded, "per_variant": per_variant}))
        else:
            split = ", ".join(f"{variant} {count}" for variant, count in sorted(per_variant.items()))
            print(f"{args.endpoint}: {recorded} outcomes recorded" + (f" ({split})" if split else ""))
        return 0

    def rollout(self) -> int:
        args = self.args
        command = args.rollout_command
        if command == "start":
            model, colon, target = args.canary.partition(":")
            if not colon or not target:
                raise WeirError(f"canary: expected MODEL:VERSION_OR_ALIAS, got {args.canary!r}")
            try:
                steps = [int(step) for step in args.steps.split(",") if step.strip()]
            except ValueError:
                raise WeirError(f"--steps: expected comma-separated percentages, got {args.steps!r}") from None
            request = rollouts_pb2.StartRolloutRequest(
                endpoint=args.endpoint, model_name=model, steps=steps, interval_seconds=args.interval,
                thresholds=rollouts_pb2.AnalysisThresholds(
                    max_error_rate_increase=args.max_error_rate_increase, max_p99_ratio=args.max_p99_ratio,
                    max_p99_slack_ms=args.max_p99_slack_ms, min_requests=args.min_requests,
                    failure_limit=args.failure_limit, max_accuracy_drop=args.max_accuracy_drop,
                    min_labelled=args.min_labelled,
                ),
                progress_deadline_seconds=args.progress_deadline,
            )  # fmt: skip
            if target.isdigit():
                request.version = int(target)
            else:
                request.alias = target
            result = self._rollouts.StartRollout(request, metadata=self._metadata)
        elif command == "blue-green":
            model, colon, target = args.green.partition(":")
            if not colon or not target:
                raise WeirError(f"green: expected MODEL:VERSION_OR_ALIAS, got {args.green!r}")
            green = rollouts_pb2.StartBlueGreenRequest(
                endpoint=args.endpoint, model_name=model, keep_previous_seconds=args.keep_previous_seconds,
                progress_deadline_seconds=args.progress_deadline,
            )  # fmt: skip
            if target.isdigit():
                green.version = int(target)
            else:
                green.alias = target
            result = self._rollouts.StartBlueGreen(green, metadata=self._metadata)
        elif command == "status":
            result = self._rollouts.GetRollout(
                rollouts_pb2.GetRolloutRequest(endpoint=args.endpoint), metadata=self._metadata
            )
        else:
            method = {
                "promote": self._rollouts.PromoteRollout,
                "switch": self._rollouts.SwitchBlueGreen,
                "approve": self._rollouts.ApproveRollout,
                "rollback": self._rollouts.AbortRollout,
                "pause": self._rollouts.PauseRollout,
                "resume": self._rollouts.ResumeRollout,
            }[command]
            result = method(rollouts_pb2.RolloutAction(endpoint=args.endpoint), metadata=self._metadata)
        lines = [
            f"{result.endpoint}: {rollouts_pb2.Rollout.State.Name(result.state)}, step {result.step + 1}/"
            f"{len(result.steps)} (canary {result.steps[result.step]}%), steps {list(result.steps)}"
            + (f"; {result.reason}" if result.reason else "")
        ]
        for analysis in result.analyses[-10:]:
            lines.append(
                f"  {analysis.at.ToDatetime().isoformat()}Z step {analysis.step + 1} canary {analysis.canary_weight}%: "
                f"{analysis.verdict}: {analysis.reason}"
            )
        self._print(result, "\n".join(lines))
        return 0

    def _set_variants(self, endpoint: str, variants: list[deployments_pb2.Variant]) -> deployments_pb2.Deployment:
        request = deployments_pb2.SetTrafficRequest(endpoint=endpoint, variants=variants)
        return self._deployments.SetTraffic(request, metadata=self._metadata)

    def shadow_start(self) -> int:
        args = self.args
        name, separator, spec = args.variant.partition("=")
        model, colon, target = spec.partition(":")
        if not separator or not colon or not target:
            raise WeirError(f"variant: expected NAME=MODEL:VERSION_OR_ALIAS, got {args.variant!r}")
        if not 1 <= args.percent <= 100:
            raise WeirError(f"--percent: expected 1..100, got {args.percent}")
        current = self._deployments.GetDeployment(
            deployments_pb2.GetDeploymentRequest(endpoint=args.endpoint), metadata=self._metadata
        )
        shadow = deployments_pb2.Variant(name=name, model_name=model, shadow_percent=args.percent)
        if target.isdigit():
            shadow.version = int(target)
        else:
            shadow.alias = target
        variants = [variant for variant in current.variants if variant.name != name] + [shadow]
        deployment = self._set_variants(args.endpoint, variants)
        self._print(deployment, f"{args.endpoint}: shadow {name} receives {args.percent}% of its requests")
        return 0

    def shadow_stop(self) -> int:
        args = self.args
        current = self._deployments.GetDeployment(
            deployments_pb2.GetDeploymentRequest(endpoint=args.endpoint), metadata=self._metadata
        )
        variants = [v for v in current.variants if not (v.name == args.name and v.shadow_percent)]
        if len(variants) == len(current.variants):
            raise WeirError(f"name: '{args.endpoint}' has no shadow named '{args.name}'")
        deployment = self._set_variants(args.endpoint, variants)
        self._print(deployment, f"{args.endpoint}: shadow {args.name} removed")
        return 0

    def shadow_status(self) -> int:
        replicas = self._deployments.ListReplicas(deployments_pb2.ListReplicasRequest(), metadata=self._metadata)
        totals: dict[str, dict[str, float]] = {}
        for replica in replicas.replicas:
            for stats in replica.status.shadows:
                if stats.endpoint != self.args.endpoint:
                    continue
                total = totals.setdefault(stats.shadow, {"replicas": 0, "max_abs_diff": 0.0})
                total["replicas"] += 1
                for field in ("mirrored", "errors", "dropped", "rows", "rows_agreeing", "rows_within_tolerance"):
                    total[field] = total.get(field, 0) + getattr(stats, field)
                total["max_abs_diff"] = max(total["max_abs_diff"], stats.max_abs_diff)
        for total in totals.values():
            rows = total.get("rows", 0)
            total["agreement"] = round(total.get("rows_agreeing", 0) / rows, 6) if rows else 0.0
            total["disagreement"] = round(1 - total["agreement"], 6) if rows else 0.0
        if self.args.json:
            print(json.dumps(totals, indent=2, sort_keys=True))
        else:
            for name, total in sorted(totals.items()):
                print(
                    f"{self.args.endpoint} shadow {name}: {int(total.get('mirrored', 0))} mirrored, "
                    f"{int(total.get('errors', 0))} errors, {int(total.get('dropped', 0))} dropped, "
                    f"argmax agreement {total['agreement']:.4f}, max |diff| {total['max_abs_diff']:.6g} "
                    f"({int(total['replicas'])} replicas)"
                )
            if not totals:
                print(f"{self.args.endpoint}: no shadow statistics yet")
        return 0

    def set_flag(self) -> int:
        args = self.args
        deployment = self._deployments.SetFlag(
            deployments_pb2.SetFlagRequest(endpoint=args.endpoint, name=args.name, value=args.value),
            metadata=self._metadata,
        )
        self._print(deployment, f"{deployment.endpoint} flags: {dict(deployment.flags) or 'none'}")
        return 0

    def list_flags(self) -> int:
        deployment = self._deployments.GetDeployment(
            deployments_pb2.GetDeploymentRequest(endpoint=self.args.endpoint), metadata=self._metadata
        )
        if self.args.json:
            print(json.dumps(dict(deployment.flags)))
        else:
            print("\n".join(f"{name}={value}" for name, value in sorted(deployment.flags.items())) or "no flags")
        return 0

    def undeploy(self) -> int:
        self._deployments.Undeploy(
            deployments_pb2.UndeployRequest(endpoint=self.args.endpoint), metadata=self._metadata
        )
        if self.args.json:
            print(json.dumps({"undeployed": self.args.endpoint}))
        else:
            print(f"{self.args.endpoint}: undeployed")
        return 0

    def list_deployments(self) -> int:
        listing = self._all_deployments()
        replicas = self._deployments.ListReplicas(deployments_pb2.ListReplicasRequest(), metadata=self._metadata)
        if self.args.json:
            print(
                json.dumps(
                    {
                        "deployments": [
                            json_format.MessageToDict(item, preserving_proto_field_name=True) for item in listing
                        ],
                        "replicas": [
                            json_format.MessageToDict(item, preserving_proto_field_name=True)
                            for item in replicas.replicas
                        ],
                    },
                    indent=2,
                )
            )
            return 0
        for deployment in listing:
            resolved = ", ".join(f"{ref.model_name}:{ref.version}" for ref in deployment.resolved)
            print(f"{deployment.endpoint}\t{resolved}\trevision {deployment.revision}")
        for replica in replicas.replicas:
            states = ", ".join(
                f"{status.endpoint}={deployments_pb2.EndpointStatus.State.Name(status.state)}"
                for status in replica.status.endpoints
            )
            print(f"replica {replica.replica_id} at {replica.address}: {states or 'nothing'}")
            for status in replica.status.endpoints:  # why: without it a FAILED state shows only with --json
                if status.state == deployments_pb2.EndpointStatus.FAILED:
                    print(f"  {_failure(status)}")
        return 0

    def _all_deployments(self) -> list[deployments_pb2.Deployment]:
        items: list[deployments_pb2.Deployment] = []
        token = ""
        while True:
            page = self._deployments.ListDeployments(
                deployments_pb2.ListDeploymentsRequest(page_token=token), metadata=self._metadata
            )
            items += list(page.deployments)
            token = page.next_page_token
            if not token:
                return items

    def audit_log(self) -> int:
        args = self.args
        response = self._audit.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(
                actor=args.actor,
                action=args.action,
                target_prefix=args.target_prefix,
                page_size=args.limit,
                outcome=args.outcome,
            ),
            metadata=self._metadata,
        )
        lines = [
            f"{event.at.ToDatetime().isoformat()}Z\t{event.actor}\t{event.action}\t{event.target}\t{event.result}"
            + (f"\tx{event.count}" if event.count > 1 else "")
            for event in response.events
        ]
        self._print(list(response.events), "\n".join(lines) or "no events")
        return 0


MAX_SHOWN_REASON = 500  # characters of a failure's reason in text output (--json has all of it)


def _failure(status: deployments_pb2.EndpointStatus) -> str:
    """``E (variant V) FAILED to load M:2 (M:1 serves): reason`` on one line."""
    name = status.endpoint + (f" (variant {status.variant})" if status.variant else "")
    serving = (
        f"{status.serving.model_name}:{status.serving.version} serves" if status.serving.version else "nothing serves"
    )
    reason = " ".join(status.message.split()) or "no reason given"
    if len(reason) > MAX_SHOWN_REASON:
        reason = reason[:MAX_SHOWN_REASON] + "... (--json: all of it)"
    return f"{name} FAILED to load {status.desired.model_name}:{status.desired.version} ({serving}): {reason}"


def _make_token(args: argparse.Namespace) -> int:
    from weir_proto.auth import Role, new_token, token_digest

    Role.parse(args.role, "--role")
    if not args.name or any(c in args.name for c in '"\\\n'):
        print(f"weir token: --name: expected a name without quotes, backslashes or newlines, got {args.name!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    value = new_token()
    entry = f'[[token]]\nname = "{args.name}"\nrole = "{args.role}"\nsha256 = "{token_digest(value)}"\n'
    if args.append is not None:
        with args.append.open("a", encoding="utf-8") as handle:
            handle.write("\n" + entry)
    else:
        print(entry, file=sys.stderr)
    print(value)
    return 0


OUTCOMES_PER_CALL = 1000  # the control plane takes up to 10,000 a call
MAX_OUTCOME_LINE = 64 * 1024  # a routing key is at most 1,024 characters: a longer line is not an outcome


def _outcome_batches(handle: Any) -> Iterator[tuple[list[experiments_pb2.Outcome], list[int]]]:
    """Outcomes from JSON Lines, ``OUTCOMES_PER_CALL`` at a time, with their line numbers. Read a
    line at a time (bounded): a file of any length streams through."""
    batch: list[experiments_pb2.Outcome] = []
    numbers: list[int] = []
    number = 0
    while line := handle.readline(MAX_OUTCOME_LINE + 1):
        number += 1
        if len(line) > MAX_OUTCOME_LINE:
            raise WeirError(f"--file line {number}: expected at most {MAX_OUTCOME_LINE} characters, got more")
        if not line.strip():
            continue
        batch.append(_outcome(line, number))
        numbers.append(number)
        if len(batch) == OUTCOMES_PER_CALL:
            yield batch, numbers
            batch, numbers = [], []
    if batch:
        yield batch, numbers
    elif not number:
        raise WeirError("--file: expected JSON Lines of outcomes, got an empty file")


def _outcome(line: str, number: int) -> experiments_pb2.Outcome:
    expected = '{"routing_key": "...", "value": NUMBER}'
    try:
        item = json.loads(line)
    except ValueError:
        raise WeirError(f"--file line {number}: expected {expected}, got {line.strip()[:80]!r}") from None
    if not isinstance(item, dict) or set(item) != {"routing_key", "value"}:
        raise WeirError(f"--file line {number}: expected {expected}, got {line.strip()[:80]!r}")
    key, value = item["routing_key"], item["value"]
    if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int | float):
        raise WeirError(f"--file line {number}: expected {expected}, got {line.strip()[:80]!r}")
    return experiments_pb2.Outcome(routing_key=key, value=float(value))


def _outcome_error(error: grpc.RpcError, line_numbers: list[int]) -> str:
    """The control plane names a refused outcome by its index in the call: name its line instead."""
    details = error.details() or ""
    match = re.match(r"outcomes\[(\d+)\]\.(.*)", details, re.DOTALL)
    if match and int(match.group(1)) < len(line_numbers):
        details = f"--file line {line_numbers[int(match.group(1))]}: {match.group(2)}"
    return f"{error.code().name}: {details}"  # the form every other failed call is shown in


def _upload_messages(
    header: registry_pb2.CreateModelVersionRequest.Header,
    path: Path,
    size: int,
    show_progress: bool,
    validation: Path | None = None,
) -> Iterator[registry_pb2.CreateModelVersionRequest]:
    yield registry_pb2.CreateModelVersionRequest(header=header)
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=size, unit="B", unit_scale=True, desc=f"upload {path.name}", file=sys.stderr)
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(UPLOAD_CHUNK):
                if progress is not None:
                    progress.update(len(chunk))
                yield registry_pb2.CreateModelVersionRequest(chunk=chunk)
        if validation is not None:
            with validation.open("rb") as handle:
                while chunk := handle.read(UPLOAD_CHUNK):
                    yield registry_pb2.CreateModelVersionRequest(validation_chunk=chunk)
    finally:
        if progress is not None:
            progress.close()
