"""``weir up``: a control plane and one data plane that follows it, in one process, on embedded
defaults: SQLite and the artifact store under ``--state-dir`` (``.weir``), the feature online store
(a SQLite file there), the data plane's managed repository beside them, and bearer tokens generated on
first start. ``--database-url`` (PostgreSQL) and ``--online-store`` (Redis) replace the embedded
stores; ``--control-metrics-port`` serves the control plane's /metrics. The tokens:

    .weir/tokens.toml     digests of an admin token and of the data plane's (replica) token
    .weir/admin.token     the admin token itself, mode 0600: `weir models ...` and `weir deploy` read it
    .weir/data-plane.token

This is a composition root: it may import both ``weir`` and ``weir_control``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from weir.errors import InvalidArgumentError, WeirError
from weir.logs import configure_logging
from weir.settings import ControlMode, ServerSettings
from weir_proto.auth import new_token

log = logging.getLogger(__name__)


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", type=Path, default=Path(".weir"), help="tokens, stores and artifacts (default: .weir)"
    )
    parser.add_argument("--listen-address", default="127.0.0.1", help="both planes listen here (127.0.0.1)")
    parser.add_argument("--control-port", type=int, default=8011, help="control plane gRPC port (0: any free)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="data plane gRPC port (0: any free)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="data plane /metrics port (-1: none)")
    parser.add_argument(
        "--control-metrics-port", type=int, default=-1,
        help="control plane /metrics port (-1: none, the default; 0: any free)",
    )  # fmt: skip
    parser.add_argument(
        "--database-url", default=os.environ.get("WEIR_DATABASE_URL", ""),
        help="the control plane's store: a SQLite file or postgresql+psycopg://USER:PASSWORD@HOST/DB "
        "[env WEIR_DATABASE_URL; default: SQLite at STATE_DIR/control/control.db]",
    )  # fmt: skip
    parser.add_argument(
        "--online-store", default="",
        help="the feature online store both planes use: redis://HOST:PORT/DB or a SQLite file "
        "(default: STATE_DIR/online.db)",
    )  # fmt: skip
    parser.add_argument(
        "--heartbeat-seconds", type=float, default=ServerSettings.heartbeat_seconds,
        help="how often the data plane reports its counters to the control plane (default: 5; a canary's "
        "--interval shorter than this sees no new counters)",
    )  # fmt: skip
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="json", choices=("json", "text"))
    parser.add_argument(
        "--ready-file", type=Path, help="write the ports and token file here (JSON) once both planes are up"
    )
    parser.add_argument(
        "--feature-root",
        type=Path,
        default=Path("."),
        help="the only directory feature sources and Parquet references may lie in (default: this directory)",
    )
    parser.add_argument(
        "--webhook-allow",
        action="append",
        default=[],
        metavar="HOST[:PORT]|ADDRESS[:PORT]|CIDR",
        help="a destination drift webhooks may reach (repeatable; none by default)",
    )


def ensure_tokens(state_dir: Path) -> tuple[Path, str, str]:
    """The token file and the admin and data-plane tokens, generated on first use."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tokens_file = state_dir / "tokens.toml"
    admin_file, data_plane_file = state_dir / "admin.token", state_dir / "data-plane.token"
    present = tokens_file.is_file() and admin_file.is_file() and data_plane_file.is_file()
    if present and 'role = "viewer"' in tokens_file.read_text():
        # Made by an older `weir up`: the data plane's token had the viewer role. It is a replica now
        # (attach and download only); rewrite the file with the same tokens.
        _write_tokens(tokens_file, admin_file.read_text().strip(), data_plane_file.read_text().strip())
    if not (tokens_file.is_file() and admin_file.is_file() and data_plane_file.is_file()):
        admin, data_plane = new_token(), new_token()
        for path, token in ((admin_file, admin), (data_plane_file, data_plane)):
            path.write_text(token + "\n")
            path.chmod(0o600)
        _write_tokens(tokens_file, admin, data_plane)
    return tokens_file, admin_file.read_text().strip(), data_plane_file.read_text().strip()


def _write_tokens(tokens_file: Path, admin: str, data_plane: str) -> None:
    from weir_proto.auth import token_digest

    staged = tokens_file.with_suffix(".incoming")
    staged.write_text(
        "# Generated by `weir up`: digests only; the tokens are in admin.token and data-plane.token.\n"
        "# The data plane's token has the replica role: it may attach and download artifacts, nothing else.\n"
        f'[[token]]\nname = "admin"\nrole = "admin"\nsha256 = "{token_digest(admin)}"\n\n'
        f'[[token]]\nname = "data-plane"\nrole = "replica"\nsha256 = "{token_digest(data_plane)}"\n'
    )
    os.replace(staged, tokens_file)


def run_up(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(_up(args))
        return uvloop.run(_up(args))
    except WeirError as error:  # a bad flag or state found at start: say which, no traceback
        print(f"weir: error: {error.message}", file=sys.stderr)
        return 2


async def _up(args: argparse.Namespace) -> int:
    from weir.server import WeirServer
    from weir_control.server import ControlPlaneServer, ControlSettings
    from weir_proto.auth import TokenTable

    state_dir: Path = args.state_dir
    tokens_file, _, data_plane_token = ensure_tokens(state_dir)
    try:  # checked before anything starts; the control plane's address is filled in once it listens
        data_plane_settings = ServerSettings(
            model_repository=state_dir / "data-plane",
            listen_address=args.listen_address,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            model_control_mode=ControlMode.EXPLICIT,
            tokens_file=str(tokens_file),
            control_plane_token=data_plane_token,
            replica_id="weir-up",
            heartbeat_seconds=args.heartbeat_seconds,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    except ValueError as error:  # "setting heartbeat_seconds: expected ...": name the flag instead
        message = re.sub(r"^setting (\w+):", lambda match: "--" + match.group(1).replace("_", "-") + ":", str(error))
        raise InvalidArgumentError(message) from None
    control = ControlPlaneServer(
        ControlSettings(
            state_dir=state_dir / "control",
            listen_address=args.listen_address,
            port=args.control_port,
            tokens_file=tokens_file,
            database_url=args.database_url,
            metrics_port=args.control_metrics_port,
            online_store=args.online_store or str(state_dir / "online.db"),  # told to the data plane too
            feature_root=args.feature_root,
            webhook_allow=tuple(args.webhook_allow),
        ),
        tokens=TokenTable.from_file(tokens_file),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    await control.start()
    data_plane = WeirServer(
        dataclasses.replace(data_plane_settings, control_plane=f"{_connectable(args.listen_address)}:{control.port}")
    )
    try:
        await data_plane.start()
        ready: dict[str, Any] = {
            "control_plane": f"{_connectable(args.listen_address)}:{control.port}",
            "data_plane": f"{_connectable(args.listen_address)}:{data_plane.grpc_port}",
            "metrics_port": data_plane.metrics_port,
            "control_metrics_port": control.metrics_port,
            "heartbeat_seconds": data_plane.settings.heartbeat_seconds,
            "admin_token_file": str(state_dir / "admin.token"),
            "pid": os.getpid(),
        }
        log.info("weir up", extra=ready)
        if args.ready_file is not None:
            staged = args.ready_file.with_suffix(".incoming")
            staged.write_text(json.dumps(ready))
            os.replace(staged, args.ready_file)
        await stop.wait()
    finally:
        await data_plane.stop()
        await control.stop()
    return 0


def _connectable(address: str) -> str:
    return "127.0.0.1" if address in ("0.0.0.0", "") else address
