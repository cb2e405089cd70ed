"""Weir's transport-free errors, shared by the data plane (``weir``) and the control plane
(``weir_control``): the one package both may import. gRPC status codes are chosen in one place,
``status_code_for``.

Messages name the field, what was expected and what came, because the client reading them has
only the message to go on.
"""

from __future__ import annotations

import enum

import grpc


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
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


class AlreadyExistsError(WeirError):
    """A create whose name is taken by something different (an identical repeat returns the first)."""

    kind = ErrorKind.ALREADY_EXISTS


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


class UnauthenticatedError(WeirError):
    kind = ErrorKind.UNAUTHENTICATED


class PermissionDeniedError(WeirError):
    kind = ErrorKind.PERMISSION_DENIED


STATUS_CODE_BY_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_code_for(kind: ErrorKind) -> grpc.StatusCode:
    return STATUS_CODE_BY_KIND[kind]


def error_for_status(code: grpc.StatusCode, message: str) -> WeirError:
    """The client side of the map: a failed RPC's status as the matching ``WeirError``."""
    kind = next((kind for kind, status in STATUS_CODE_BY_KIND.items() if status == code), ErrorKind.INTERNAL)
    return WeirError(message or code.name, kind)
