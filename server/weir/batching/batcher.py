"""The asyncio shell around ``BatchQueue``: one ``DynamicBatcher`` per loaded model version.

Every request goes through it, batching or not, so queue limits, priorities, timeouts and the
client's deadline behave the same for every model. Scheduling runs synchronously on the event loop
whenever something changes (a request arrives, an execution finishes, a timer fires): no scheduler
task, no extra hop. Model compute runs in the executor; an instance is freed when its *thread*
finishes, so a caller that goes away never lets more executions run than instances exist.

Each request's future exists before the request is queued. A cancelled caller's future is simply
skipped when results are handed out; the rest of its batch is unaffected. A batch whose outputs do
not have one row per input row fails with INTERNAL for its own requests only.

One request never fails the others in its batch (the contract of Triton's python_backend: one
response per request, each with its own error). When a batch of several requests fails, its
requests are run again one at a time, in the same thread and on the same instance, and each gets
its own outcome: the request that made the batch fail gets its error, the others their results.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from weir.batching.policy import BatchingConfig, BatchQueue, QueuedRequest
from weir.errors import DeadlineExceededError, InternalError, ResourceExhaustedError, WeirError
from weir.metrics import VersionMetrics
from weir.statistics import VersionStatistics

log = logging.getLogger(__name__)

# Runs one batch: (inputs with the batch dim first, output names, total rows) -> outputs.
RunBatch = Callable[[dict[str, np.ndarray], list[str], int], dict[str, np.ndarray]]

# One request's outcome of an execution: its rows of the outputs, or what failed it.
_Outcome = dict[str, np.ndarray] | BaseException


@dataclass(frozen=True)
class BatchResult:
    outputs: dict[str, np.ndarray]  # this request's rows only (views into the batch's outputs)
    queue_ns: int  # from queued to dispatched
    infer_ns: int  # from dispatched to the batch's results being back on the event loop
    batch_rows: int


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[BatchResult]
    inputs: dict[str, np.ndarray]
    output_names: list[str]


@dataclass(frozen=True)
class _Execution:
    """What one dispatch did, handed from the compute thread back to the event loop."""

    outcomes: list[_Outcome]  # one per request of the batch, in batch order
    executions: list[tuple[int, int]]  # (rows, ns) of each model call that succeeded
    batch_error: BaseException | None  # why the whole batch failed, when it was retried one by one


class DynamicBatcher:
    def __init__(
        self,
        model_label: str,
        config: BatchingConfig,
        instance_count: int,
        executor: Executor,
        run_batch: RunBatch,
        statistics: VersionStatistics,
        metrics: VersionMetrics,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._model_label = model_label
        self._config = config
        self._queue = BatchQueue(config)
        self._instance_count = instance_count
        self._idle_instances = instance_count
        self._executor = executor
        self._run_batch = run_batch
        self._statistics = statistics
        self._metrics = metrics
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_ns: int | None = None
        self._executing_requests = 0  # dispatched, results not yet handed out

    def shape_key(self, inputs: dict[str, np.ndarray]) -> Hashable:
        """Requests share an execution only when every input agrees beyond the batch dimension."""
        if not self._config.batching:
            return object()  # never equal to another request's key
        return tuple(sorted((name, array.shape[1:], array.dtype.str) for name, array in inputs.items()))

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        output_names: list[str],
        rows: int,
        parameters: dict[str, object],
        deadline_ns: int | None,
    ) -> BatchResult:
        config = self._config
        level = config.priority_level(parameters.get("priority"))
        now = self._clock()
        timeout_ns = config.queue_timeout_ns(level, parameters.get("timeout"))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchResult] = loop.create_future()  # exists before the request is queued
        request = QueuedRequest(
            rows=rows,
            shape_key=self.shape_key(inputs),
            priority=level,
            enqueued_ns=now,
            deadline_ns=deadline_ns,
            timeout_ns=now + timeout_ns if timeout_ns else None,
            payload=_Pending(future, inputs, output_names),
        )
        if not self._queue.admit(request, self._executing_requests):
            self._metrics.rejected.inc()
            limit = config.queue_policies[level - 1].max_queue_size
            raise ResourceExhaustedError(
                f"model {self._model_label}: queue for priority level {level} is full "
                f"(max_queue_size {limit}); try again later"
            )
        self._metrics.queue_depth.inc()
        future.add_done_callback(lambda done: self._forget_if_cancelled(done, request))
        self._schedule()
        return await future

    def _forget_if_cancelled(self, future: asyncio.Future[BatchResult], request: QueuedRequest) -> None:
        if future.cancelled():
            before = len(self._queue)
            self._queue.discard(request)
            if len(self._queue) < before:
                self._metrics.queue_depth.dec()

    # --- scheduling -----------------------------------------------------------------------------

    def _schedule(self) -> None:
        queue = self._queue
        while True:
            if not queue:  # nothing waits: only a stale timer may need cancelling
                if self._timer is not None:
                    self._arm_timer(None)
                return
            busy = self._instance_count - self._idle_instances
            decision = queue.next_batch(self._clock(), self._idle_instances, busy)
            for request in decision.expired:
                self._expire(request)
            if decision.batch:
                self._dispatch(decision.batch)
                continue
            self._arm_timer(decision.wake_at_ns)
            return

    def _arm_timer(self, wake_at_ns: int | None) -> None:
        if wake_at_ns == self._timer_at_ns:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at_ns = None
        if wake_at_ns is not None:
            delay = max(0.0, (wake_at_ns - self._clock()) / 1e9)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
            self._timer_at_ns = wake_at_ns

    def _on_timer(self) -> None:
        self._timer = self._timer_at_ns = None
        self._schedule()

    def _expire(self, request: QueuedRequest) -> None:
        self._metrics.queue_depth.dec()
        self._metrics.expired.inc()
        pending = request.payload
        assert isinstance(pending, _Pending)
        if not pending.future.done():
            waited_ms = (self._clock() - request.enqueued_ns) / 1e6
            pending.future.set_exception(
                DeadlineExceededError(
                    f"model {self._model_label}: the request's deadline or queue timeout passed after "
                    f"{waited_ms:.1f} ms in the queue; it was not computed"
                )
            )

    def _dispatch(self, batch: list[QueuedRequest]) -> None:
        self._metrics.queue_depth.dec(len(batch))
        live = [request for request in batch if not _pending(request).future.done()]
        if not live:
            return
        dispatched_ns = self._clock()
        rows = sum(request.rows for request in live)
        self._idle_instances -= 1
        self._executing_requests += len(live)
        loop = asyncio.get_running_loop()
        try:
            execution: Future[_Execution] = self._executor.submit(
                self._execute, [(_pending(request), request.rows) for request in live]
            )
        except RuntimeError as error:  # the executor is shut down: the server is stopping
            self._idle_instances += 1
            self._executing_requests -= len(live)
            for request in live:
                _pending(request).future.set_exception(InternalError(f"server is shutting down: {error}"))
            return
        execution.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._complete, live, rows, dispatched_ns, done)
        )

    def _execute(self, batch: list[tuple[_Pending, int]]) -> _Execution:
        """Runs in the compute thread: the batch as one model call, or, if that fails and the batch
        holds several requests, each request alone."""
        rows = sum(request_rows for _, request_rows in batch)
        started_ns = self._clock()
        try:
            outputs = self._run_batch(
                _concatenate([pending.inputs for pending, _ in batch]),
                _union([pending.output_names for pending, _ in batch]),
                rows,
            )
        except Exception as error:
            if len(batch) == 1:
                return _Execution([error], [], None)
            batch_error = error
        else:
            if len(batch) == 1:  # whole: a model that does not batch has no batch dimension to split
                mine = {name: outputs[name] for name in batch[0][0].output_names}
                return _Execution([mine], [(rows, self._clock() - started_ns)], None)
            outcomes: list[_Outcome] = []
            offset = 0
            for pending, request_rows in batch:  # views of the batch's outputs: no copies
                outcomes.append({name: outputs[name][offset : offset + request_rows] for name in pending.output_names})
                offset += request_rows
            return _Execution(outcomes, [(rows, self._clock() - started_ns)], None)
        outcomes = []
        executions: list[tuple[int, int]] = []
        for pending, request_rows in batch:
            # Read from this thread, done() may be stale; at worst a request whose caller just left
            # is computed for nothing (its outcome is skipped on the event loop).
            if pending.future.done():
                outcomes.append(batch_error)
                continue
            started_ns = self._clock()
            try:
                outcomes.append(self._run_batch(pending.inputs, pending.output_names, request_rows))
                executions.append((request_rows, self._clock() - started_ns))
            except Exception as error:
                outcomes.append(error)
        return _Execution(outcomes, executions, batch_error)

    def _complete(
        self, batch: list[QueuedRequest], rows: int, dispatched_ns: int, execution: Future[_Execution]
    ) -> None:
        self._idle_instances += 1
        self._executing_requests -= len(batch)
        completed_ns = self._clock()
        infer_ns = completed_ns - dispatched_ns
        try:
            done = execution.result()
        except Exception as error:  # _execute catches the model's errors: this is Weir's own bug
            done = _Execution([error] * len(batch), [], None)
        if done.batch_error is not None:
            log.warning(
                "a batch of %d requests failed; each was run alone so that only the one at fault fails: %s: %s",
                len(batch), type(done.batch_error).__name__, done.batch_error,
                extra={"model": self._model_label},
            )  # fmt: skip
        for executed_rows, executed_ns in done.executions:
            self._statistics.record_execution(executed_rows, 0, executed_ns, 0)
            self._metrics.execution_count.inc()
            self._metrics.batch_rows.observe(executed_rows)
        for request, outcome in zip(batch, done.outcomes, strict=True):
            pending = _pending(request)
            if pending.future.done():  # a cancelled caller is skipped, the others still get theirs
                continue
            if isinstance(outcome, WeirError):
                pending.future.set_exception(outcome)
            elif isinstance(outcome, BaseException):
                pending.future.set_exception(self._internal_error(outcome))
            else:
                pending.future.set_result(BatchResult(outcome, dispatched_ns - request.enqueued_ns, infer_ns, rows))
        self._schedule()

    def _internal_error(self, error: BaseException) -> InternalError:
        log.error("model execution failed", exc_info=error, extra={"model": self._model_label})
        return InternalError(f"model {self._model_label} failed: {type(error).__name__}: {error}")


def _pending(request: QueuedRequest) -> _Pending:
    pending = request.payload
    assert isinstance(pending, _Pending)
    return pending


def _concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]  # a batch of one: no copy
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _union(name_lists: list[list[str]]) -> list[str]:
    if len(name_lists) == 1:
        return name_lists[0]
    return list(dict.fromkeys(name for names in name_lists for name in names))
