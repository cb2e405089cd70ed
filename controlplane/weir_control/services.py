"""The Registry, Deployments and Audit gRPC services: thin adapters over the store.

Every store call runs in a thread (``asyncio.to_thread``): SQL and disk never block the event loop.
Weir's errors become status codes in ``abort_with``. Every mutating call, successful or not,
appends one audit event naming who (the token's owner), what, the target and a before/after summary.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from weir_control.artifacts import ArtifactStore, check_sha256, check_validation_header
from weir_control.attach import DesiredStateHub
from weir_control.metrics import ControlMetrics
from weir_control.model_config import check_artifact_filename, signature_from_config
from weir_control.rollouts import RolloutController
from weir_control.store import Store
from weir_control.store.store import REFUSED_RESULTS
from weir_proto.auth import Identity, Refusal, Role, TokenTable, identity_of
from weir_proto.control.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    deployments_pb2,
    deployments_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    rollouts_pb2,
    rollouts_pb2_grpc,
)
from weir_proto.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    WeirError,
    status_code_for,
)
from weir_proto.validation_inputs import VALIDATION_FILENAME

log = logging.getLogger(__name__)
T = TypeVar("T")
PRIMARY_VARIANT = "primary"


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
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
        kind = error.kind if isinstance(error, WeirError) else None
        event.result = status_code_for(kind).name if kind else "INTERNAL"
        event.outcome = ""
        event.after = ""
        event.detail = error.message if isinstance(error, WeirError) else type(error).__name__
        if kind is not None and event.result in REFUSED_RESULTS:
            await _written(self.refusals.record(event, by_target=True))  # nothing changed: aggregated
        else:
            event.outcome = "failed"
            await asyncio.to_thread(self._store.append_audit, event)
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


async def _read(context: grpc.aio.ServicerContext, call: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(call)
    except Exception as error:
        await abort_with(context, error)


def _optional(message: Any, field: str) -> Any:
    return getattr(message, field) if message.HasField(field) else None


class RegistryService(registry_pb2_grpc.RegistryServicer):
    def __init__(
        self,
        store: Store,
        artifacts: ArtifactStore,
        auditor: Auditor,
        hub: DesiredStateHub,
        metrics: ControlMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._artifacts = artifacts
        self._auditor = auditor
        self._hub = hub

    async def CreateRegisteredModel(
        self, request: registry_pb2.CreateRegisteredModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisteredModel:
        return await self._auditor.run(
            context,
            "Registry/CreateRegisteredModel",
            f"model/{request.name}",
            lambda: self._store.get_model(request.name),
            lambda: self._store.create_model(request.name, request.description, request.tags),
            atomic=True,
        )

    async def GetRegisteredModel(
        self, request: registry_pb2.GetRegisteredModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisteredModel:
        return await _read(context, lambda: self._store.get_model(request.name))

    async def UpdateRegisteredModel(
        self, request: registry_pb2.UpdateRegisteredModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisteredModel:
        return await self._auditor.run(
            context,
            "Registry/UpdateRegisteredModel",
            f"model/{request.name}",
            lambda: self._store.get_model(request.name),
            lambda: self._store.update_model(
                request.name, _optional(request, "description"), request.set_tags, list(request.delete_tags)
            ),
            atomic=True,
        )

    async def SearchRegisteredModels(
        self, request: registry_pb2.SearchRegisteredModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SearchRegisteredModelsResponse:
        models, token = await _read(
            context,
            lambda: self._store.search_models(
                request.name_contains, request.tags, request.page_size, request.page_token
            ),
        )
        return registry_pb2.SearchRegisteredModelsResponse(models=models, next_page_token=token)

    async def CreateModelVersion(
        self, request_iterator: AsyncIterator[registry_pb2.CreateModelVersionRequest], context: grpc.aio.ServicerContext
    ) -> registry_pb2.ModelVersion:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            await self._auditor.refuse(
                context,
                "Registry/CreateModelVersion",
                "",
                InvalidArgumentError("part: expected the first message to be a header, got a chunk or nothing"),
            )
        header = first.header
        target = f"model/{header.model_name}"
        upload = _Upload(self._store, self._artifacts, header)
        await self._auditor.run(context, "Registry/CreateModelVersion", target, lambda: None, upload.begin)
        loop = asyncio.get_running_loop()

        def on_rpc_done(_: object) -> None:
            # A client that goes away mid-upload does not always end the read loop below; the RPC's
            # end does fire this. Marking FAILED twice or after READY is a no-op (PENDING only).
            if not upload.finished:
                loop.run_in_executor(None, upload.fail, "the upload ended before it completed")

        context.add_done_callback(on_rpc_done)
        return await self._finish_upload(context, upload, request_iterator)

    async def _finish_upload(
        self,
        context: grpc.aio.ServicerContext,
        upload: _Upload,
        request_iterator: AsyncIterator[registry_pb2.CreateModelVersionRequest],
    ) -> registry_pb2.ModelVersion:
        """Receive the chunks into the artifact store; READY at the end, FAILED on any problem."""
        target = f"model/{upload.header.model_name}/version/{upload.version}"
        try:
            async for part in request_iterator:
                kind = part.WhichOneof("part")
                if kind == "validation_chunk":  # the version's validation inputs (validation.npz)
                    await asyncio.to_thread(upload.write_validation, part.validation_chunk)
                    continue
                if kind != "chunk":
                    raise InvalidArgumentError("part: expected chunks after the header, got a second header")
                await asyncio.to_thread(upload.write, part.chunk)
        except asyncio.CancelledError:
            # The caller went away: mark the version FAILED in a worker thread that this task's
            # cancellation cannot interrupt (an await here could be cancelled again).
            asyncio.get_running_loop().run_in_executor(
                None, upload.fail, "the upload was cancelled before it completed"
            )
            raise
        except Exception as error:
            reason = error.message if isinstance(error, WeirError) else f"upload failed: {type(error).__name__}"
            await asyncio.to_thread(upload.fail, reason)
            self._count_upload("failed")
            if isinstance(error, WeirError):
                await abort_with(context, error)
            raise
        try:
            version = await self._auditor.run(
                context,
                "Registry/CompleteModelVersion",
                target,
                lambda: self._store.get_version(upload.header.model_name, upload.version),
                upload.commit,
            )
        except BaseException:
            self._count_upload("failed")
            raise
        self._count_upload("ready")
        return version

    def _count_upload(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.uploads.labels(result).inc()

    async def GetModelVersion(
        self, request: registry_pb2.GetModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ModelVersion:
        return await _read(context, lambda: self._store.get_version(request.model_name, request.version))

    async def SearchModelVersions(
        self, request: registry_pb2.SearchModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SearchModelVersionsResponse:
        versions, token = await _read(
            context,
            lambda: self._store.search_versions(
                request.model_name, request.state, request.tags, request.page_size, request.page_token
            ),
        )
        return registry_pb2.SearchModelVersionsResponse(versions=versions, next_page_token=token)

    async def UpdateModelVersion(
        self, request: registry_pb2.UpdateModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ModelVersion:
        return await self._auditor.run(
            context,
            "Registry/UpdateModelVersion",
            f"model/{request.model_name}/version/{request.version}",
            lambda: self._store.get_version(request.model_name, request.version),
            lambda: self._store.update_version(
                request.model_name,
                request.version,
                _optional(request, "description"),
                request.set_tags,
                list(request.delete_tags),
                request.set_metrics,
            ),
            atomic=True,
        )

    async def _require_admin_if_followed_by_protected(
        self, context: grpc.aio.ServicerContext, action: str, model_name: str, alias: str
    ) -> None:
        following = await _read(context, lambda: self._store.deployments_following(model_name, alias))
        await refuse_if_protected(
            self._auditor,
            context,
            action,
            f"model/{model_name}/alias/{alias}",
            following,
            f" and follows model '{model_name}' alias '{alias}'",
        )

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ModelVersion:
        # Moving an alias a protected endpoint follows changes what that endpoint serves.
        await self._require_admin_if_followed_by_protected(
            context, "Registry/SetAlias", request.model_name, request.alias
        )
        version = await self._auditor.run(
            context,
            "Registry/SetAlias",
            f"model/{request.model_name}/alias/{request.alias}",
            lambda: self._store.get_version_by_alias(request.model_name, request.alias),
            lambda: self._store.set_alias(request.model_name, request.alias, request.version),
            atomic=True,
        )
        return version

    async def DeleteAlias(
        self, request: registry_pb2.DeleteAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeleteAliasResponse:
        # Refused while any endpoint follows the alias (the store says which); protected ones first.
        await self._require_admin_if_followed_by_protected(
            context, "Registry/DeleteAlias", request.model_name, request.alias
        )
        await self._auditor.run(
            context,
            "Registry/DeleteAlias",
            f"model/{request.model_name}/alias/{request.alias}",
            lambda: self._store.get_version_by_alias(request.model_name, request.alias),
            lambda: self._store.delete_alias(request.model_name, request.alias),
            atomic=True,
        )
        return registry_pb2.DeleteAliasResponse()

    async def GetModelVersionByAlias(
        self, request: registry_pb2.GetModelVersionByAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ModelVersion:
        return await _read(context, lambda: self._store.get_version_by_alias(request.model_name, request.alias))

    async def DownloadArtifact(
        self, request: registry_pb2.DownloadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
        version = await _read(context, lambda: self._store.get_version(request.model_name, request.version))
        if version.state != registry_pb2.ModelVersion.READY:
            await abort_with(
                context,
                FailedPreconditionError(
                    f"model '{request.model_name}' version {request.version}: expected a READY version to "
                    f"download, it is {registry_pb2.ModelVersion.State.Name(version.state)}"
                ),
            )
        if request.validation and not version.validation_sha256:
            await abort_with(
                context,
                NotFoundError(f"model '{request.model_name}' version {request.version}: no validation inputs"),
            )
        yield registry_pb2.DownloadArtifactResponse(
            header=registry_pb2.DownloadArtifactResponse.Header(
                artifact_sha256=version.validation_sha256, artifact_size=version.validation_size,
                artifact_filename=VALIDATION_FILENAME,
            )
            if request.validation
            else registry_pb2.DownloadArtifactResponse.Header(
                artifact_sha256=version.artifact_sha256,
                artifact_size=version.artifact_size,
                artifact_filename=version.artifact_filename,
            )
        )  # fmt: skip
        chunks = self._artifacts.read(version.validation_sha256 if request.validation else version.artifact_sha256)
        while True:
            try:
                chunk = await asyncio.to_thread(next, chunks, None)
            except Exception as error:
                await abort_with(context, error)
            if chunk is None:
                return
            yield registry_pb2.DownloadArtifactResponse(chunk=chunk)


class _Upload:
    """One CreateModelVersion call: PENDING row, then bytes, then READY or FAILED (blocking calls,
    run in threads by the service)."""

    def __init__(self, store: Store, artifacts: ArtifactStore, header: registry_pb2.CreateModelVersionRequest.Header):
        self.header = header
        self._store = store
        self._artifacts = artifacts
        self.version = 0
        self.finished = False  # committed or failed
        self._writer: Any = None
        self._validation: Any = None  # the validation inputs' writer, when the header announces them

    def begin(self) -> registry_pb2.ModelVersion:
        header = self.header
        check_artifact_filename(header.artifact_filename)
        check_sha256("artifact_sha256", header.artifact_sha256)
        if header.artifact_size < 0:
            raise InvalidArgumentError(f"artifact_size: expected 0 (unknown) or more, got {header.artifact_size}")
        signature = signature_from_config(header.config_pbtxt, header.artifact_filename)
        check_validation_header(header.validation_sha256, header.validation_size)
        self.version = self._store.begin_version(header, signature)
        # The artifact is checked before it is stored (no pickled payload, the kind its name says, as
        # many inputs as the config declares): a refused one makes the version FAILED with the reason.
        self._writer = self._artifacts.writer(
            header.artifact_sha256, header.artifact_size, header.artifact_filename, header.config_pbtxt
        )
        if header.validation_sha256:
            self._validation = self._artifacts.validation_writer(header.validation_sha256, header.validation_size)
        return self._store.get_version(header.model_name, self.version)

    def write(self, chunk: bytes) -> None:
        self._writer.write(chunk)

    def write_validation(self, chunk: bytes) -> None:
        if self._validation is None:
            raise InvalidArgumentError("validation_chunk: expected none (the header has no validation_sha256), got one")
        self._validation.write(chunk)

    def commit(self) -> registry_pb2.ModelVersion:
        try:
            blob = self._writer.commit()
            validation = self._validation.commit() if self._validation is not None else None
        except WeirError as error:
            self._store.fail_version(self.header.model_name, self.version, error.message)
            raise
        finally:
            self.finished = True
        return self._store.complete_version(
            self.header.model_name, self.version, blob.sha256, blob.size,
            (validation.sha256, validation.size) if validation is not None else ("", 0),
        )  # fmt: skip

    def fail(self, reason: str) -> None:
        self.finished = True
        if self._validation is not None:
            self._validation.discard()
        if self._writer is not None:
            self._writer.discard()
        if self.version:
            self._store.fail_version(self.header.model_name, self.version, reason)


class DeploymentsService(deployments_pb2_grpc.DeploymentsServicer):
    def __init__(self, store: Store, auditor: Auditor, hub: DesiredStateHub) -> None:
        self._store = store
        self._auditor = auditor
        self._hub = hub

    async def Deploy(
        self, request: deployments_pb2.DeployRequest, context: grpc.aio.ServicerContext
    ) -> deployments_pb2.Deployment:
        variant = deployments_pb2.Variant(name=PRIMARY_VARIANT, model_name=request.model_name, weight=100)
        target = request.WhichOneof("target")
        if target == "alias":
            variant.alias = request.alias
        elif target == "version":
            variant.version = request.version
        identity = self._auditor.identity(context)
        await self._require_admin_if_protected(context, "Deployments/Deploy", request.endpoint)
        deployment = await self._auditor.run(
            context,
            "Deployments/Deploy",
            f"endpoint/{request.endpoint}",
            lambda: self._store.get_deployment(request.endpoint),
            lambda: self._store.deploy(request.endpoint, [variant], identity.name),
            atomic=True,
        )
        return deployment

    async def SetTraffic(
        self, request: deployments_pb2.SetTrafficRequest, context: grpc.aio.ServicerContext
    ) -> deployments_pb2.Deployment:
        identity = self._auditor.identity(context)
        await self._require_admin_if_protected(context, "Deployments/SetTraffic", request.endpoint)
        routing = request.routing if request.HasField("routing") else None
        deployment = await self._auditor.run(
            context,
            "Deployments/SetTraffic",
            f"endpoint/{request.endpoint}",
            lambda: self._store.get_deployment(request.endpoint),
            lambda: self._store.deploy(request.endpoint, list(request.variants), identity.name, routing),
            atomic=True,
        )
        return deployment

    async def SetFlag(
        self, request: deployments_pb2.SetFlagRequest, context: grpc.aio.ServicerContext
    ) -> deployments_pb2.Deployment:
        identity = self._auditor.identity(context)
        action, target = "Deployments/SetFlag", f"endpoint/{request.endpoint}/flag/{request.name}"
        if request.name == PROTECTED_FLAG and identity.role < Role.ADMIN:
            await self._auditor.refuse(
                context,
                action,
                target,
                PermissionDeniedError("name 'protected': protecting or unprotecting an endpoint needs admin"),
            )
        # Any other flag (a kill switch too) changes what a protected endpoint serves.
        await self._require_admin_if_protected(context, action, request.endpoint, target)
        deployment = await self._auditor.run(
            context,
            action,
            target,
            lambda: self._store.get_deployment(request.endpoint),
            lambda: self._store.set_flag(request.endpoint, request.name, request.value, identity.name),
            atomic=True,
        )
        return deployment

    async def _require_admin_if_protected(
        self, context: grpc.aio.ServicerContext, action: str, endpoint: str, target: str = ""
    ) -> None:
        """A protected endpoint changes through approved rollouts; direct changes are for admins
        (refused and audited otherwise)."""
        try:
            deployment = await asyncio.to_thread(self._store.get_deployment, endpoint)
        except WeirError:
            return
        await refuse_if_protected(self._auditor, context, action, target or f"endpoint/{endpoint}", [deployment])

    async def Undeploy(
        self, request: deployments_pb2.UndeployRequest, context: grpc.aio.ServicerContext
    ) -> deployments_pb2.UndeployResponse:
        # Undeploying a protected endpoint would also drop its protection (the flag lives with it).
        await self._require_admin_if_protected(context, "Deployments/Undeploy", request.endpoint)
        await self._auditor.run(
            context,
            "Deployments/Undeploy",
            f"endpoint/{request.endpoint}",
            lambda: self._store.get_deployment(request.endpoint),
            lambda: self._store.undeploy(request.endpoint),
            atomic=True,
        )
        return deployments_pb2.UndeployResponse()

    async def GetDeployment(
        self, request: deployments_pb2.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> deployments_pb2.Deployment:
        return await _read(context, lambda: self._store.get_deployment(request.endpoint))

    async def ListDeployments(
        self, request: deployments_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> deployments_pb2.ListDeploymentsResponse:
        deployments, token = await _read(
            context, lambda: self._store.list_deployments(request.page_size, request.page_token)
        )
        return deployments_pb2.ListDeploymentsResponse(deployments=deployments, next_page_token=token)

    async def ListReplicas(
        self, request: deployments_pb2.ListReplicasRequest, context: grpc.aio.ServicerContext
    ) -> deployments_pb2.ListReplicasResponse:
        return deployments_pb2.ListReplicasResponse(replicas=self._hub.replicas())


class RolloutsService(rollouts_pb2_grpc.RolloutsServicer):
    """Canary rollouts: thin adapters over the controller; every call is audited."""

    def __init__(self, store: Store, auditor: Auditor, controller: RolloutController) -> None:
        self._store = store
        self._auditor = auditor
        self._controller = controller

    async def _audited(self, context: grpc.aio.ServicerContext, action: str, endpoint: str, call: Any) -> Any:
        return await self._auditor.run_async(
            context, action, f"endpoint/{endpoint}", lambda identity, event: call(identity.name)
        )

    async def StartRollout(
        self, request: rollouts_pb2.StartRolloutRequest, context: grpc.aio.ServicerContext
    ) -> rollouts_pb2.Rollout:
        return await self._audited(
            context, "Rollouts/StartRollout", request.endpoint, lambda actor: self._controller.start(request, actor)
        )

    async def GetRollout(
        self, request: rollouts_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> rollouts_pb2.Rollout:
        return await _read(context, lambda: self._store.get_rollout(request.endpoint))

    async def _act(self, action: str, request: rollouts_pb2.RolloutAction, context: grpc.aio.ServicerContext) -> Any:
        return await self._audited(
            context,
            f"Rollouts/{action.capitalize()}Rollout",
            request.endpoint,
            lambda actor: self._controller.act(action, request.endpoint, actor),
        )

    async def StartBlueGreen(
        self, request: rollouts_pb2.StartBlueGreenRequest, context: grpc.aio.ServicerContext
    ) -> rollouts_pb2.Rollout:
        return await self._audited(
            context,
            "Rollouts/StartBlueGreen",
            request.endpoint,
            lambda actor: self._controller.start_blue_green(request, actor),
        )

    async def SwitchBlueGreen(self, request: rollouts_pb2.RolloutAction, context: grpc.aio.ServicerContext) -> Any:
        return await self._act("switch", request, context)

    async def ApproveRollout(self, request: rollouts_pb2.RolloutAction, context: grpc.aio.ServicerContext) -> Any:
        return await self._audited(
            context, "Rollouts/ApproveRollout", request.endpoint,
            lambda actor: self._controller.approve(request.endpoint, actor),
        )  # fmt: skip

    async def PauseRollout(self, request: rollouts_pb2.RolloutAction, context: grpc.aio.ServicerContext) -> Any:
        return await self._act("pause", request, context)

    async def ResumeRollout(self, request: rollouts_pb2.RolloutAction, context: grpc.aio.ServicerContext) -> Any:
        return await self._act("resume", request, context)

    async def AbortRollout(self, request: rollouts_pb2.RolloutAction, context: grpc.aio.ServicerContext) -> Any:
        return await self._act("abort", request, context)

    async def PromoteRollout(self, request: rollouts_pb2.RolloutAction, context: grpc.aio.ServicerContext) -> Any:
        return await self._act("promote", request, context)


class AuditService(audit_pb2_grpc.AuditServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def ListAuditEvents(
        self, request: audit_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListAuditEventsResponse:
        events, token = await _read(context, lambda: self._store.list_audit(request))
        return audit_pb2.ListAuditEventsResponse(events=events, next_page_token=token)
