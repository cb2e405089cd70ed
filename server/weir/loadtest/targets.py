"""Which addresses `weir bench` may load: loopback only.

A load generator pointed at someone else's server is a denial-of-service tool, so the check is on the
literal host the user typed (no DNS lookup that a hosts file could redirect): an IPv4 address in
127.0.0.0/8, ``localhost`` or ``::1``.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost"})


class TargetError(ValueError):
    """A --url or --metrics-url that is malformed or not on loopback."""


def is_loopback_host(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return address == ipaddress.IPv6Address("::1")
    return address in ipaddress.IPv4Network("127.0.0.0/8")


def _split_host_port(text: str, flag: str) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:8001
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise TargetError(f"{flag}: expected [IPV6]:PORT, got {text!r}")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or ":" in host:
            raise TargetError(f"{flag}: expected HOST:PORT (an IPv6 address in brackets), got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise TargetError(f"{flag}: port must be an integer, got {port_text!r} in {text!r}") from None
    if not 0 < port < 65536:
        raise TargetError(f"{flag}: port must be 1..65535, got {port} in {text!r}")
    return host, port


def grpc_target(url: str) -> str:
    """Validate ``--url`` (HOST:PORT, optionally prefixed ``grpc://``) and return the gRPC target."""
    text = url.strip()
    if text.startswith("grpc://"):
        text = text[len("grpc://") :]
    if "/" in text:
        raise TargetError(f"--url: expected HOST:PORT, got {url!r}")
    host, port = _split_host_port(text, "--url")
    if not is_loopback_host(host):
        raise TargetError(
            f"--url: {host!r} is not a loopback address; weir bench only loads 127.0.0.0/8, localhost or ::1"
        )
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def metrics_url(url: str) -> str:
    """Validate ``--metrics-url`` (http://HOST:PORT/PATH on loopback) and return it."""
    parts = urlsplit(url.strip())
    if parts.scheme != "http":
        raise TargetError(f"--metrics-url: expected http://HOST:PORT/metrics, got {url!r}")
    host = parts.hostname or ""
    if not is_loopback_host(host):
        raise TargetError(
            f"--metrics-url: {host!r} is not a loopback address; weir bench only reads 127.0.0.0/8, localhost or ::1"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as error:
        raise TargetError(f"--metrics-url: {error} in {url!r}") from None
    return url.strip()
