"""Weir's transport-free errors. gRPC status codes are chosen in one place: ``weir.grpc_status``.

Messages name the field, what was expected and what came, because the client reading them has
only the message to go on.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    INTERNAL = "internal"


class WeirError(Exception):
    """An error with a kind the transport maps to a status code."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind


class InvalidArgumentError(WeirError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFoundError(WeirError):
    kind = ErrorKind.NOT_FOUND


class FailedPreconditionError(WeirError):
    kind = ErrorKind.FAILED_PRECONDITION


class ResourceExhaustedError(WeirError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class DeadlineExceededError(WeirError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class UnavailableError(WeirError):
    kind = ErrorKind.UNAVAILABLE


class InternalError(WeirError):
    kind = ErrorKind.INTERNAL


class ModelConfigError(WeirError):
    """A config.pbtxt that cannot be parsed or does not describe a servable model."""

    kind = ErrorKind.INVALID_ARGUMENT


class ModelLoadError(WeirError):
    """A model file that cannot (or must not) be loaded."""

    kind = ErrorKind.INVALID_ARGUMENT
