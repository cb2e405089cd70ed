"""A worker process: one grpc.aio channel and one event loop, driving its share of each level.

The request is a pre-serialized ModelInferRequest sent through a generic unary call with no serializer
and no deserializer, so a request costs the client one gRPC call and nothing else: no protobuf work,
no tensor conversion. Responses are not parsed; a failed request is one with a non-OK status.

The parent (runner) talks to the worker over a Pipe: the worker sends ``("ready", None)`` once its
channel is connected, then answers each ``LevelPlan`` with a ``WorkerResult``; ``None`` stops it. Any
failure is sent back as ``("failed", traceback)`` instead.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CONNECT_TIMEOUT_S = 10.0
DRAIN_MARGIN_S = 5.0  # after the last send: the request deadline plus this, then stragglers are cancelled
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
ERROR_SAMPLES = 5


@dataclass(frozen=True)
class WorkerSetup:
    index: int
    target: str
    body: bytes
    timeout_s: float
    max_in_flight: int


@dataclass(frozen=True)
class LevelPlan:
    mode: str  # "closed", "constant" or "poisson"
    concurrency: int  # closed: this worker's in-flight requests
    rate: float  # open: this worker's arrivals per second
    phase_s: float  # constant: offset of this worker's first arrival
    seed: int  # poisson
    start_at: float  # time.monotonic() (system-wide on Linux and macOS) when warm-up begins
    warmup_s: float
    duration_s: float


@dataclass
class WorkerResult:
    """The measured window only: requests scheduled (open) or sent (closed) after the warm-up."""

    index: int
    latencies_ns: np.ndarray
    errors: dict[str, int]
    error_samples: list[str]
    dropped: int
    last_completion: float | None  # time.monotonic() of the last measured request's end
    schedule_lag_ms_max: float  # open loop: how late the client sent its most late request


@dataclass
class _Recorder:
    latencies_ns: array.array[int] = field(default_factory=lambda: array.array("q"))
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    dropped: int = 0
    last_completion_ns: int = 0
    schedule_lag_ns_max: int = 0

    def success(self, began_ns: int, ended_ns: int) -> None:
        self.latencies_ns.append(ended_ns - began_ns)
        self.last_completion_ns = max(self.last_completion_ns, ended_ns)

    def failure(self, error: Any, ended_ns: int) -> None:  # a grpc.aio.AioRpcError
        code = error.code().name
        self.errors[code] += 1
        self.last_completion_ns = max(self.last_completion_ns, ended_ns)
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(f"{code}: {error.details()}")


def worker_main(connection: Connection, setup: WorkerSetup) -> None:
    """Process entry point (spawn context)."""
    try:
        asyncio.run(_serve_commands(connection, setup))
    except BaseException:
        with contextlib.suppress(OSError):  # the parent may be gone already
            connection.send(("failed", traceback.format_exc()))
    finally:
        connection.close()


async def _serve_commands(connection: Connection, setup: WorkerSetup) -> None:
    import grpc

    loop = asyncio.get_running_loop()
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    async with grpc.aio.insecure_channel(setup.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        infer = channel.unary_unary(MODEL_INFER_METHOD, request_serializer=None, response_deserializer=None)
        connection.send(("ready", None))
        while True:
            plan: LevelPlan | None = await loop.run_in_executor(None, connection.recv)
            if plan is None:
                return
            connection.send(("result", await run_level(infer, setup, plan)))


async def run_level(infer: Any, setup: WorkerSetup, plan: LevelPlan) -> WorkerResult:
    # Translate the shared monotonic start into this process's perf_counter clock once.
    start_ns = time.perf_counter_ns() + int((plan.start_at - time.monotonic()) * 1e9)
    measure_ns = start_ns + int(plan.warmup_s * 1e9)
    end_ns = measure_ns + int(plan.duration_s * 1e9)
    recorder = _Recorder()
    delay = (start_ns - time.perf_counter_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
    if plan.mode == "closed":
        await _closed_loop(infer, setup, plan.concurrency, measure_ns, end_ns, recorder)
    else:
        await _open_loop(infer, setup, plan, start_ns, measure_ns, recorder)
    # Back to the monotonic clock for the parent, which compares workers.
    last = None
    if recorder.last_completion_ns:
        last = time.monotonic() - (time.perf_counter_ns() - recorder.last_completion_ns) / 1e9
    return WorkerResult(
        index=setup.index,
        latencies_ns=np.frombuffer(recorder.latencies_ns, dtype=np.int64).copy(),
        errors=dict(recorder.errors),
        error_samples=recorder.error_samples,
        dropped=recorder.dropped,
        last_completion=last,
        schedule_lag_ms_max=recorder.schedule_lag_ns_max / 1e6,
    )


def _scheduled_ns(start_ns: int, offsets: np.ndarray, chunk: int = 65536) -> Iterator[int]:
    """Send times as perf_counter nanoseconds, converted a chunk at a time (a long level at a high rate
    would otherwise hold tens of millions of Python ints)."""
    for first in range(0, offsets.size, chunk):
        yield from (start_ns + (offsets[first : first + chunk] * 1e9).astype(np.int64)).tolist()


async def _closed_loop(
    infer: Any, setup: WorkerSetup, concurrency: int, measure_ns: int, end_ns: int, recorder: _Recorder
) -> None:
    """``concurrency`` users, each sending its next request as soon as the previous one returns."""
    import grpc

    body, timeout = setup.body, setup.timeout_s

    async def user() -> None:
        while True:
            began = time.perf_counter_ns()
            if began >= end_ns:
                return
            try:
                await infer(body, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                if began >= measure_ns:
                    recorder.failure(error, time.perf_counter_ns())
                continue
            if began >= measure_ns:
                recorder.success(began, time.perf_counter_ns())

    await asyncio.gather(*(user() for _ in range(concurrency)))


async def _open_loop(
    infer: Any, setup: WorkerSetup, plan: LevelPlan, start_ns: int, measure_ns: int, recorder: _Recorder
) -> None:
    """Send on schedule whatever the responses do; latency runs from the scheduled time. Arrivals that
    find ``max_in_flight`` requests outstanding are dropped and counted, not queued in the client."""
    import grpc

    from weir.loadtest.schedule import arrival_offsets

    body, timeout = setup.body, setup.timeout_s
    offsets = arrival_offsets(
        plan.mode, plan.rate, plan.warmup_s + plan.duration_s, seed=plan.seed, phase_s=plan.phase_s
    )
    pending: set[asyncio.Task[None]] = set()

    async def send(scheduled: int, measured: bool) -> None:
        try:
            await infer(body, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if measured:
                recorder.failure(error, time.perf_counter_ns())
            return
        if measured:
            recorder.success(scheduled, time.perf_counter_ns())

    loop = asyncio.get_running_loop()
    for scheduled in _scheduled_ns(start_ns, offsets):
        now = time.perf_counter_ns()
        if scheduled > now:
            await asyncio.sleep((scheduled - now) / 1e9)
            now = time.perf_counter_ns()
        measured = scheduled >= measure_ns
        if len(pending) >= setup.max_in_flight:
            if measured:
                recorder.dropped += 1
            continue
        if measured:
            recorder.schedule_lag_ns_max = max(recorder.schedule_lag_ns_max, now - scheduled)
        task = loop.create_task(send(scheduled, measured))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        _, stragglers = await asyncio.wait(set(pending), timeout=timeout + DRAIN_MARGIN_S)
        for task in stragglers:
            task.cancel()
        if stragglers:
            await asyncio.wait(stragglers)
            recorder.errors["CLIENT_CANCELLED"] += len(stragglers)
