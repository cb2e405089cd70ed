"""End to end: the dynamic batcher of a real server (``WeirServer`` in this process, real gRPC, Triton's
asyncio client), with small TorchScript models written into a fresh repository per test.

Most tests need the model's only instance to stay busy while they line requests up behind it. Rather
than guessing compute times on a shared 2-core machine, a ``Gate`` holds the model's executions until
the test lets them through: the model still runs for real (and its outputs are still checked against
the config), the test just decides *when*. Every wait on server state is bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from tritonclient.grpc import service_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from tests.conftest import inprocess_settings, write_torchscript_model
from weir.server import WeirServer

pytestmark = pytest.mark.timeout(120)

RPC_TIMEOUT = 30.0  # seconds; every call carries a deadline so a hung server fails the test, not the run
WAIT_TIMEOUT = 15.0  # for server state the test waits on
GATE_TIMEOUT = 30.0  # an execution held by a gate fails after this instead of hanging the server


# --- models --------------------------------------------------------------------------------------


class SlowScale(nn.Module):
    """y = x * factor, after a few ms of matmuls: batching pays off, as for a real model."""

    def __init__(self, factor: float, iterations: int = 0) -> None:
        super().__init__()
        self.factor = factor
        self.iterations = iterations
        self.weight = nn.Parameter(torch.eye(64), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work: torch.Tensor = self.weight
        for _ in range(self.iterations):
            work = torch.tanh(work @ self.weight)
        return x * self.factor + work[0, 0] * 0.0


class FirstRowOnly(nn.Module):
    """A broken model: given any non-zero value it returns one row whatever the batch (right only for a
    batch of one). The warm-up's zeros, at batch sizes 1, 2 and 8, load it; one row for any batch would
    fail the warm-up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0.0).any()):
            return x[:1] * 2.0
        return x * 2.0


class ShortWhenPositive(nn.Module):
    """A broken model: one row short whenever its first value is positive, whatever the batch (the
    warm-up's zeros load it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x[0, 0] > 0.0):
            return x[1:] * 2.0
        return x * 2.0


class RefusesLargeValues(nn.Module):
    """y = 2x, but the model raises on any value over 100: one row can fail a whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 100.0).any()):
            raise RuntimeError("value over 100")
        return x * 2.0


def model_config(name: str, dynamic: str | None = "", max_batch_size: int = 8, dims: str = "1") -> str:
    batching = "" if dynamic is None else f"dynamic_batching {{ {dynamic} }}"
    return f"""
name: "{name}"
backend: "pytorch"
max_batch_size: {max_batch_size}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
{batching}
"""


def add_model(repository: Path, name: str, module: nn.Module, **config: object) -> None:
    write_torchscript_model(repository, name, module, model_config(name, **config))  # type: ignore[arg-type]


# --- the running server --------------------------------------------------------------------------


class Gate:
    """Holds every execution of one loaded model version until the test releases it.

    Wraps the version's backend in place, so the whole request path (codec, batcher, the output
    check against the config) runs as usual. ``batches`` records each execution's input ``x``."""

    def __init__(self, server: WeirServer, model: str) -> None:
        backend = server.repository.resolve(model, "").backend
        original = backend.infer
        self._permits = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._open = False
        self.batches: list[np.ndarray] = []

        def gated(inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
            with self._lock:
                self.batches.append(np.array(inputs["x"]))
                must_wait = not self._open
            if must_wait and not self._permits.acquire(timeout=GATE_TIMEOUT):
                raise RuntimeError("test gate was never released")
            return original(inputs, output_names)

        backend.infer = gated  # type: ignore[method-assign]

    @property
    def arrived(self) -> int:
        with self._lock:
            return len(self.batches)

    def release(self, executions: int = 1) -> None:
        self._permits.release(executions)

    def open(self) -> None:
        with self._lock:
            self._open = True
            waiting = len(self.batches)
        self._permits.release(waiting)  # more than needed is harmless: nobody waits once open


@dataclass
class Served:
    server: WeirServer
    client: InferenceServerClient
    gates: list[Gate] = field(default_factory=list)

    def gate(self, model: str) -> Gate:
        gate = Gate(self.server, model)
        self.gates.append(gate)
        return gate

    def metric(self, name: str, model: str, **labels: str) -> float:
        value = self.server.registry.get_sample_value(name, {"model": model, "version": "1", **labels})
        return 0.0 if value is None else value

    async def infer(self, model: str, x: np.ndarray, **options: object) -> np.ndarray:
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x.astype(np.float32))
        options.setdefault("client_timeout", RPC_TIMEOUT)
        result = await self.client.infer(model, [tensor], **options)
        return result.as_numpy("y")

    async def statistics(self, model: str) -> service_pb2.ModelStatistics:
        response = await self.client.get_inference_statistics(model, "1", client_timeout=RPC_TIMEOUT)
        return response.model_stats[0]


@asynccontextmanager
async def serving(repository: Path) -> AsyncIterator[Served]:
    server = WeirServer(inprocess_settings(repository))
    await server.start()
    client = InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    served = Served(server, client)
    try:
        assert await client.is_server_ready(client_timeout=RPC_TIMEOUT)
        yield served
    finally:
        for gate in served.gates:
            gate.open()  # a failed test must not leave an execution blocked while the server stops
        await client.close()
        await server.stop(grace_seconds=1)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)


def row(value: float) -> np.ndarray:
    return np.array([[value]], dtype=np.float32)


async def hold_the_only_instance(served: Served, model: str, gate: Gate) -> asyncio.Task[np.ndarray]:
    """Start one request whose execution the gate holds: the model's only instance is busy."""
    busy = asyncio.create_task(served.infer(model, row(-1.0)))
    await eventually(lambda: gate.arrived == 1, "the first request to reach the model")
    return busy


async def queued(served: Served, model: str, depth: int) -> None:
    await eventually(lambda: served.metric("weir_queue_depth", model) == depth, f"{depth} requests queued")


# --- (a) concurrent requests are batched, and every caller gets its own rows ---------------------


async def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(tmp_path: Path) -> None:
    add_model(
        tmp_path,
        "scale",
        SlowScale(3.0, iterations=40),
        max_batch_size=16,
        dynamic="max_queue_delay_microseconds: 20000",
    )
    # 32 callers, each with distinct values; every 4th sends 3 rows.
    inputs = [
        np.array([[index + 0.25 * part] for part in range(3)] if index % 4 == 3 else [[float(index)]], np.float32)
        for index in range(32)
    ]
    total_rows = sum(len(x) for x in inputs)

    async with serving(tmp_path) as served:
        results = await asyncio.gather(*(served.infer("scale", x) for x in inputs))

        for x, y in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(y, x * 3.0)
        stats = await served.statistics("scale")
        assert stats.inference_count == total_rows
        assert 0 < stats.execution_count < len(inputs), "requests shared executions"
        assert stats.inference_stats.success.count == len(inputs)
        assert max(batch.batch_size for batch in stats.batch_stats) > 3  # more than one request's rows
        assert sum(batch.compute_infer.count for batch in stats.batch_stats) == stats.execution_count

        url = f"http://127.0.0.1:{served.server.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=RPC_TIMEOUT).read().decode())
    samples = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(text)
        if family.name in ("weir_batch_size", "weir_inference_exec_count", "weir_inference_count")
        for sample in family.samples
        if sample.labels.get("model") == "scale"
    }
    assert samples[("weir_inference_exec_count_total", None)] == stats.execution_count
    assert samples[("weir_inference_count_total", None)] == total_rows
    assert samples[("weir_batch_size_count", None)] == stats.execution_count
    assert samples[("weir_batch_size_sum", None)] == total_rows
    assert samples[("weir_batch_size_bucket", "1.0")] < stats.execution_count, "some executions had > 1 row"


# --- (b) a lone request is not held for max_queue_delay -------------------------------------------

LONG_DELAY = "max_queue_delay_microseconds: 2000000"  # 2 s
IDLE_SECONDS = 2.2  # longer than the delay: no one could expect another request within it


async def test_a_lone_request_is_not_held_for_the_queue_delay(tmp_path: Path) -> None:
    add_model(tmp_path, "patient", SlowScale(2.0), dynamic=LONG_DELAY)
    async with serving(tmp_path) as served:
        assert await served.client.is_model_ready("patient", client_timeout=RPC_TIMEOUT)
        await asyncio.sleep(0.2)  # idle
        started = time.monotonic()
        y = await served.infer("patient", row(21.0))
        elapsed = time.monotonic() - started
    np.testing.assert_array_equal(y, row(42.0))
    assert elapsed < 1.0, f"a lone request waited {elapsed:.2f} s with nothing else to batch with"


async def test_a_lone_request_after_an_idle_period_is_not_held_for_the_queue_delay(tmp_path: Path) -> None:
    add_model(tmp_path, "patient", SlowScale(2.0), dynamic=LONG_DELAY)
    async with serving(tmp_path) as served:
        # Some earlier traffic: two requests at once (the second one's caller gives up quickly).
        await asyncio.gather(
            served.infer("patient", row(1.0)),
            served.infer("patient", row(2.0), client_timeout=0.2),
            return_exceptions=True,
        )
        await asyncio.sleep(IDLE_SECONDS)
        started = time.monotonic()
        y = await served.infer("patient", row(21.0))
        elapsed = time.monotonic() - started
    np.testing.assert_array_equal(y, row(42.0))
    assert elapsed < 1.0, f"a lone request after {IDLE_SECONDS} s of silence waited {elapsed:.2f} s"


# --- (c) queue full ------------------------------------------------------------------------------


async def test_a_full_queue_refuses_at_once_and_the_server_keeps_serving(tmp_path: Path) -> None:
    add_model(tmp_path, "bounded", SlowScale(2.0), dynamic="default_queue_policy { max_queue_size: 2 }")
    async with serving(tmp_path) as served:
        gate = served.gate("bounded")
        busy = await hold_the_only_instance(served, "bounded", gate)
        waiting = [asyncio.create_task(served.infer("bounded", row(value))) for value in (1.0, 2.0)]
        await queued(served, "bounded", 2)

        with pytest.raises(InferenceServerException) as raised:
            await served.infer("bounded", row(3.0))
        assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "max_queue_size 2" in raised.value.message()
        assert not busy.done() and gate.arrived == 1  # refused without waiting for room
        assert served.metric("weir_queue_rejected_total", "bounded") == 1

        gate.open()
        np.testing.assert_array_equal(await busy, row(-2.0))
        assert [y.tolist() for y in await asyncio.gather(*waiting)] == [[[2.0]], [[4.0]]]
        np.testing.assert_array_equal(await served.infer("bounded", row(5.0)), row(10.0))
        assert served.metric("weir_queue_rejected_total", "bounded") == 1


# --- (d) queue timeouts ------------------------------------------------------------------------


async def test_a_queue_timeout_with_reject_answers_deadline_exceeded_without_computing(tmp_path: Path) -> None:
    add_model(
        tmp_path,
        "impatient",
        SlowScale(2.0),
        dynamic="default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 100000 }",  # 100 ms
    )
    async with serving(tmp_path) as served:
        gate = served.gate("impatient")
        busy = await hold_the_only_instance(served, "impatient", gate)

        with pytest.raises(InferenceServerException) as raised:
            await served.infer("impatient", row(1.0))
        assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "queue timeout" in raised.value.message() and "not computed" in raised.value.message()
        assert not busy.done()  # it timed out in the queue, behind the busy instance
        assert served.metric("weir_queue_expired_total", "impatient") == 1

        gate.open()
        np.testing.assert_array_equal(await busy, row(-2.0))
        stats = await served.statistics("impatient")
        assert stats.execution_count == 1 and gate.arrived == 1  # the expired request never ran
        assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (1, 1)


async def test_a_request_timeout_parameter_shortens_the_queue_timeout(tmp_path: Path) -> None:
    add_model(
        tmp_path,
        "override",
        SlowScale(2.0),
        dynamic="default_queue_policy { default_timeout_microseconds: 10000000 allow_timeout_override: true }",
    )
    async with serving(tmp_path) as served:
        gate = served.gate("override")
        busy = await hold_the_only_instance(served, "override", gate)
        patient = asyncio.create_task(served.infer("override", row(1.0)))  # default: 10 s

        started = time.monotonic()
        with pytest.raises(InferenceServerException) as raised:
            await served.infer("override", row(2.0), timeout=100_000)  # 100 ms
        assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 5.0  # its own 100 ms, not the model's 10 s
        assert not busy.done() and not patient.done()

        gate.open()
        np.testing.assert_array_equal(await busy, row(-2.0))
        np.testing.assert_array_equal(await patient, row(2.0))
        assert served.metric("weir_queue_expired_total", "override") == 1


# --- (e) priority --------------------------------------------------------------------------------


async def test_a_higher_priority_request_runs_before_an_earlier_lower_priority_one(tmp_path: Path) -> None:
    add_model(
        tmp_path,
        "ranked",
        SlowScale(2.0),
        max_batch_size=1,  # one request per execution: the order of executions is the order of service
        dynamic="priority_levels: 2 default_priority_level: 2",
    )
    async with serving(tmp_path) as served:
        gate = served.gate("ranked")
        completed: list[str] = []

        def track(name: str, task: asyncio.Task[np.ndarray]) -> asyncio.Task[np.ndarray]:
            task.add_done_callback(lambda _: completed.append(name))
            return task

        busy = track("busy", await hold_the_only_instance(served, "ranked", gate))
        low = track("low", asyncio.create_task(served.infer("ranked", row(1.0), priority=2)))
        await queued(served, "ranked", 1)
        high = track("high", asyncio.create_task(served.infer("ranked", row(2.0), priority=1)))
        await queued(served, "ranked", 2)

        gate.open()
        results = await asyncio.gather(busy, low, high)
    assert [y.tolist() for y in results] == [[[-2.0]], [[2.0]], [[4.0]]]
    assert completed == ["busy", "high", "low"]
    assert [batch.tolist() for batch in gate.batches] == [[[-1.0]], [[2.0]], [[1.0]]]


async def test_an_invalid_priority_is_refused_naming_the_parameter(tmp_path: Path) -> None:
    add_model(tmp_path, "ranked", SlowScale(2.0), dynamic="priority_levels: 2")
    async with serving(tmp_path) as served:
        with pytest.raises(InferenceServerException) as raised:
            await served.infer("ranked", row(1.0), priority=3)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "parameters['priority']" in raised.value.message()
        np.testing.assert_array_equal(await served.infer("ranked", row(1.0), priority=1), row(2.0))


# --- (f) callers that go away ----------------------------------------------------------------------


async def test_a_caller_cancelled_during_its_batch_does_not_disturb_the_others(tmp_path: Path) -> None:
    add_model(tmp_path, "shared", SlowScale(3.0))
    async with serving(tmp_path) as served:
        gate = served.gate("shared")
        busy = await hold_the_only_instance(served, "shared", gate)
        callers = [asyncio.create_task(served.infer("shared", row(value))) for value in (1.0, 2.0, 3.0, 4.0)]
        await queued(served, "shared", 4)

        gate.release()  # the busy request finishes; the four queued ones run as one batch, held by the gate
        await eventually(lambda: gate.arrived == 2, "the batch of four to reach the model")
        assert gate.batches[1].tolist() == [[1.0], [2.0], [3.0], [4.0]]
        callers[1].cancel()
        await eventually(
            lambda: served.metric("weir_inference_request_failure_total", "shared", reason="cancelled") == 1,
            "the server to see the cancellation",
        )

        gate.open()
        np.testing.assert_array_equal(await busy, row(-3.0))
        kept = await asyncio.gather(callers[0], callers[2], callers[3])
        assert [y.tolist() for y in kept] == [[[3.0]], [[9.0]], [[12.0]]]
        with pytest.raises(asyncio.CancelledError):
            await callers[1]
        np.testing.assert_array_equal(await served.infer("shared", row(5.0)), row(15.0))
        await eventually(
            lambda: served.metric("weir_inference_pending_request_count", "shared") == 0, "nothing pending"
        )
        assert served.metric("weir_queue_depth", "shared") == 0


async def test_a_caller_whose_deadline_passes_in_the_queue_is_left_out_of_the_batch(tmp_path: Path) -> None:
    add_model(tmp_path, "shared", SlowScale(3.0))
    async with serving(tmp_path) as served:
        gate = served.gate("shared")
        busy = await hold_the_only_instance(served, "shared", gate)
        first = asyncio.create_task(served.infer("shared", row(1.0)))
        await queued(served, "shared", 1)
        hasty = asyncio.create_task(served.infer("shared", row(2.0), client_timeout=0.3))
        await queued(served, "shared", 2)
        last = asyncio.create_task(served.infer("shared", row(3.0)))
        await queued(served, "shared", 3)

        with pytest.raises(InferenceServerException) as raised:
            await hasty
        assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        await queued(served, "shared", 2)

        gate.open()
        np.testing.assert_array_equal(await busy, row(-3.0))
        assert [y.tolist() for y in await asyncio.gather(first, last)] == [[[3.0]], [[9.0]]]
        assert [batch.tolist() for batch in gate.batches] == [[[-1.0]], [[1.0], [3.0]]]  # 2.0 never ran
        np.testing.assert_array_equal(await served.infer("shared", row(5.0)), row(15.0))


# --- (g) shapes beyond the batch dimension ---------------------------------------------------------


async def test_requests_of_different_lengths_are_never_concatenated(tmp_path: Path) -> None:
    add_model(tmp_path, "ragged", SlowScale(2.0), dims="-1")
    async with serving(tmp_path) as served:
        gate = served.gate("ragged")
        busy = await hold_the_only_instance(served, "ragged", gate)
        inputs = [np.arange(length, dtype=np.float32)[None, :] + index for index, length in enumerate([3, 5] * 3)]
        callers = [asyncio.create_task(served.infer("ragged", x)) for x in inputs]
        await queued(served, "ragged", len(inputs))

        gate.open()
        np.testing.assert_array_equal(await busy, row(-2.0))
        for x, y in zip(inputs, await asyncio.gather(*callers), strict=True):
            np.testing.assert_array_equal(y, x * 2.0)
    # Same-length requests shared an execution, the two lengths never did.
    assert [batch.shape for batch in gate.batches] == [(1, 1), (3, 3), (3, 5)]


# --- (h) a batch that fails: only the requests at fault fail (issue 14, finding 1) ------------------


async def test_a_failing_batch_is_run_request_by_request_so_only_the_one_at_fault_fails(tmp_path: Path) -> None:
    """Triton's contract: one response per request, each with its own error. Without it, one
    request with a value the model refuses failed every request batched with it."""
    add_model(tmp_path, "picky", RefusesLargeValues())
    async with serving(tmp_path) as served:
        gate = served.gate("picky")
        busy = await hold_the_only_instance(served, "picky", gate)
        batched = [asyncio.create_task(served.infer("picky", row(value))) for value in (1.0, 500.0, 3.0)]
        await queued(served, "picky", 3)

        gate.open()
        np.testing.assert_array_equal(await busy, row(-2.0))
        good_one, bad, good_three = await asyncio.gather(*batched, return_exceptions=True)
        np.testing.assert_array_equal(good_one, row(2.0))
        np.testing.assert_array_equal(good_three, row(6.0))
        assert isinstance(bad, InferenceServerException), bad
        assert bad.status() == "StatusCode.INTERNAL" and "value over 100" in bad.message(), bad.message()
        # The batch ran once together, then each of its requests alone.
        assert [batch.tolist() for batch in gate.batches[1:]] == [[[1.0], [500.0], [3.0]], [[1.0]], [[500.0]], [[3.0]]]
        stats = await served.statistics("picky")
        assert stats.inference_stats.success.count == 3 and stats.inference_stats.fail.count == 1
        assert stats.execution_count == 3  # the busy one and the two that succeeded alone
        assert served.metric("weir_inference_request_failure_total", "picky", reason="internal") == 1


# --- (i) a backend that returns the wrong number of rows ------------------------------------------


async def test_wrong_output_rows_fail_only_their_requests_and_other_models_keep_serving(tmp_path: Path) -> None:
    add_model(tmp_path, "short", ShortWhenPositive())
    add_model(tmp_path, "first_row_only", FirstRowOnly())
    add_model(tmp_path, "healthy", SlowScale(3.0))
    async with serving(tmp_path) as served:
        gate = served.gate("short")
        busy = await hold_the_only_instance(served, "short", gate)
        batched = [asyncio.create_task(served.infer("short", row(value))) for value in (1.0, 2.0, 3.0)]
        await queued(served, "short", 3)

        gate.open()
        np.testing.assert_array_equal(await busy, row(-2.0))
        outcomes = await asyncio.gather(*batched, return_exceptions=True)
        assert gate.batches[1].tolist() == [[1.0], [2.0], [3.0]]
        for outcome in outcomes:  # wrong alone as well as together: each request gets its own error
            assert isinstance(outcome, InferenceServerException), outcome
            assert outcome.status() == "StatusCode.INTERNAL"
            message = outcome.message()
            assert "output 'y'" in message and "[1, 1]" in message and "[0, 1]" in message, message
        np.testing.assert_array_equal(await served.infer("healthy", row(4.0)), row(12.0))
        assert served.metric("weir_inference_request_failure_total", "short", reason="internal") == 3

        # Right for one request, wrong for a batch: the batch fails, each request alone succeeds.
        gate = served.gate("first_row_only")
        busy = await hold_the_only_instance(served, "first_row_only", gate)
        batched = [asyncio.create_task(served.infer("first_row_only", row(value))) for value in (1.0, 2.0, 3.0)]
        await queued(served, "first_row_only", 3)
        gate.open()
        np.testing.assert_array_equal(await busy, row(-2.0))
        assert [y.tolist() for y in await asyncio.gather(*batched)] == [[[2.0]], [[4.0]], [[6.0]]]
        assert gate.batches[1].tolist() == [[1.0], [2.0], [3.0]]


# --- (j) a model that does not batch gets its outputs whole -----------------------------------------


async def test_a_model_without_batching_answers_its_whole_output(tmp_path: Path) -> None:
    """The batcher once sliced every output to the request's rows, and a model without batching
    counts as one row: an output of shape [3] came back as its first element."""
    add_model(tmp_path, "whole", SlowScale(2.0), dynamic=None, max_batch_size=0, dims="-1")
    async with serving(tmp_path) as served:
        x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
        np.testing.assert_array_equal(await served.infer("whole", x), x * 2.0)
