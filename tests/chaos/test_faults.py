"""Faults under load, with real processes: Redis killed and hung (SIGSTOP) while the Redis cache
tier is on; SIGTERM during load (in-flight requests complete, new ones UNAVAILABLE, exit 0) and
SIGKILL during load (a restart serves again); the control plane SIGKILLed while a data plane follows
it (the data plane keeps serving its last state and reattaches when it comes back). Each phase
waits for a number of answers, not for a time; every failure of the load is kept and checked."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.chaos.helpers import (
    PHASE_ANSWERS,
    RPC_TIMEOUT,
    Load,
    channel_options,
    scale_request,
    serves_factor,
    unary,
    wait_until,
)
from tests.conftest import free_port, start_redis_server, start_weir, stop_redis_server
from tests.e2e import test_control_plane as control_plane
from tests.e2e.test_lifecycle import write_slow_version
from tests.e2e.test_response_cache import write_version
from weir_proto.inference import messages as pb

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]


def cached_request() -> pb.ModelInferRequest:
    """A request to the cached model (response_cache on) that misses the local tier: it asks Redis."""
    request = pb.ModelInferRequest(model_name="cached")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.random.default_rng().random((1, 2), np.float32).tobytes())
    return request


def redis_errors(metrics_port: int | None) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("weir_cache_redis_errors_total")
    )


def test_redis_hung_then_killed_under_load_fails_no_request(tmp_path: Path) -> None:
    write_version(tmp_path, 1, factor=2.0)
    port = free_port()
    redis_process = start_redis_server(port)
    server = start_weir(tmp_path, "--redis-url", f"redis://127.0.0.1:{port}/0", "--redis-timeout-ms", "20")
    try:
        with Load(server.grpc_url, cached_request, clients=4) as load:
            load.wait_for(PHASE_ANSWERS)  # Redis healthy
            redis_process.send_signal(signal.SIGSTOP)  # hung: connections open, nothing answers
            load.wait_for(PHASE_ANSWERS)
            hung_errors = redis_errors(server.metrics_port)
            redis_process.send_signal(signal.SIGCONT)
            load.wait_for(PHASE_ANSWERS)  # recovered
            redis_process.send_signal(signal.SIGKILL)  # gone: connections refused
            redis_process.wait(timeout=10)
            load.wait_for(PHASE_ANSWERS)
            redis_process = start_redis_server(port)  # back
            load.wait_for(PHASE_ANSWERS)
        assert load.failures == [], load.failures[:5]
        assert hung_errors >= 1, "the hung Redis was never timed out (was the Redis tier used at all?)"
        assert server.process.poll() is None
    finally:
        with_signal(redis_process, signal.SIGCONT)
        stop_redis_server(redis_process)
        server.terminate_and_wait()


def with_signal(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        process.send_signal(signum)


def slow_request(x: float, iterations: int, model: str = "slow") -> pb.ModelInferRequest:
    """A request to test_lifecycle's slow model: x * factor after ``iterations`` matmuls."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(np.array([[x]], np.float32).tobytes())
    request.inputs.add(name="iterations", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.array([[iterations]], np.int64).tobytes())
    return request


def test_sigterm_under_load_drains_in_flight_and_refuses_new_calls_unavailable(tmp_path: Path) -> None:
    grace = 20.0
    write_slow_version(tmp_path, 1, factor=3.0, instances=2)
    # the requests that must drain go to a copy of the model, so its pending count is theirs alone
    # (the load's requests on "slow" made "one pending" true before both had arrived)
    shutil.copytree(tmp_path / "slow", tmp_path / "drain")
    config = tmp_path / "drain" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "slow"', 'name: "drain"'))
    server = start_weir(tmp_path, "--shutdown-grace-seconds", str(grace))
    with grpc.insecure_channel(server.grpc_url, options=channel_options()) as channel:
        infer = unary(channel, "ModelInfer", pb.ModelInferResponse)

        started = time.perf_counter()
        infer(slow_request(1.0, 100), timeout=RPC_TIMEOUT)
        per_iteration = max(time.perf_counter() - started, 1e-3) / 100
        iterations = int(2.0 / per_iteration)  # about two seconds each: in flight when SIGTERM lands
        with Load(server.grpc_url, lambda: slow_request(1.0, 1), clients=3) as load:
            load.wait_for(PHASE_ANSWERS)
            in_flight = [infer.future(slow_request(2.0, iterations, "drain"), timeout=60) for _ in range(2)]
            wait_until(lambda: pending(server.metrics_port, "drain") >= 2, message="both slow requests to be in flight")
            answered_before = load.answered
            server.process.send_signal(signal.SIGTERM)
            results = [future.result() for future in in_flight]  # they complete
            code = server.process.wait(timeout=grace + 30)
        for result in results:
            np.testing.assert_allclose(np.frombuffer(result.raw_output_contents[0], "<f4"), [6.0])
        assert code == 0
        assert load.answered >= answered_before
        # After SIGTERM every new call is refused UNAVAILABLE, never failed another way; except that
        # when the transport finally closes, gRPC may cancel the one call a connection has on the wire
        # (a closed-loop client has at most one): at most one CANCELLED per client.
        codes = collections.Counter(failure.split(":")[0] for failure in load.failures)
        assert set(codes) <= {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}, load.failures[:5]
        assert codes["StatusCode.CANCELLED"] <= load.clients, codes


def pending(metrics_port: int | None, model: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("weir_inference_pending_request_count") and (not model or f'model="{model}"' in line)
    )


def test_sigkill_under_load_then_a_restart_serves_again(demo_repository: Path) -> None:
    server = start_weir(demo_repository)
    with Load(server.grpc_url, clients=4) as load:
        load.wait_for(PHASE_ANSWERS)
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=30) == -signal.SIGKILL
    assert {failure.split(":")[0] for failure in load.failures} <= {"StatusCode.UNAVAILABLE"}, load.failures[:5]
    restarted = start_weir(demo_repository)
    try:
        with Load(restarted.grpc_url, clients=4) as load:
            load.wait_for(PHASE_ANSWERS)
        assert load.failures == []
    finally:
        assert restarted.terminate_and_wait() == 0


def test_control_plane_sigkilled_while_a_data_plane_follows_it(tmp_path: Path) -> None:
    port = free_port()
    state_dir, database = tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}"
    control = control_plane.start_control(state_dir, database, port)
    config = tmp_path / "config.pbtxt"
    config.write_text(control_plane.CONFIG)
    data_plane = start_weir(
        tmp_path / "replica", "--model-control-mode", "explicit", "--control-plane", control.address,
        "--replica-id", "replica-0", "--heartbeat-seconds", "0.5",
        env={"WEIR_TOKENS": control_plane.TOKENS, "WEIR_CONTROL_PLANE_TOKEN": control_plane.REPLICA_TOKEN},
    )  # fmt: skip
    try:
        control_plane.cli(control, "models", "push", "scale", str(control_plane.scripted(tmp_path, 2.0)),
                          "--config", str(config))  # fmt: skip
        control_plane.cli(control, "deploy", "scale", "scale", "1")
        wait_until(lambda: serves_factor(data_plane.grpc_url, 2.0), 90, "the data plane to serve version 1")
        with Load(data_plane.grpc_url, scale_request, clients=4) as load:
            load.wait_for(PHASE_ANSWERS)
            control.process.send_signal(signal.SIGKILL)
            control.process.wait(timeout=30)
            load.wait_for(PHASE_ANSWERS * 3)  # the control plane is gone: its last state keeps serving
            assert serves_factor(data_plane.grpc_url, 2.0)
            control = control_plane.start_control(state_dir, database, port)
            wait_until(lambda: "replica-0" in control_plane.replica_states(control), 90, "the data plane to reattach")
            control_plane.cli(control, "models", "push", "scale", str(control_plane.scripted(tmp_path, 3.0)),
                              "--config", str(config))  # fmt: skip
            control_plane.cli(control, "deploy", "scale", "scale", "2")
            wait_until(lambda: serves_factor(data_plane.grpc_url, 3.0), 90, "the data plane to follow the next deploy")
            load.wait_for(PHASE_ANSWERS)
        assert load.failures == [], load.failures[:5]
        assert data_plane.process.poll() is None
    finally:
        data_plane.terminate_and_wait()
        if control.process.poll() is None:
            control.process.terminate()
            control.process.wait(timeout=30)
