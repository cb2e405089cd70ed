"""The audit trail of every control RPC: who (the token's owner), what, the target, a before/after
summary and how it ended; refusals aggregated so a flood stays bounded; and the RPC-edge helpers
every service shares (abort with a Weir error's status, read in a worker thread, protected endpoints).

A store-only change and its OK audit event are one unit of work (``Auditor.run(atomic=True)``): they
commit together or not at all. A refused or failed call changes nothing and is recorded on its own.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from sqlalchemy.exc import InterfaceError, OperationalError

from weir_control.store import Store
from weir_control.store.store import REFUSED_RESULTS
from weir_proto.auth import Identity, Refusal, Role, TokenTable, identity_of
from weir_proto.control.v1 import (
    audit_pb2,
    deployments_pb2,
)
from weir_proto.errors import (
    PermissionDeniedError,
    UnavailableError,
    WeirError,
    status_code_for,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


UNREACHABLE_DATABASE = (
    "the control plane cannot reach its database; retry in a moment, or call another control-plane replica"
)


def as_weir_error(error: BaseException) -> BaseException:
    """A database that cannot be reached (connection refused or lost, server shutting down, busy past
    the store's retries) as UNAVAILABLE, which a client retries; any other error as it is. Never the
    driver's message: it names hosts and ports."""
    if isinstance(error, OperationalError | InterfaceError):  # the DB-API's "not the caller's doing"
        return UnavailableError(UNREACHABLE_DATABASE)
    return error


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    error = as_weir_error(error)
    if isinstance(error, WeirError):
        await context.abort(status_code_for(error.kind), error.message)
    log.exception("unexpected error in a control RPC", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the control plane's log")
    raise AssertionError("unreachable: context.abort raises")


def summary(message: Message | None) -> str:
    """A compact JSON summary of a message for the audit log (big text fields left out)."""
    if message is None:
        return ""
    document = json_format.MessageToDict(message, preserving_proto_field_name=True)
    document.pop("config_pbtxt", None)
    document.pop("signature", None)
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


REFUSAL_WINDOW_SECONDS = 60.0  # refusals are aggregated per (actor, method, result) over this long
MAX_REFUSAL_KEYS = 1024  # distinct keys per window; beyond, one key per (actor, result)


@dataclass
class _Tally:
    started: float
    event: audit_pb2.AuditEvent  # the first refusal of the window, already written
    more: int = 0  # refusals after the first


class RefusalLog:
    """Refused calls into the audit log, bounded whatever a caller floods: the first refusal per
    (actor, method, result) in a window (per target too for a handler's refusals) is written at once,
    in full; the others of that window are counted and written as one event (``count``) when the
    window ends; at most MAX_REFUSAL_KEYS keys a window. Event-loop thread only; the writes run in
    worker threads."""

    def __init__(
        self,
        store: Store,
        window_seconds: float = REFUSAL_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._window = window_seconds
        self._clock = clock
        self._open: dict[tuple[str, str, str, str], _Tally] = {}
        self._writes: set[asyncio.Future[None]] = set()

    def record(self, event: audit_pb2.AuditEvent, by_target: bool = False) -> asyncio.Future[None] | None:
        """Count the refusal; returns the write when this one is written (the window's first).
        ``by_target``: a handler's refusal of an authenticated caller, kept apart per target too."""
        now = self._clock()
        self._close_expired(now)
        key = (event.actor, event.action, event.result, event.target if by_target else "")
        if key not in self._open and len(self._open) >= MAX_REFUSAL_KEYS:
            key = (event.actor, "*", event.result, "")
        tally = self._open.get(key)
        if tally is not None:
            tally.more += 1
            return None
        event.outcome, event.count = "refused", 1
        if not event.HasField("at"):
            event.at.FromDatetime(datetime.datetime.now(datetime.UTC))
        self._open[key] = _Tally(now, event)
        asyncio.get_running_loop().call_later(self._window, self._close_expired, None)
        return self._write(event)

    def close(self) -> None:
        """Write every open window's count (at stop)."""
        self._close_expired(None, every=True)

    async def drain(self) -> None:
        """Wait for the writes under way (tests; stop)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _close_expired(self, now: float | None, every: bool = False) -> None:
        now = self._clock() if now is None else now
        for key, tally in list(self._open.items()):
            if every or now - tally.started >= self._window:
                del self._open[key]
                if tally.more:
                    summary = audit_pb2.AuditEvent()
                    summary.CopyFrom(tally.event)
                    summary.at.FromDatetime(datetime.datetime.now(datetime.UTC))
                    summary.count = tally.more
                    summary.before = summary.after = ""
                    summary.detail = (
                        f"{tally.more} more refusal(s) like the previous one within {self._window:g} s: "
                        f"{tally.event.detail}"
                    )[:2000]
                    self._write(summary)

    def _write(self, event: audit_pb2.AuditEvent) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().run_in_executor(None, self._append, event)
        self._writes.add(future)
        future.add_done_callback(self._writes.discard)
        return future

    def _append(self, event: audit_pb2.AuditEvent) -> None:
        try:
            self._store.append_audit(event)
        except Exception:
            log.exception("could not write a refusal to the audit log", extra={"action": event.action})

    def interceptor_hook(self, refusal: Refusal) -> asyncio.Future[None] | None:
        """For ``AuthInterceptor(on_refusal=...)``: a call refused by the token check."""
        service, _, method = refusal.method.lstrip("/").partition("/")
        event = audit_pb2.AuditEvent(
            actor=refusal.actor,
            role=refusal.role,
            action=f"{service.rsplit('.', 1)[-1]}/{method}"[:200],
            target=f"peer/{refusal.peer}"[:200] if refusal.peer else "",
            result=refusal.code.name,
            detail=refusal.reason[:2000],
        )
        return self.record(event)


async def _written(write: asyncio.Future[None] | None) -> None:
    if write is not None:
        await asyncio.shield(write)  # the event is in the log before the caller hears the refusal


class Auditor:
    def __init__(self, store: Store, tokens: TokenTable | None, refusals: RefusalLog | None = None) -> None:
        self._store = store
        self._tokens = tokens
        self.refusals = refusals or RefusalLog(store)

    async def refuse(self, context: grpc.aio.ServicerContext, action: str, target: str, error: WeirError) -> NoReturn:
        """Audit a refusal decided inside a handler (before any change) and abort with it."""
        identity = self.identity(context)
        event = audit_pb2.AuditEvent(
            actor=identity.name,
            role=identity.role.name.lower(),
            action=action,
            target=target[:500],
            result=status_code_for(error.kind).name,
            detail=error.message[:2000],
        )
        await _written(self.refusals.record(event, by_target=True))
        await abort_with(context, error)

    def identity(self, context: grpc.aio.ServicerContext) -> Identity:
        return identity_of(context, self._tokens)

    async def run(
        self,
        context: grpc.aio.ServicerContext,
        action: str,
        target: str,
        before: Callable[[], Message | None],
        change: Callable[[], T],
        after: Callable[[T], Message | None] = lambda result: result if isinstance(result, Message) else None,
        atomic: bool = False,
    ) -> T:
        """Run the blocking ``change`` in a thread and record it; aborts the RPC on a WeirError.

        ``atomic``: ``change`` only writes to the store (no file, process or network side effect), so
        the before-read, the change and its OK audit event are one unit of work: they commit together
        or not at all, and the whole unit is rerun on a write conflict with another transaction."""
        if not atomic:

            async def call(identity: Identity, event: audit_pb2.AuditEvent) -> T:
                event.before = summary(await asyncio.to_thread(_or_none, before))
                return await asyncio.to_thread(change)

            return await self.run_async(context, action, target, call, after)

        event = self._event(context, action, target)

        def unit(_: object) -> T:
            event.before = summary(_or_none(before))
            result = change()
            event.after = summary(after(result))
            event.result, event.outcome = "OK", "ok"
            self._store.append_audit(event)  # joins the change's transaction
            return result

        try:
            return await asyncio.to_thread(self._store.atomically, unit)
        except Exception as error:
            await self._failed(context, event, error)

    def _event(self, context: grpc.aio.ServicerContext, action: str, target: str) -> audit_pb2.AuditEvent:
        identity = self.identity(context)
        event = audit_pb2.AuditEvent(actor=identity.name, role=identity.role.name.lower(), action=action, target=target)
        event.at.FromDatetime(datetime.datetime.now(datetime.UTC))
        return event

    async def _failed(
        self, context: grpc.aio.ServicerContext, event: audit_pb2.AuditEvent, error: Exception
    ) -> NoReturn:
        """Record a change that did not happen (in a transaction of its own: nothing else was
        written) and abort the RPC with its error."""
        error = as_weir_error(error)  # type: ignore[assignment]
        kind = error.kind if isinstance(error, WeirError) else None
        event.result = status_code_for(kind).name if kind else "INTERNAL"
        event.outcome = ""
        event.after = ""
        event.detail = error.message if isinstance(error, WeirError) else type(error).__name__
        if kind is not None and event.result in REFUSED_RESULTS:
            await _written(self.refusals.record(event, by_target=True))  # nothing changed: aggregated
        else:
            event.outcome = "failed"
            try:
                await asyncio.to_thread(self._store.append_audit, event)
            except Exception:  # e.g. the database is down: the caller still hears why its call failed
                log.warning("could not write a failed call to the audit log", extra={"action": event.action})
        await abort_with(context, error)

    async def run_async(
        self,
        context: grpc.aio.ServicerContext,
        action: str,
        target: str,
        call: Callable[[Identity, audit_pb2.AuditEvent], Awaitable[T]],
        after: Callable[[T], Message | None] = lambda result: result if isinstance(result, Message) else None,
    ) -> T:
        """Await ``call(identity, event)`` and append the audit event, OK or failed (then abort).
        The OK event is a transaction of its own after the change's: for calls with side effects
        beyond the store (processes, files, the network) or several steps; ``run(atomic=True)``
        makes a store-only change and its event one unit of work."""
        event = self._event(context, action, target)
        try:
            result = await call(self.identity(context), event)
        except Exception as error:
            await self._failed(context, event, error)
        event.after = summary(after(result))
        event.result, event.outcome = "OK", "ok"
        await asyncio.to_thread(self._store.append_audit, event)
        return result


PROTECTED_FLAG = "protected"


def is_protected(deployment: deployments_pb2.Deployment) -> bool:
    return deployment.flags.get(PROTECTED_FLAG) == "true"


async def refuse_if_protected(
    auditor: Auditor,
    context: grpc.aio.ServicerContext,
    action: str,
    target: str,
    deployments: list[deployments_pb2.Deployment],
    how: str = "",
) -> None:
    """Refuse (PERMISSION_DENIED, audited) a non-admin's direct change to protected endpoints:
    they change only through an approved rollout, or by an admin."""
    protected = [deployment.endpoint for deployment in deployments if is_protected(deployment)]
    if not protected or auditor.identity(context).role >= Role.ADMIN:
        return
    names = ", ".join(f"'{endpoint}'" for endpoint in protected)
    await auditor.refuse(
        context,
        action,
        target,
        PermissionDeniedError(
            f"endpoint {names} is protected{how}: change it with an approved rollout (StartRollout, then "
            "ApproveRollout by an approver), or as an admin"
        ),
    )


def _or_none(read: Callable[[], Message | None]) -> Message | None:
    try:
        return read()
    except WeirError:
        return None  # the target does not exist (yet): nothing to summarise


async def read_if_there(context: grpc.aio.ServicerContext, call: Callable[[], T]) -> T | None:
    """``call()`` in a worker thread; None when what it reads is not there (a Weir error), the
    RPC aborted on any other failure (a database that cannot be reached: UNAVAILABLE)."""
    try:
        return await asyncio.to_thread(call)
    except WeirError:
        return None
    except Exception as error:
        await abort_with(context, error)


async def _read(context: grpc.aio.ServicerContext, call: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(call)
    except Exception as error:
        await abort_with(context, error)


def _optional(message: Any, field: str) -> Any:
    return getattr(message, field) if message.HasField(field) else None
