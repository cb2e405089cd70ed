"""The data plane's errors: the shared hierarchy (``weir_proto.errors``) plus its own kinds of
failure. gRPC status codes are chosen in one place: ``weir_proto.errors.status_code_for``."""

from __future__ import annotations

from weir_proto.errors import (
    DeadlineExceededError,
    ErrorKind,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    WeirError,
)

__all__ = [
    "DeadlineExceededError",
    "ErrorKind",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "ModelConfigError",
    "ModelLoadError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "WeirError",
    "clip",
    "clip_repr",
]

ECHO_LIMIT = 200
"""Characters of a client's value an error message may quote. A message travels in the gRPC status
(HTTP/2 trailers, 8 KiB by default): a longer one turns the intended status into RESOURCE_EXHAUSTED
("metadata size exceeds soft limit"), and the client sent the value anyway."""


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as an error message may quote it: whole when short, else its first ``limit``
    characters, an ellipsis and its length. Every message that quotes a client's string (a name,
    a datatype, a parameter) quotes it through this, or through ``clip_repr``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def clip_repr(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` bounded like ``clip``; a long string or bytes value is cut before ``repr``
    so a huge value is not copied whole just to be cut."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    return clip(repr(value), limit)


class ModelConfigError(WeirError):
    """A config.pbtxt that cannot be parsed or does not describe a servable model."""

    kind = ErrorKind.INVALID_ARGUMENT


class ModelLoadError(WeirError):
    """A model file that cannot (or must not) be loaded."""

    kind = ErrorKind.INVALID_ARGUMENT
