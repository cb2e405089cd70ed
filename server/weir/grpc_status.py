"""The one mapping from Weir's error kinds to gRPC status codes (shared with the control plane), and
the bound on what a status message may carry."""

from __future__ import annotations

import grpc

from weir_proto.errors import STATUS_CODE_BY_KIND, WeirError, status_code_for

__all__ = ["MAX_STATUS_MESSAGE_BYTES", "STATUS_CODE_BY_KIND", "bounded_message", "status_code_for", "status_of"]

MAX_STATUS_MESSAGE_BYTES = 4096
"""Most bytes a status message takes on the wire. It travels in HTTP/2 trailers (grpc's soft limit
is 8 KiB of metadata in all); past the limit the client sees RESOURCE_EXHAUSTED instead of the
intended code. Messages quote client values through ``errors.clip``; this is the backstop for any
message that still grows too long."""


def _wire_bytes(message: str) -> int:
    """The message's size once grpc percent-encodes it (every byte outside printable ASCII, and %)."""
    data = message.encode("utf-8", "replace")
    return len(data) + 2 * sum(1 for byte in data if byte < 0x20 or byte > 0x7E or byte == 0x25)


def bounded_message(message: str) -> str:
    if len(message) * 3 <= MAX_STATUS_MESSAGE_BYTES or _wire_bytes(message) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    suffix = f"... (message cut from {len(message)} characters)"
    keep = MAX_STATUS_MESSAGE_BYTES - len(suffix)
    while _wire_bytes(message[:keep]) + len(suffix) > MAX_STATUS_MESSAGE_BYTES:
        keep //= 2  # at most 12 wire bytes a character: a few halvings suffice
    return message[:keep] + suffix


def status_of(error: WeirError) -> tuple[grpc.StatusCode, str]:
    """The status code and bounded message a transport answers ``error`` with."""
    return status_code_for(error.kind), bounded_message(error.message)
