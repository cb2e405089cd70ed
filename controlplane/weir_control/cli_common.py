"""What the control-plane commands (`weir features|train|sweep|drift`) share: the bearer token they
send (flag, else $WEIR_TOKEN through the flag's default, else `weir up`'s admin token file), the
channel (TLS with --tls-ca; --control-plane A,B,... takes the first replica that answers), and how a
failure is reported (JSON with --json, else one line on stderr; exit status 1)."""

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


REPLICA_CONNECT_SECONDS = 3.0  # per replica, when --control-plane names several


def channel_of(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the control plane. Several replicas (A,B,...): every one serves every RPC, so a
    command takes the first that connects; if none does, the first, whose calls then say UNAVAILABLE."""
    addresses = [part.strip() for part in str(args.control_plane).split(",") if part.strip()] or [""]
    channels = []
    for address in addresses:
        channel = _open(args, address)
        if len(addresses) == 1:
            return channel
        try:
            grpc.channel_ready_future(channel).result(timeout=REPLICA_CONNECT_SECONDS)
        except grpc.FutureTimeoutError:
            channels.append(channel)
            continue
        for unused in channels:
            unused.close()
        return channel
    for unused in channels[1:]:
        unused.close()
    return channels[0]


def _open(args: argparse.Namespace, address: str) -> grpc.Channel:
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes())
        return grpc.secure_channel(address, credentials)
    return grpc.insecure_channel(address)


def report_error(args: argparse.Namespace, error: WeirError) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": error.kind.name, "message": error.message}}))
    else:
        print(f"weir {args.command}: {error.kind.name}: {error.message}", file=sys.stderr)
    return 1
