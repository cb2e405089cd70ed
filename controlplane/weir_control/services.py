"""The Registry, Deployments, Rollouts and Audit gRPC services: thin adapters over the store (the
audit trail and the RPC-edge helpers they share: ``weir_control.auditing``).

Every store call runs in a thread (``asyncio.to_thread``): SQL and disk never block the event loop.
Weir's errors become status codes in ``abort_with``. Every mutating call, successful or not,
appends one audit event naming who (the token's owner), what, the target and a before/after summary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from weir_control.artifacts import ArtifactStore, check_sha256, check_validation_header
from weir_control.attach import DesiredStateHub
from weir_control.auditing import (  # noqa: F401 (re-exported: other services import them from here)
    MAX_REFUSAL_KEYS,
    PROTECTED_FLAG,
    Auditor,
    RefusalLog,
    _optional,
    _or_none,
    _read,
    abort_with,
    is_protected,
    read_if_there,
    refuse_if_protected,
    summary,
)
from weir_control.metrics import ControlMetrics
from weir_control.model_config import check_artifact_filename, signature_from_config
from weir_control.rollouts import RolloutController
from weir_control.store import Store
from weir_proto.auth import Role
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
)
from weir_proto.validation_inputs import VALIDATION_FILENAME

log = logging.getLogger(__name__)
T = TypeVar("T")
PRIMARY_VARIANT = "primary"


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
    def __init__(
        self,
        store: Store,
        auditor: Auditor,
        hub: DesiredStateHub,
        other_replicas: Callable[[], list[deployments_pb2.ReplicaInfo]] | None = None,
    ) -> None:
        self._store = store
        self._auditor = auditor
        self._hub = hub
        self._other_replicas = other_replicas  # data planes attached to other control-plane replicas (blocking)

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
        deployment = await read_if_there(context, lambda: self._store.get_deployment(endpoint))
        if deployment is not None:
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
        replicas: list[deployments_pb2.ReplicaInfo] = list(self._hub.replicas())
        if self._other_replicas is not None:
            replicas += await asyncio.to_thread(self._other_replicas)
        replicas.sort(key=lambda info: info.replica_id)
        return deployments_pb2.ListReplicasResponse(replicas=replicas)


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
