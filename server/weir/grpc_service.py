"""The gRPC servicer for ``inference.GRPCInferenceService``: a thin adapter.

Each method turns a request message into a call on the data plane or the repository and the
result into a response message. Weir's errors become status codes in one place (``_abort``);
anything unexpected is logged with the request id and answered INTERNAL without leaking internals.
Handlers are registered generically from the private descriptor pool (no generated ``_pb2_grpc``,
which would pull the ``inference`` protos into protobuf's default pool).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format

from weir import __version__
from weir.dataplane import DataPlane, InferAnswer
from weir.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, WeirError
from weir.grpc_status import status_code_for
from weir.logs import request_id_var
from weir.repository import LoadedVersion, ModelRepository
from weir_proto.auth import Role, TokenTable, identity_of
from weir_proto.inference import messages as pb
from weir_proto.inference.pool import SERVICE

log = logging.getLogger(__name__)

SERVER_NAME = "weir"
# Protocol extensions Weir implements, in Triton's naming (perf_analyzer and clients look at these).
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "binary_tensor_data", "parameters")
MAX_IN_FLIGHT_PER_STREAM = 256  # requests of one ModelStreamInfer computed at once; the reader waits beyond


def _deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    if isinstance(error, WeirError):
        await context.abort(status_code_for(error.kind), error.message)
    log.exception("unexpected error in an RPC", exc_info=error)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error (request id '{request_id_var.get()}'); see the server log"
    )
    raise AssertionError("unreachable: context.abort raises")


class InferenceServicer:
    def __init__(
        self,
        dataplane: DataPlane,
        repository: ModelRepository,
        explicit_model_control: bool,
        is_ready: Callable[[], bool],
        on_repository_change: Callable[[], Awaitable[None]],
        tokens: TokenTable | None = None,
    ) -> None:
        self._tokens = tokens
        self._dataplane = dataplane
        self._repository = repository
        self._explicit_model_control = explicit_model_control
        self._is_ready = is_ready
        self._on_repository_change = on_repository_change

    # --- health and metadata --------------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    def _resolve(self, name: str, version: str) -> LoadedVersion:
        """A model, or for a routed endpoint the variant metadata describes (its default one)."""
        route = self._dataplane.router.get(name)
        if route is not None:
            return self._repository.resolve(route.default_variant.model, version)
        return self._repository.resolve(name, version)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._resolve(request.name, request.version)
        except WeirError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            loaded = self._resolve(request.name, request.version)
        except WeirError as error:
            await _abort(context, error)
        signature = loaded.signature
        response = pb.ModelMetadataResponse(
            name=request.name,
            versions=[version.version_label for version in self._repository.ready_versions(loaded.name)],
            platform=loaded.config.platform,
        )
        for spec in signature.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype.name, shape=signature.full_shape(spec))
        for spec in signature.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype.name, shape=signature.full_shape(spec))
        return response

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        try:
            loaded = self._resolve(request.name, request.version)
        except WeirError as error:
            await _abort(context, error)
        if loaded.name == request.name:
            return pb.ModelConfigResponse(config=loaded.config)
        config = pb.ModelConfig()
        config.CopyFrom(loaded.config)
        config.name = request.name  # the endpoint the client asked about
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        try:
            route = self._dataplane.router.get(request.name) if request.name else None
            if route is not None:  # a routed endpoint: the statistics of each of its variants
                versions = [
                    loaded
                    for variant in route.variants
                    for loaded in (
                        [self._repository.resolve(variant.model, request.version)]
                        if request.version
                        else self._repository.ready_versions(variant.model)
                    )
                ]
            elif request.name:
                loaded = self._repository.resolve(request.name, request.version)
                versions = [loaded] if request.version else self._repository.ready_versions(loaded.name)
            elif request.version:
                raise InvalidArgumentError("version: expected empty when name is empty (statistics of all models)")
            else:
                versions = [
                    loaded
                    for model in self._repository.served_models()
                    for loaded in self._repository.ready_versions(model.name)
                ]
        except WeirError as error:
            await _abort(context, error)
        for loaded in versions:
            response.model_stats.append(loaded.statistics.to_proto(loaded.name, loaded.version_label))
        return response

    # --- inference ------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> InferAnswer:
        request_id_var.set(request.id)
        try:
            return await self._dataplane.infer(request, _deadline_of(context), _GrpcCaller(context, self._tokens))
        except Exception as error:
            await _abort(context, error)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's stream form: requests are computed concurrently, answered as they finish (the
        client matches them by id), and an error on one request travels in-band as
        ``error_message`` while the stream stays open."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        in_flight = asyncio.Semaphore(MAX_IN_FLIGHT_PER_STREAM)
        deadline = _deadline_of(context)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            request_id_var.set(request.id)
            try:
                answer = await self._dataplane.infer(request, deadline, _GrpcCaller(context, self._tokens))
                response = pb.ModelInferResponse.FromString(answer) if isinstance(answer, bytes) else answer
                await answers.put(pb.ModelStreamInferResponse(infer_response=response))
            except WeirError as error:
                await answers.put(
                    pb.ModelStreamInferResponse(error_message=error.message, infer_response=_echo(request))
                )
            except Exception:
                log.exception("unexpected error in a stream request")
                message = f"internal error (request id '{request.id}'); see the server log"
                await answers.put(pb.ModelStreamInferResponse(error_message=message, infer_response=_echo(request)))
            finally:
                in_flight.release()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    await in_flight.acquire()
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (message := await answers.get()) is not None:
                yield message
            await reader  # surfaces a failure of the request stream itself
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # --- model repository -----------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(models=self._repository.index(request.ready))

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        try:
            self._require_explicit_control("load")
            override = _config_override(request)
            await self._repository.load(request.model_name, override)
        except WeirError as error:
            await self._on_repository_change()
            await _abort(context, error)
        await self._on_repository_change()
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            self._require_explicit_control("unload")
            await self._repository.unload(request.model_name)
        except WeirError as error:
            await _abort(context, error)
        await self._on_repository_change()
        return pb.RepositoryModelUnloadResponse()

    def _require_explicit_control(self, action: str) -> None:
        if not self._explicit_model_control:
            raise FailedPreconditionError(
                f"model {action}: expected the server in explicit model control mode "
                "(--model-control-mode explicit), it runs in mode 'none'"
            )


class _GrpcCaller:
    """What routing asks of a gRPC call: a metadata header, and whether the caller may pin a variant
    (any caller on a server without tokens; deployers and above with tokens)."""

    __slots__ = ("_context", "_tokens")

    def __init__(self, context: grpc.aio.ServicerContext, tokens: TokenTable | None) -> None:
        self._context = context
        self._tokens = tokens

    def header(self, name: str) -> str | None:
        for key, value in self._context.invocation_metadata() or ():
            if key == name and isinstance(value, str):
                return value
        return None

    def may_pin(self) -> bool:
        return self._tokens is None or identity_of(self._context, self._tokens).role >= Role.DEPLOYER


def _echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)


def _config_override(request: pb.RepositoryModelLoadRequest) -> pb.ModelConfig | None:
    """Triton's load parameter ``config``: a JSON ModelConfig that replaces config.pbtxt."""
    override = None
    for key, parameter in request.parameters.items():
        if key == "config":
            if parameter.WhichOneof("parameter_choice") != "string_param":
                raise InvalidArgumentError("parameters['config']: expected a JSON string, got another type")
            override = pb.ModelConfig()
            try:
                json_format.Parse(parameter.string_param, override)
            except json_format.ParseError as error:
                raise InvalidArgumentError(
                    f"parameters['config']: expected a JSON ModelConfig, got: {error}"
                ) from error
        else:
            raise InvalidArgumentError(f"parameters: expected only 'config', got unsupported parameter '{key}'")
    if request.repository_name:
        raise NotFoundError(f"repository_name: this server has one unnamed repository, got '{request.repository_name}'")
    return override


def _serializer(response_class: Any) -> Callable[[Any], bytes]:
    """Messages are serialized; bytes (an answer served from the response cache, already in wire
    form) pass through untouched."""
    serialize = response_class.SerializeToString

    def serialize_or_pass(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serialize_or_pass


def generic_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """Method handlers for every RPC of the service, built from the private descriptors."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        request_class: Any = getattr(pb, method.input_type.name)
        response_class: Any = getattr(pb, method.output_type.name)
        behaviour: Callable[..., Awaitable[Any]] = getattr(servicer, method.name)
        make = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            behaviour,
            request_deserializer=request_class.FromString,
            response_serializer=_serializer(response_class),
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
