"""Listening on a port, for both planes: a port that cannot be bound is one line naming the port and
why (grpc's own failure is a RuntimeError that says only "Failed to bind to address", and a busy
/metrics port an OSError traceback)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

import grpc

from weir_proto.errors import FailedPreconditionError


def bind_grpc(
    server: Any,
    address: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
    what: str,
    reuse_port: bool = False,
) -> int:
    """Add the listening port ``address:port`` to a gRPC server (``grpc.aio.Server`` or
    ``grpc.Server``); returns the port bound (the free one chosen for 0). A failure is a
    ``FailedPreconditionError`` naming ``what`` the port is for. A port already taken is found by a
    probe first (gRPC's core would log its own failure on stderr too); ``reuse_port``: the server
    binds with SO_REUSEPORT (sockets that do as well may hold the port)."""
    if port and (busy := _probe(address, port, reuse_port)) is not None:
        raise listen_failure(address, port, what, busy)
    target = f"{_bracketed(address)}:{port}"
    try:
        bound = (
            server.add_secure_port(target, credentials) if credentials is not None else server.add_insecure_port(target)
        )
    except RuntimeError:
        bound = 0
    if not bound:
        raise listen_failure(address, port, what, _probe(address, port, reuse_port))
    return int(bound)


def listen_http(start: Callable[[], Any], address: str, port: int, what: str) -> Any:
    """Run ``start`` (e.g. prometheus_client's ``start_http_server``); a port it cannot bind is a
    ``FailedPreconditionError`` naming ``what`` the port is for."""
    try:
        return start()
    except OSError as error:
        raise listen_failure(address, port, what, error) from None


def listen_failure(address: str, port: int, what: str, error: OSError | None) -> FailedPreconditionError:
    shown = address or "every address"
    if error is None:
        return FailedPreconditionError(f"cannot listen on {_bracketed(shown)}:{port} ({what}): gRPC could not bind it")
    if error.errno == errno.EADDRINUSE:
        return FailedPreconditionError(
            f"port {port} is in use ({what}, on {shown}: another process listens there); stop it or choose "
            "another port (0: any free one)"
        )
    return FailedPreconditionError(f"cannot listen on {_bracketed(shown)}:{port} ({what}): {error.strerror or error}")


def _probe(address: str, port: int, reuse_port: bool) -> OSError | None:
    """Why binding ``address:port`` fails, as the OS says it (``None``: it binds now). SO_REUSEADDR as
    gRPC sets it, so a port in TIME_WAIT is not mistaken for one in use; SO_REUSEPORT as the server
    will set it."""
    host = address.strip("[]") or None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as error:
        return error
    family, kind, protocol, _, sockaddr = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(sockaddr)
        except OSError as error:
            return error
    return None


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
