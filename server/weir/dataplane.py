"""The one place that knows the order of a request's steps:

    resolve model version -> codec.decode -> wait for a model instance -> backend.infer (executor
    thread) -> conform outputs -> codec.encode

Transports (the gRPC servicer) stay thin and call ``DataPlane.infer``. Routing, the response cache
and the dynamic batcher slot in between decode and infer as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor, Future

import numpy as np

from weir import codec
from weir.errors import DeadlineExceededError, InternalError, WeirError
from weir.metrics import UNKNOWN_MODEL_LABEL, Metrics
from weir.model_config import conform_outputs
from weir.repository import LoadedVersion, ModelRepository
from weir_proto.inference import messages as pb

log = logging.getLogger(__name__)


class DataPlane:
    def __init__(
        self, repository: ModelRepository, executor: Executor, metrics: Metrics, max_tensor_elements: int
    ) -> None:
        self._repository = repository
        self._executor = executor
        self._metrics = metrics
        self._max_tensor_elements = max_tensor_elements

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None = None) -> pb.ModelInferResponse:
        """Answer one request. ``deadline`` is a ``time.monotonic()`` instant (the client's gRPC
        deadline): a request still waiting when it passes is dropped before compute."""
        started = time.perf_counter_ns()
        try:
            loaded = self._repository.resolve(request.model_name, request.model_version)
        except WeirError as error:
            self._metrics.request_failure.labels(UNKNOWN_MODEL_LABEL, "", error.kind.value).inc()
            raise
        pending = loaded.metrics.pending_requests
        pending.inc()
        try:
            response = await self._infer_on(loaded, request, deadline, started)
        except WeirError as error:
            self._record_failure(loaded, error.kind.value, started)
            raise
        except asyncio.CancelledError:  # the client went away or its deadline passed mid-request
            self._record_failure(loaded, "cancelled", started)
            raise
        finally:
            pending.dec()
        return response

    async def _infer_on(
        self, loaded: LoadedVersion, request: pb.ModelInferRequest, deadline: float | None, started: int
    ) -> pb.ModelInferResponse:
        decoded = codec.decode_request(request, loaded.signature, self._max_tensor_elements)
        decoded_at = time.perf_counter_ns()

        await self._acquire_instance(loaded, deadline)
        queued_at = time.perf_counter_ns()
        outputs = await self._run_on_instance(loaded, decoded.inputs, decoded.requested_outputs, decoded.batch_size)
        inferred_at = time.perf_counter_ns()

        specs = loaded.signature.outputs_by_name
        response = codec.encode_response(
            request.model_name,
            loaded.version_label,
            request.id,
            [(specs[name], outputs[name]) for name in decoded.requested_outputs],
        )
        finished = time.perf_counter_ns()

        decode_ns, queue_ns = decoded_at - started, queued_at - decoded_at
        infer_ns, encode_ns = inferred_at - queued_at, finished - inferred_at
        loaded.statistics.record_success(
            decoded.batch_size, finished - started, queue_ns, decode_ns, infer_ns, encode_ns
        )
        metrics = loaded.metrics
        metrics.request_success.inc()
        metrics.request_duration.observe((finished - started) / 1e9)
        for stage, ns in (("decode", decode_ns), ("queue", queue_ns), ("infer", infer_ns), ("encode", encode_ns)):
            metrics.stage_duration[stage].observe(ns / 1e9)
        metrics.inference_count.inc(decoded.batch_size)
        metrics.execution_count.inc()
        return response

    async def _acquire_instance(self, loaded: LoadedVersion, deadline: float | None) -> None:
        if deadline is None:
            await loaded.instance_slots.acquire()
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError("deadline exceeded before the request reached the model; it was not computed")
        try:
            await asyncio.wait_for(loaded.instance_slots.acquire(), remaining)
        except TimeoutError:
            raise DeadlineExceededError(
                "deadline exceeded while waiting for a free model instance; the request was not computed"
            ) from None

    async def _run_on_instance(
        self, loaded: LoadedVersion, inputs: dict[str, np.ndarray], output_names: list[str], batch_size: int
    ) -> dict[str, np.ndarray]:
        """Run the backend in an executor thread; the instance slot is released when the *thread*
        finishes, so a caller that goes away cannot let more computations run than instances exist."""
        loop = asyncio.get_running_loop()

        def compute() -> dict[str, np.ndarray]:
            return conform_outputs(loaded.signature, loaded.backend.infer(inputs, output_names), batch_size)

        try:
            future: Future[dict[str, np.ndarray]] = self._executor.submit(compute)
        except BaseException:
            loaded.instance_slots.release()
            raise
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(loaded.instance_slots.release))
        try:
            return await asyncio.wrap_future(future)
        except WeirError:
            raise
        except Exception as error:
            log.exception("model execution failed", extra={"model": loaded.name, "version": loaded.version})
            raise InternalError(
                f"model '{loaded.name}' version {loaded.version} failed: {type(error).__name__}: {error}"
            ) from error

    def _record_failure(self, loaded: LoadedVersion, reason: str, started: int) -> None:
        loaded.statistics.record_failure(time.perf_counter_ns() - started)
        self._metrics.request_failure.labels(loaded.name, loaded.version_label, reason).inc()
