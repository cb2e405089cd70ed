"""The shell around the pure parts: ask the server about the model, start the worker processes, run
each level on all of them at once, scrape the server's metrics around the measured window, and merge.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np

from weir.loadtest import payload, prometheus, schedule, slo, summary
from weir.loadtest.options import BenchOptions
from weir.loadtest.worker import DRAIN_MARGIN_S, MODEL_INFER_METHOD, LevelPlan, WorkerResult, WorkerSetup, worker_main

RPC_TIMEOUT_S = 5.0  # connect and metadata RPCs: a loopback server that is up answers at once
START_DELAY_S = 0.25  # between sending a level's plan and its start: every worker has received it by then
WORKER_START_TIMEOUT_S = 60.0  # spawn, import grpc, connect
SCRAPE_TIMEOUT_S = 5.0


class BenchError(RuntimeError):
    """The server, the model or a worker is not usable; exit status 2."""


@dataclass(frozen=True)
class ModelTarget:
    server: dict[str, Any]  # ServerMetadata: name, version, extensions
    model: dict[str, Any]  # ModelMetadata: name, versions, platform, inputs, outputs
    max_batch_size: int | None  # from ModelConfig; None when the server does not offer it
    specs: list[payload.InputSpec]


def discover(options: BenchOptions) -> ModelTarget:
    """ServerMetadata, ModelMetadata and (if offered) ModelConfig, over a plain synchronous channel."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(options.target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            raise BenchError(f"cannot connect to {options.target} within {RPC_TIMEOUT_S:g}s") from None
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            server = stub.ServerMetadata(service_pb2.ServerMetadataRequest(), timeout=RPC_TIMEOUT_S)
            metadata = stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=options.model, version=options.model_version),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.RpcError as error:
            raise BenchError(f"{options.target}: metadata of model {options.model!r}: {_rpc_text(error)}") from None
        max_batch_size: int | None
        try:
            config = stub.ModelConfig(
                service_pb2.ModelConfigRequest(name=options.model, version=options.model_version),
                timeout=RPC_TIMEOUT_S,
            )
            max_batch_size = int(config.config.max_batch_size)
        except grpc.RpcError:  # a Triton extension: servers such as MLServer do not offer it
            max_batch_size = None
    try:
        specs = payload.specs_from_metadata(metadata.inputs)
    except payload.PayloadError as error:
        raise BenchError(f"model {options.model!r}: {error}") from None

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": item.name, "datatype": item.datatype, "shape": list(item.shape)} for item in items]

    return ModelTarget(
        server={"name": server.name, "version": server.version, "extensions": list(server.extensions)},
        model={
            "name": metadata.name,
            "versions": list(metadata.versions),
            "platform": metadata.platform,
            "inputs": tensors(metadata.inputs),
            "outputs": tensors(metadata.outputs),
        },
        max_batch_size=max_batch_size,
        specs=specs,
    )


def probe(options: BenchOptions, body: bytes) -> None:
    """One request before any load: a model that refuses the request fails the run here, once."""
    import grpc

    with grpc.insecure_channel(options.target) as channel:
        infer = channel.unary_unary(MODEL_INFER_METHOD, request_serializer=None, response_deserializer=None)
        try:
            infer(body, timeout=max(options.timeout_s, RPC_TIMEOUT_S))
        except grpc.RpcError as error:
            raise BenchError(f"model {options.model!r} refused the probe request: {_rpc_text(error)}") from None


def _rpc_text(error: Any) -> str:
    return f"{error.code().name}: {error.details()}" if hasattr(error, "code") else str(error)


def scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:  # loopback only (targets.py)
            return str(response.read().decode("utf-8", errors="replace"))
    except OSError as error:
        raise BenchError(f"--metrics-url {url}: {error}") from None


class WorkerPool:
    """``processes`` spawned workers, each holding one connected channel for the whole run."""

    def __init__(self, setups: list[WorkerSetup]) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: a forked grpc runtime is unusable
        self._connections = []
        self._processes = []
        self._deadline = 0.0
        for setup in setups:
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(child, setup), name=f"weir-bench-{setup.index}")
            process.daemon = True  # never outlives the bench if it dies
            self._connections.append(parent)
            self._processes.append(process)

    def start(self) -> None:
        for process in self._processes:
            process.start()
        for connection in self._connections:
            self._receive(connection, "ready", WORKER_START_TIMEOUT_S)

    def start_level(self, plans: list[LevelPlan], timeout_s: float) -> None:
        """Hand each worker its plan; ``collect`` waits at most ``timeout_s`` from now for the results."""
        self._deadline = time.monotonic() + timeout_s
        for connection, plan in zip(self._connections, plans, strict=True):
            connection.send(plan)

    def collect(self) -> list[WorkerResult]:
        return [
            self._receive(connection, "result", max(0.0, self._deadline - time.monotonic()))
            for connection in self._connections
        ]

    def _receive(self, connection: Any, expected: str, timeout_s: float) -> Any:
        if not connection.poll(timeout_s):
            raise BenchError(f"a worker did not answer within {timeout_s:.0f}s (waiting for {expected})")
        try:
            kind, value = connection.recv()
        except EOFError:
            raise BenchError("a worker process exited unexpectedly") from None
        if kind == "failed":
            raise BenchError(f"a worker failed:\n{value}")
        return value

    def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):  # a worker that already died closed its end
                connection.send(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for connection in self._connections:
            connection.close()


def level_plans(options: BenchOptions, level: float, level_index: int, start_at: float) -> list[LevelPlan]:
    """Each worker's share of a level: closed loops split the concurrency, open loops the rate (with
    constant arrivals interleaved by phase)."""
    count = options.processes
    closed = options.mode == "closed"
    concurrency = schedule.split_evenly(int(level), count) if closed else [0] * count
    return [
        LevelPlan(
            mode=options.mode,
            concurrency=concurrency[index],
            rate=0.0 if closed else level / count,
            phase_s=0.0 if closed else index / level,
            seed=schedule.worker_seed(options.seed, 1 + level_index, index),
            start_at=start_at,
            warmup_s=options.warmup_s,
            duration_s=options.duration_s,
        )
        for index in range(count)
    ]


@dataclass
class LevelOutcome:
    summary: dict[str, Any]  # what results.json records for the level
    latencies_ns: np.ndarray  # merged, for the CDF plot


def run_level(
    options: BenchOptions, pool: WorkerPool, level: float, level_index: int, slos: list[slo.Slo]
) -> LevelOutcome:
    start_at = time.monotonic() + START_DELAY_S
    plans = level_plans(options, level, level_index, start_at)
    window_start = start_at + options.warmup_s
    pool.start_level(plans, _level_timeout(options))
    budget = None
    if options.metrics_url:
        # The server counts a request when it answers; scraping at the window's start splits warm-up
        # from measurement to within one request per in-flight slot.
        time.sleep(max(0.0, window_start - time.monotonic()))
        before = prometheus.latency_totals(scrape(options.metrics_url), options.model, options.model_version)
        results = pool.collect()
        after = prometheus.latency_totals(scrape(options.metrics_url), options.model, options.model_version)
        budget = prometheus.stage_budget(before, after)
    else:
        results = pool.collect()
    latencies = np.concatenate([result.latencies_ns for result in results])
    last = max((result.last_completion for result in results if result.last_completion is not None), default=None)
    elapsed = max(options.duration_s, (last - window_start) if last is not None else 0.0)
    level_summary = summary.level_summary(
        latencies,
        summary.merge_counts([result.errors for result in results]),
        sum(result.dropped for result in results),
        elapsed,
    )
    level_summary = {
        "level": level_name(options, level),
        options.level_key: int(level) if options.mode == "closed" else level,
        **level_summary,
        "error_samples": [sample for result in results for sample in result.error_samples][:5],
        "stage_budget": budget,
    }
    if options.mode != "closed":
        level_summary["schedule_lag_ms_max"] = max(result.schedule_lag_ms_max for result in results)
    outcomes = slo.evaluate(slos, level_summary)
    level_summary["slo"] = [outcome.as_dict() for outcome in outcomes]
    level_summary["slo_passed"] = all(outcome.passed for outcome in outcomes)
    return LevelOutcome(level_summary, latencies)


def _level_timeout(options: BenchOptions) -> float:
    return START_DELAY_S + options.warmup_s + options.duration_s + options.timeout_s + DRAIN_MARGIN_S + 30.0


def level_name(options: BenchOptions, level: float) -> str:
    if options.mode == "closed":
        return f"c={int(level)}"
    return f"{options.mode} {level:g}/s"
