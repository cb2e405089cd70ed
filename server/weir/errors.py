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
]


class ModelConfigError(WeirError):
    """A config.pbtxt that cannot be parsed or does not describe a servable model."""

    kind = ErrorKind.INVALID_ARGUMENT


class ModelLoadError(WeirError):
    """A model file that cannot (or must not) be loaded."""

    kind = ErrorKind.INVALID_ARGUMENT
