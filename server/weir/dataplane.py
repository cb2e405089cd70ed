"""The one place that knows the order of a request's steps:

    resolve model version -> codec.decode -> dynamic batcher (queue, batch, backend.infer in an
    executor thread, split per request) -> codec.encode

Transports (the gRPC servicer) stay thin and call ``DataPlane.infer``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from weir import codec
from weir.cache import ResponseCache, response_cache_key
from weir.datatypes import BYTES_INPUTS_ARE_TEXT
from weir.enrichment import Enricher
from weir.errors import FailedPreconditionError, NotFoundError, PermissionDeniedError, WeirError, clip
from weir.metrics import UNKNOWN_MODEL_LABEL, Metrics
from weir.monitoring import RecordBuffer, Sample
from weir.repository import MAX_MODEL_NAME_CHARS, LoadedVersion, ModelRepository
from weir.routing import PIN_PARAMETER, EndpointRoute, Router, VariantRoute, routing_key
from weir.shadow import ShadowMirror
from weir_proto.inference import messages as pb

log = logging.getLogger(__name__)

# A response message, or (a cache hit) the serialized bytes of one.
InferAnswer = pb.ModelInferResponse | bytes


class Caller(Protocol):
    """What routing may need from the transport, asked only for routed endpoints."""

    def header(self, name: str) -> str | None: ...

    def may_pin(self) -> bool: ...


class _NoCaller:
    def header(self, name: str) -> str | None:
        return None

    def may_pin(self) -> bool:
        return True


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        metrics: Metrics,
        max_tensor_elements: int,
        response_cache: ResponseCache | None = None,
        router: Router | None = None,
        shadows: ShadowMirror | None = None,
        enricher: Enricher | None = None,
        records: RecordBuffer | None = None,
        max_bytes_elements: int = codec.DEFAULT_MAX_BYTES_ELEMENTS,
    ) -> None:
        self.shadows = shadows
        self.enricher = enricher
        self.records = records  # sampled requests for drift monitoring (when a control plane is followed)
        self._repository = repository
        self.router = router if router is not None else Router()
        self._metrics = metrics
        self._max_tensor_elements = max_tensor_elements
        self._max_bytes_elements = max_bytes_elements
        self._response_cache = response_cache

    async def infer(
        self, request: pb.ModelInferRequest, deadline: float | None = None, caller: Caller | None = None
    ) -> InferAnswer:
        """Answer one request. ``deadline`` is a ``time.monotonic()`` instant (the client's gRPC
        deadline): a request still waiting when it passes is dropped before compute. A cache hit
        comes back already serialized (bytes), ready for the wire. A request for a routed endpoint
        runs on the variant the traffic policy picks; the response names it."""
        started = time.perf_counter_ns()
        variant = None
        sticky_key = ""
        after_compute: Callable[[dict[str, np.ndarray]], None] | None = None
        try:
            if len(request.model_name) > MAX_MODEL_NAME_CHARS:
                raise NotFoundError(
                    f"model_name: unknown model '{clip(request.model_name)}' (no model or endpoint name is longer "
                    f"than {MAX_MODEL_NAME_CHARS} characters)"
                )
            route = self.router.get(request.model_name)
            if route is None:
                loaded = self._repository.resolve(request.model_name, request.model_version)
            else:
                variant, sticky_key = self._choose(route, request, caller or _NoCaller())
                loaded = self._repository.resolve(variant.model, request.model_version)
                if route.shadows and self.shadows is not None:
                    mirror = self.shadows
                    after_compute = lambda outputs: mirror.maybe_mirror(route, request, outputs)  # noqa: E731
        except WeirError as error:
            self._metrics.request_failure.labels(UNKNOWN_MODEL_LABEL, "", error.kind.value).inc()
            raise
        pending = loaded.metrics.pending_requests
        pending.inc()
        try:
            if loaded.enrichment is not None:
                await self._enrich(loaded, request)
            response = await self._infer_on(loaded, request, deadline, started, variant, after_compute, sticky_key)
        except WeirError as error:
            self._record_failure(loaded, error.kind.value, started)
            raise
        except asyncio.CancelledError:  # the client went away or its deadline passed mid-request
            self._record_failure(loaded, "cancelled", started)
            raise
        finally:
            pending.dec()
        return response

    async def _enrich(self, loaded: LoadedVersion, request: pb.ModelInferRequest) -> None:
        spec = loaded.enrichment
        assert spec is not None
        if self.enricher is None:
            raise FailedPreconditionError(
                f"model '{loaded.name}' takes features from feature service '{spec.service}', but this server "
                "has no feature definitions (--feature-definitions)"
            )
        await self.enricher.enrich(request, spec)

    def _choose(self, route: EndpointRoute, request: pb.ModelInferRequest, caller: Caller) -> tuple[VariantRoute, str]:
        parameters = request.parameters
        pinned = None
        if PIN_PARAMETER in parameters:
            pinned = codec.parameter_value(parameters[PIN_PARAMETER])
            if not caller.may_pin():
                raise PermissionDeniedError(
                    f"parameters['{PIN_PARAMETER}']: pinning a variant needs the deployer role or above"
                )
            pinned = str(pinned)
        key = None
        if route.key_parameter in parameters:
            key = routing_key(codec.parameter_value(parameters[route.key_parameter]))
        elif route.key_header:
            key = caller.header(route.key_header)
        return route.choose(key, pinned), key or ""

    async def _infer_on(
        self,
        loaded: LoadedVersion,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: int,
        variant: VariantRoute | None = None,
        after_compute: Callable[[dict[str, np.ndarray]], None] | None = None,
        sticky_key: str = "",
    ) -> InferAnswer:
        decoded = codec.decode_request(
            request,
            loaded.signature,
            self._max_tensor_elements,
            max_bytes_elements=self._max_bytes_elements,
            bytes_as_text=BYTES_INPUTS_ARE_TEXT,
        )
        cache_key = None
        cache = self._response_cache
        if cache is not None and loaded.response_cache_enabled:
            cache_key = _cache_key(loaded, decoded)
            cached = cache.lookup_local(loaded.cache_namespace, cache_key)
            if cached is None:
                cached = await cache.lookup_shared(loaded.cache_namespace, cache_key)
            if cached is not None:
                return self._answer_from_cache(loaded, request, cached, started, variant)
            loaded.statistics.record_cache_miss(time.perf_counter_ns() - started)
            loaded.metrics.cache_misses.inc()
        decoded_at = time.perf_counter_ns()

        result = await loaded.batcher.infer(
            decoded.inputs,
            decoded.requested_outputs,
            decoded.batch_size,
            decoded.parameters,
            None if deadline is None else int(deadline * 1e9),
        )
        inferred_at = time.perf_counter_ns()
        if after_compute is not None:
            after_compute(result.outputs)  # e.g. shadow mirrors: tasks that start after this answer goes out

        specs = loaded.signature.outputs_by_name
        response = codec.encode_response(
            request.model_name,
            loaded.version_label,
            request.id,
            [(specs[name], result.outputs[name]) for name in decoded.requested_outputs],
        )
        if variant is not None:
            response.parameters[PIN_PARAMETER].string_param = variant.name
        finished = time.perf_counter_ns()
        if cache_key is not None and self._response_cache is not None:
            self._response_cache.store(loaded.cache_namespace, cache_key, _cacheable(response))

        decode_ns, encode_ns = decoded_at - started, finished - inferred_at
        queue_ns, infer_ns = result.queue_ns, result.infer_ns
        loaded.statistics.record_success(finished - started, queue_ns, decode_ns, infer_ns, encode_ns)
        metrics = loaded.metrics
        metrics.request_success.inc()
        metrics.request_duration.observe((finished - started) / 1e9)
        for stage, ns in (("decode", decode_ns), ("queue", queue_ns), ("infer", infer_ns), ("encode", encode_ns)):
            metrics.stage_duration[stage].observe(ns / 1e9)
        metrics.inference_count.inc(decoded.batch_size)
        records = self.records
        if records is not None and loaded.monitoring is not None and records.should_sample(loaded.monitoring.rate):
            records.offer(
                Sample(
                    request.model_name, variant.name if variant is not None else "", loaded.name, loaded.version,
                    request.id, sticky_key, time.time(), (finished - started) / 1e9, loaded.monitoring.batched,
                    decoded.inputs, result.outputs,
                )
            )  # fmt: skip
        return response

    def _answer_from_cache(
        self,
        loaded: LoadedVersion,
        request: pb.ModelInferRequest,
        cached: bytes,
        started: int,
        variant: VariantRoute | None = None,
    ) -> bytes:
        response = codec.with_caller_fields(
            cached, request.model_name, request.id, {PIN_PARAMETER: variant.name} if variant else None
        )
        total_ns = time.perf_counter_ns() - started
        loaded.statistics.record_cache_hit(total_ns)
        metrics = loaded.metrics
        metrics.cache_hits.inc()
        metrics.request_success.inc()
        metrics.request_duration.observe(total_ns / 1e9)
        return response

    def _record_failure(self, loaded: LoadedVersion, reason: str, started: int) -> None:
        loaded.statistics.record_failure(time.perf_counter_ns() - started)
        loaded.metrics.request_failures.inc()
        self._metrics.request_failure.labels(loaded.name, loaded.version_label, reason).inc()


def _cache_key(loaded: LoadedVersion, decoded: codec.DecodedRequest) -> bytes:
    specs = loaded.signature.inputs_by_name
    inputs = {name: (specs[name].datatype.name, array) for name, array in decoded.inputs.items()}
    return response_cache_key(loaded.name, loaded.version_label, inputs, decoded.requested_outputs, decoded.parameters)


def _cacheable(response: pb.ModelInferResponse) -> bytes:
    """The response without the caller's model name, request id and variant: each hit gets its own
    caller's (``codec.with_caller_fields``)."""
    if PIN_PARAMETER in response.parameters:
        copy = pb.ModelInferResponse()
        copy.CopyFrom(response)
        del copy.parameters[PIN_PARAMETER]
        response = copy
    model_name, request_id = response.model_name, response.id
    response.model_name = response.id = ""
    try:
        return response.SerializeToString()
    finally:
        response.model_name, response.id = model_name, request_id
