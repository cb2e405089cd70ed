"""Bearer tokens and roles, enforced by a gRPC server interceptor; shared by both planes.

Tokens map to a name (who, for the audit log) and a role. The people's roles are ordered: each one
may do what the ones before it may (viewer < deployer < approver < admin). ``replica`` is outside
that order: it is a data plane's identity, and may call only what a method's policy names it for
(the control plane's Attach stream and the artifact download a data plane needs); it may read
nothing a viewer may. A method's policy names the least role it needs, or the set of roles it
accepts, or None for an open method (health, reflection, inference unless protected).

Tokens come from a TOML file::

    [[token]]
    name = "release-bot"
    role = "deployer"
    sha256 = "9f86d0..."      # sha256 of the token (preferred), or: token = "the token itself"

or from ``WEIR_TOKENS`` as ``name:role:token`` entries separated by commas. Only digests are kept in
memory, and no token is ever logged: messages name the token's owner, never the token.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import secrets
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from weir_proto.errors import InvalidArgumentError

AUTHORIZATION = "authorization"
log = logging.getLogger(__name__)


class Role(enum.IntEnum):
    REPLICA = 0  # a data plane: below every ordered role, and accepted only where a policy names it
    VIEWER = 1
    DEPLOYER = 2
    APPROVER = 3
    ADMIN = 4

    @classmethod
    def parse(cls, text: str, source: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = ", ".join(role.name.lower() for role in sorted(cls, key=lambda role: (role is cls.REPLICA, role)))
            raise InvalidArgumentError(f"{source}: expected a role among {choices}, got {text!r}") from None


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role


def new_token(prefix: str = "weir_", nbytes: int = 32) -> str:
    """A fresh random token. The prefix keeps it from starting with "-" (token_urlsafe may), which
    command lines would read as an option (`--token -x...`), and makes a leaked one easy to scan for."""
    return prefix + secrets.token_urlsafe(nbytes)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenTable:
    def __init__(self, identities_by_digest: Mapping[str, Identity]) -> None:
        self._by_digest = dict(identities_by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def identify(self, token: str) -> Identity | None:
        return self._by_digest.get(token_digest(token))

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise InvalidArgumentError(f"{path}: cannot read the token file: {error}") from error
        entries = document.get("token", [])
        if not isinstance(entries, list):
            raise InvalidArgumentError(f"{path}: expected [[token]] tables, got {type(entries).__name__}")
        table: dict[str, Identity] = {}
        for index, entry in enumerate(entries):
            source = f"{path} token #{index + 1}"
            name, role = str(entry.get("name", "")), Role.parse(str(entry.get("role", "")), f"{source} role")
            if not name:
                raise InvalidArgumentError(f"{source} name: expected a non-empty name, got none")
            if "sha256" in entry:
                digest = str(entry["sha256"]).lower()
            elif "token" in entry:
                digest = token_digest(str(entry["token"]))
            else:
                raise InvalidArgumentError(f"{source}: expected 'sha256' or 'token', got neither")
            table[digest] = Identity(name, role)
        return cls(table)

    @classmethod
    def from_environment_value(cls, value: str) -> TokenTable:
        table: dict[str, Identity] = {}
        for index, item in enumerate(part for part in value.split(",") if part.strip()):
            pieces = item.strip().split(":", 2)
            if len(pieces) != 3 or not all(pieces):
                raise InvalidArgumentError(
                    f"WEIR_TOKENS entry #{index + 1}: expected name:role:token, got {len(pieces)} part(s)"
                )
            name, role, token = pieces
            table[token_digest(token)] = Identity(name, Role.parse(role, f"WEIR_TOKENS entry #{index + 1} role"))
        return cls(table)

    @classmethod
    def load(cls, path: Path | None, environ: Mapping[str, str] = os.environ) -> TokenTable | None:
        """From ``path`` if given, else ``WEIR_TOKENS``; None when neither is set."""
        if path is not None:
            return cls.from_file(path)
        if environ.get("WEIR_TOKENS"):
            return cls.from_environment_value(environ["WEIR_TOKENS"])
        return None


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def identity_of(context: grpc.aio.ServicerContext, tokens: TokenTable | None) -> Identity:
    """Who made this (already authorised) call; 'anonymous' on an open server."""
    token = bearer_token(context.invocation_metadata())
    identity = tokens.identify(token) if tokens is not None and token else None
    return identity or Identity("anonymous", Role.VIEWER)


# What a method needs: the least ordered role (a replica never passes), exactly one of a set of
# roles, or None (open).
Needs = Role | frozenset[Role] | None
Policy = Callable[[str], Needs]  # full method name -> what it needs


def permits(role: Role, needed: Role | frozenset[Role]) -> bool:
    """Whether a token of ``role`` may call a method that needs ``needed`` (not None)."""
    if isinstance(needed, frozenset):
        return role in needed
    return role is not Role.REPLICA and role >= needed


def needs_text(needed: Role | frozenset[Role]) -> str:
    if isinstance(needed, frozenset):
        return " or ".join(role.name.lower() for role in sorted(needed))
    return f"role {needed.name.lower()} or above"


@dataclass(frozen=True)
class Refusal:
    """A call the interceptor refused, for the audit log (never the token itself)."""

    method: str
    code: grpc.StatusCode
    actor: str  # the token's owner; "anonymous" without a token, "unknown-token" for a token not in the table
    role: str  # the owner's role, or "" when unknown
    reason: str
    peer: str = ""


# Called on the event loop for every refusal (must not block); an awaitable it returns is awaited
# before the caller is answered.
RefusalHook = Callable[[Refusal], Awaitable[None] | None]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without a valid bearer token (UNAUTHENTICATED) or whose token's role is below
    the method's (PERMISSION_DENIED), before any handler runs."""

    def __init__(self, tokens: TokenTable, policy: Policy, on_refusal: RefusalHook | None = None) -> None:
        self._tokens = tokens
        self._policy = policy
        self._on_refusal = on_refusal  # called (on the event loop, must not block) for every refusal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        needed = self._policy(method)
        if needed is None:
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if not token:
            return self._refusal(
                Refusal(
                    method,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "anonymous",
                    "",
                    f"{method}: expected metadata 'authorization: Bearer <token>', got no bearer token",
                )
            )
        identity = self._tokens.identify(token)
        if identity is None:
            return self._refusal(
                Refusal(
                    method,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown-token",
                    "",
                    f"{method}: the bearer token is not valid here",
                )
            )
        if not permits(identity.role, needed):
            return self._refusal(
                Refusal(
                    method,
                    grpc.StatusCode.PERMISSION_DENIED,
                    identity.name,
                    identity.role.name.lower(),
                    f"{method}: needs {needs_text(needed)}; '{identity.name}' has {identity.role.name.lower()}",
                )
            )
        return await continuation(handler_call_details)

    def _refusal(self, refusal: Refusal) -> grpc.RpcMethodHandler:
        return _refusal(refusal, self._on_refusal)


def _refusal(refusal: Refusal, on_refusal: RefusalHook | None) -> grpc.RpcMethodHandler:
    # Stream-stream accepts any call shape: the client's request stream is simply never read.
    async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        if on_refusal is not None:
            try:
                pending = on_refusal(dataclasses.replace(refusal, peer=context.peer() or ""))
                if pending is not None:
                    await pending
            except Exception:  # auditing a refusal must never turn it into another answer
                log.exception("recording a refused call failed")
        await context.abort(refusal.code, refusal.reason)

    return grpc.stream_stream_rpc_method_handler(refuse)


def client_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()
