"""The gRPC servicer for ``inference.GRPCInferenceService``: a thin adapter.

Each method turns a request message into a call on the data plane or the repository and the
result into a response message. Weir's errors become status codes in one place (``_abort``);
anything unexpected is logged with the request id and answered INTERNAL without leaking internals.
Handlers are registered generically from the private descriptor pool (no generated ``_pb2_grpc``,
which would pull the ``inference`` protos into protobuf's default pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format

from weir import __version__
from weir.dataplane import DataPlane, InferAnswer
from weir.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    WeirError,
    clip,
)
from weir.grpc_status import status_of
from weir.logs import RateLimitedLog, request_id_var
from weir.metrics import TransportMetrics
from weir.repository import LoadedVersion, ModelRepository
from weir_proto.auth import Role, TokenTable, identity_of, permits
from weir_proto.inference import messages as pb
from weir_proto.inference.pool import SERVICE

log = logging.getLogger(__name__)

SERVER_NAME = "weir"
# Protocol extensions Weir implements, in Triton's naming (perf_analyzer and clients look at these).
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "binary_tensor_data", "parameters")
# One ModelStreamInfer stream holds at most this many requests being computed or answers not yet sent;
# its reader waits beyond (as it does beyond --stream-backlog-bytes).
STREAM_BACKLOG_REQUESTS = 256
UNDECODABLE_LOG_SECONDS = 10.0  # at most one log line per interval about refused bodies, however many come
SHUTTING_DOWN = "server: shutting down, not accepting new requests; retry on another replica"


def _deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    if isinstance(error, WeirError):
        await context.abort(*status_of(error))
    log.exception("unexpected error in an RPC", exc_info=error)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error (request id '{clip(request_id_var.get())}'); see the server log"
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
        transport: TransportMetrics | None = None,
        stream_backlog_bytes: int = 64 * 1024 * 1024,
        managed_by_control_plane: Callable[[str], bool] = lambda model: False,
    ) -> None:
        self.gate = CallGate()
        self._transport = transport
        self._stream_backlog_bytes = stream_backlog_bytes
        self._managed_by_control_plane = managed_by_control_plane
        self._refusals = RateLimitedLog(log, "request bodies refused", UNDECODABLE_LOG_SECONDS)
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
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Triton's stream form: requests are computed concurrently, answered as they finish (the
        client matches them by id), and an error on one request (an undecodable frame included)
        travels in-band as ``error_message`` while the stream stays open.

        Backpressure: answers wait here until gRPC has sent them, which it does only as fast as the
        client reads. So the reader stops taking requests while the stream's backlog (requests being
        computed plus answers not yet sent) is over its limit, and the client's writes then block on
        HTTP/2 flow control instead of the server's memory growing with every answer nobody reads."""
        answers: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        backlog = StreamBacklog(STREAM_BACKLOG_REQUESTS, self._stream_backlog_bytes, self._transport)
        deadline = _deadline_of(context)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest, size: int) -> None:
            request_id_var.set(request.id)
            try:
                answer = await self._dataplane.infer(request, deadline, _GrpcCaller(context, self._tokens))
                message = _stream_answer(answer)
            except WeirError as error:
                message = _stream_error(error.message, request)
            except Exception:
                log.exception("unexpected error in a stream request")
                message = _stream_error(
                    f"internal error (request id '{clip(request.id)}'); see the server log", request
                )
            backlog.resize(size, len(message))
            await answers.put((message, len(message)))

        async def read_requests() -> None:
            try:
                await backlog.wait_for_room()
                async for request in request_iterator:
                    if isinstance(request, Refused):
                        self._note_refusal(request, context)
                        message = _stream_error(request.error.message, None)
                    elif self.gate.closed:
                        message = _stream_error(SHUTTING_DOWN, request)
                    else:
                        size = request.ByteSize()
                        backlog.add(size)
                        task = asyncio.create_task(answer(request, size))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        await backlog.wait_for_room()
                        continue
                    backlog.add(len(message))
                    await answers.put((message, len(message)))
                    await backlog.wait_for_room()
                while tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await answers.get()) is not None:
                message, size = item
                yield message  # returns once gRPC has taken the message: the client is reading
                backlog.remove(size)
            await reader  # surfaces a failure of the request stream itself
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            backlog.close()

    # --- model repository -----------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            await _abort(context, NotFoundError(_unknown_repository(request.repository_name)))
        return pb.RepositoryIndexResponse(models=self._repository.index(request.ready))

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        try:
            self._require_explicit_control("load", request.model_name)
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
            self._require_explicit_control("unload", request.model_name)
            if request.repository_name:
                raise NotFoundError(_unknown_repository(request.repository_name))
            _check_unload_parameters(request)
            await self._repository.unload(request.model_name)
        except WeirError as error:
            await _abort(context, error)
        await self._on_repository_change()
        return pb.RepositoryModelUnloadResponse()

    def _require_explicit_control(self, action: str, model: str) -> None:
        if not self._explicit_model_control:
            raise FailedPreconditionError(
                f"model {action}: expected the server in explicit model control mode "
                "(--model-control-mode explicit), it runs in mode 'none'"
            )
        if self._managed_by_control_plane(model):
            raise FailedPreconditionError(
                f"model_name: '{clip(model)}' is managed by the control plane this server follows; "
                "deploy or undeploy it there"
            )

    # --- transport ------------------------------------------------------------------------------

    def _note_refusal(self, refused: Refused, context: grpc.aio.ServicerContext) -> None:
        if self._transport is not None:
            self._transport.refused.labels(refused.reason).inc()
        self._refusals.record(reason=refused.reason, detail=refused.error.message, peer=context.peer())

    async def refuse(self, refused: Refused, context: grpc.aio.ServicerContext) -> NoReturn:
        """Answer a body that did not decode: its status, and a log line at most once per interval."""
        self._note_refusal(refused, context)
        await context.abort(*status_of(refused.error))
        raise AssertionError("unreachable: context.abort raises")

    async def refuse_while_stopping(self, context: grpc.aio.ServicerContext) -> NoReturn:
        if self._transport is not None:
            self._transport.refused.labels("shutting_down").inc()
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        raise AssertionError("unreachable: context.abort raises")


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
        return self._tokens is None or permits(identity_of(self._context, self._tokens).role, Role.DEPLOYER)


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
        raise NotFoundError(_unknown_repository(request.repository_name))
    return override


def _check_unload_parameters(request: pb.RepositoryModelUnloadRequest) -> None:
    """Triton's one unload parameter, ``unload_dependents`` (tritonclient always sends it): Weir models
    have no dependents, so either value means the same. Anything else is refused, not ignored."""
    for key, parameter in request.parameters.items():
        if key != "unload_dependents":
            raise InvalidArgumentError(
                f"parameters: expected only 'unload_dependents', got unsupported parameter '{clip(key)}'"
            )
        if parameter.WhichOneof("parameter_choice") != "bool_param":
            raise InvalidArgumentError("parameters['unload_dependents']: expected a bool, got another type")


def _unknown_repository(name: str) -> str:
    return f"repository_name: expected '' (this server has one unnamed repository), got '{clip(name)}'"


def _stream_answer(answer: InferAnswer) -> bytes:
    """A stream message carrying ``answer``, serialized now so the backlog counts its real size. A
    cached answer is already a serialized ModelInferResponse: it is framed as field 2
    (``infer_response``) without parsing it again."""
    if isinstance(answer, bytes):
        return _INFER_RESPONSE_TAG + _varint(len(answer)) + answer
    return pb.ModelStreamInferResponse(infer_response=answer).SerializeToString()


_INFER_RESPONSE_TAG = bytes([2 << 3 | 2])  # field 2, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _stream_error(message: str, request: pb.ModelInferRequest | None) -> bytes:
    echo = _echo(request) if request is not None else None
    return pb.ModelStreamInferResponse(error_message=message, infer_response=echo).SerializeToString()


class StreamBacklog:
    """What one ModelStreamInfer stream holds: requests being computed and answers not yet sent,
    counted and in bytes. ``wait_for_room`` holds the stream's reader while either is at its limit."""

    def __init__(self, max_requests: int, max_bytes: int, metrics: TransportMetrics | None) -> None:
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._metrics = metrics
        self.requests = 0
        self.bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    def _full(self) -> bool:
        return self.requests >= self._max_requests or self.bytes >= self._max_bytes

    def _changed(self, byte_change: int) -> None:
        self.bytes += byte_change
        if self._metrics is not None:
            self._metrics.stream_backlog_bytes.inc(byte_change)
        if self._full():
            self._room.clear()
        else:
            self._room.set()

    def add(self, size: int) -> None:
        self.requests += 1
        self._changed(size)

    def resize(self, old_size: int, new_size: int) -> None:
        self._changed(new_size - old_size)

    def remove(self, size: int) -> None:
        self.requests -= 1
        self._changed(-size)

    def close(self) -> None:
        """The stream ended: what it still held is no longer the server's to send."""
        if self._metrics is not None:
            self._metrics.stream_backlog_bytes.dec(self.bytes)
        self.requests = self.bytes = 0

    async def wait_for_room(self) -> None:
        if not self._full():
            return
        if self._metrics is not None:
            self._metrics.streams_paused.inc()
        try:
            await self._room.wait()
        finally:
            if self._metrics is not None:
                self._metrics.streams_paused.dec()


class CallGate:
    """Admits calls until shutdown begins and counts those in flight, so that shutdown can wait for
    them within its grace period, then end those still running with UNAVAILABLE."""

    def __init__(self) -> None:
        self.closed = False
        self.expired = False
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> bool:
        if self.closed:
            return False
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
            self._idle.clear()
        return True

    def leave(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.discard(task)
        if not self._in_flight:
            self._idle.set()

    def close(self) -> None:
        self.closed = True

    async def drained(self, within_seconds: float) -> bool:
        """Whether every admitted call finished within ``within_seconds``."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(within_seconds, 0.0))
        except TimeoutError:
            return False
        return True

    def expire(self) -> int:
        """The grace period is over: cancel the calls still running (each answers UNAVAILABLE)."""
        self.expired = True
        for task in self._in_flight:
            task.cancel()
        return len(self._in_flight)


@dataclass(frozen=True, slots=True)
class Refused:
    """A request body that could not become a request message: what to answer, and the metric's reason."""

    error: WeirError
    reason: str


_GZIP_MAGIC = b"\x1f\x8b"


def _looks_like_zlib(data: bytes) -> bool:
    # RFC 1950 header: deflate method (8), window <= 32 KiB, and the check bits. gRPC's "deflate" is
    # this format. A request message never starts so: it would be an unknown field 15 of type varint.
    return len(data) >= 2 and data[0] & 0x0F == 8 and data[0] >> 4 <= 7 and (data[0] << 8 | data[1]) % 31 == 0


def _inflate(data: bytes, wbits: int, max_bytes: int, kind: str) -> bytes:
    """Decompress at most ``max_bytes`` (+1 to tell "more"): a small body that claims to inflate to
    gigabytes is refused after allocating the limit, never the claim."""
    inflater = zlib.decompressobj(wbits=wbits)
    try:
        body = inflater.decompress(data, max_bytes + 1)
    except zlib.error as error:
        raise InvalidArgumentError(
            f"request body: expected valid {kind} data, got {len(data)} bytes: {error}"
        ) from None
    if len(body) > max_bytes:
        raise ResourceExhaustedError(
            f"request body: expected at most {max_bytes} bytes once decompressed (--max-message-bytes), "
            f"got more from {len(data)} bytes of {kind}"
        )
    if not inflater.eof or inflater.unused_data:
        raise InvalidArgumentError(f"request body: expected one complete {kind} stream, got truncated or trailing data")
    return body


LARGE_BODY_BYTES = 1024 * 1024  # bodies from this size on are reported to ``on_large_body``


def request_decoder(
    request_class: Any, max_bytes: int, on_large_body: Callable[[int], None] | None = None
) -> Callable[[bytes], Any]:
    """The request deserializer given to gRPC. It never raises (grpcio would answer UNKNOWN and log a
    traceback per body): a body that does not decode becomes a ``Refused`` the handler answers.

    Compressed bodies arrive compressed (the server turns gRPC's own decompression off, which
    inflates without bound before checking the size) and are inflated here within ``max_bytes``."""
    name = request_class.DESCRIPTOR.full_name
    parse = request_class.FromString

    def decode(data: bytes) -> Any:
        if on_large_body is not None and len(data) >= LARGE_BODY_BYTES:
            on_large_body(len(data))
        try:
            if data[:2] == _GZIP_MAGIC:
                data = _inflate(data, 31, max_bytes, "gzip")
            elif _looks_like_zlib(data):
                with contextlib.suppress(InvalidArgumentError):  # not compressed after all: parsed as it came
                    data = _inflate(data, 15, max_bytes, "deflate")
            return parse(data)
        except ResourceExhaustedError as error:
            return Refused(error, "too_large_decompressed")
        except WeirError as error:
            return Refused(error, "undecodable")
        except Exception as error:  # protobuf's DecodeError, and anything else a parser may raise
            message = f"request body: expected a serialized {name}, got {len(data)} bytes that do not decode ({error})"
            return Refused(InvalidArgumentError(message), "undecodable")

    return decode


def _serializer(response_class: Any) -> Callable[[Any], bytes]:
    """Messages are serialized; bytes (an answer served from the response cache, already in wire
    form) pass through untouched."""
    serialize = response_class.SerializeToString

    def serialize_or_pass(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serialize_or_pass


@contextlib.asynccontextmanager
async def _admitted(servicer: InferenceServicer, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """A call through the shutdown gate: refused UNAVAILABLE once stopping, and UNAVAILABLE (not
    CANCELLED) when the grace period cuts it short."""
    gate = servicer.gate
    if not gate.enter():
        await servicer.refuse_while_stopping(context)
    try:
        yield
    except asyncio.CancelledError:
        if gate.expired:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _CUT_SHORT)
        raise
    finally:
        gate.leave()


def _unary(servicer: InferenceServicer, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _admitted(servicer, context):
            if isinstance(request, Refused):
                await servicer.refuse(request, context)
            return await behaviour(request, context)

    return handle


def _streaming(servicer: InferenceServicer, behaviour: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
    async def handle(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _admitted(servicer, context):
            async for message in behaviour(request_iterator, context):
                yield message

    return handle


_CUT_SHORT = "server: shut down before this call finished (the shutdown grace period ran out); retry elsewhere"


def generic_handler(
    servicer: InferenceServicer,
    max_message_bytes: int = 128 * 1024 * 1024,
    on_large_body: Callable[[int], None] | None = None,
) -> grpc.GenericRpcHandler:
    """Method handlers for every RPC of the service, built from the private descriptors. Every call
    passes the servicer's gate (UNAVAILABLE once shutdown began); bodies are decoded by
    ``request_decoder`` within ``max_message_bytes``, and large ones reported to ``on_large_body``."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        request_class: Any = getattr(pb, method.input_type.name)
        response_class: Any = getattr(pb, method.output_type.name)
        behaviour: Any = getattr(servicer, method.name)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(servicer, behaviour),
                request_deserializer=request_decoder(request_class, max_message_bytes, on_large_body),
                response_serializer=_serializer(response_class),
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(servicer, behaviour),
                request_deserializer=request_decoder(request_class, max_message_bytes, on_large_body),
                response_serializer=_serializer(response_class),
            )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
