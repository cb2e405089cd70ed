"""What the control-plane commands (`weir features|train|sweep|drift`) share: the bearer token they
send (flag, else $WEIR_TOKEN through the flag's default, else `weir up`'s admin token file), the
channel (TLS with --tls-ca), and how a failure is reported (JSON with --json, else one line on
stderr; exit status 1)."""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from weir_proto.errors import WeirError


def token_of(args: argparse.Namespace) -> str | None:
    from weir_control.cli import DEFAULT_TOKEN_FILE

    if args.token:
        return str(args.token)
    return DEFAULT_TOKEN_FILE.read_text().strip() if DEFAULT_TOKEN_FILE.is_file() else None


def channel_of(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes())
        return grpc.secure_channel(args.control_plane, credentials)
    return grpc.insecure_channel(args.control_plane)


def report_error(args: argparse.Namespace, error: WeirError) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": error.kind.name, "message": error.message}}))
    else:
        print(f"weir {args.command}: {error.kind.name}: {error.message}", file=sys.stderr)
    return 1
