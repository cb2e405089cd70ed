"""Lifecycle of `weir serve` as a real process: SIGTERM drains in-flight work and exits 0, a new
model version swaps in under load without a single failed request, a failed reload keeps the old
version serving."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import start_weir


class SlowScale(torch.nn.Module):
    """Returns x * factor after `iterations` 256x256 matmuls: the caller chooses how long it runs."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.weight = torch.nn.Parameter(torch.eye(256), requires_grad=False)

    def forward(self, x: torch.Tensor, iterations: torch.Tensor) -> torch.Tensor:
        work = self.weight
        for _ in range(int(iterations.max().item())):
            work = torch.tanh(work @ self.weight)
        return x * self.factor + work[0, 0] * 0.0


SLOW_CONFIG = """
name: "slow"
backend: "pytorch"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 1 ] }}, {{ name: "iterations" data_type: TYPE_INT64 dims: [ 1 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ count: {instances} }} ]
"""


def write_slow_version(repository: Path, version: int, factor: float, instances: int = 1) -> None:
    model_dir = repository / "slow"
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(SlowScale(factor)), str(model_dir / str(version) / "model.pt"))
    (model_dir / "config.pbtxt").write_text(SLOW_CONFIG.format(instances=instances))


def slow_inputs(x: float, iterations: int) -> list[triton.InferInput]:
    value = triton.InferInput("x", [1, 1], "FP32")
    value.set_data_from_numpy(np.array([[x]], dtype=np.float32))
    count = triton.InferInput("iterations", [1, 1], "INT64")
    count.set_data_from_numpy(np.array([[iterations]], dtype=np.int64))
    return [value, count]


def wait_until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_sigterm_finishes_in_flight_requests_then_exits_zero(tmp_path: Path) -> None:
    write_slow_version(tmp_path, 1, factor=3.0)
    server = start_weir(tmp_path, "--shutdown-grace-seconds", "30")
    client = triton.InferenceServerClient(server.grpc_url)
    # Calibrate: iterations that keep the model busy for well over the time SIGTERM takes to land.
    started = time.perf_counter()
    client.infer("slow", slow_inputs(1.0, 200))
    iterations = int(200 * max(1.0, 1.5 / max(time.perf_counter() - started, 1e-3)))

    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(lambda: client.infer("slow", slow_inputs(2.0, iterations)).as_numpy("y"))
        metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        import urllib.request

        def is_pending() -> bool:
            text = urllib.request.urlopen(metrics_url).read().decode()
            return 'weir_inference_pending_request_count{model="slow",version="1"} 1.0' in text

        wait_until(is_pending)
        server.process.send_signal(15)
        result = in_flight.result(timeout=60)
    np.testing.assert_allclose(result, [[6.0]])
    assert server.process.wait(timeout=60) == 0
    messages = [record.get("msg") for record in server.log_records()]
    assert "stop requested: draining in-flight requests" in messages
    assert messages[-1] == "server stopped"


def test_new_version_swaps_in_under_load_without_failures(tmp_path: Path) -> None:
    write_slow_version(tmp_path, 1, factor=1.0, instances=2)
    server = start_weir(tmp_path, "--model-control-mode", "explicit", "--load-model", "slow")
    try:
        client = triton.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready("slow", "1")
        stop = threading.Event()
        answers: list[tuple[str, float]] = []
        failures: list[str] = []

        def hammer() -> None:
            own_client = triton.InferenceServerClient(server.grpc_url)
            while not stop.is_set():
                try:
                    result = own_client.infer("slow", slow_inputs(1.0, 20))
                    answers.append((result.get_response().model_version, float(result.as_numpy("y")[0, 0])))
                except InferenceServerException as error:
                    failures.append(str(error))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(answers) >= 20)
        write_slow_version(tmp_path, 2, factor=2.0, instances=2)
        client.load_model("slow")  # the latest-1 policy now selects version 2 only
        count_at_swap = len(answers)
        wait_until(lambda: len(answers) >= count_at_swap + 20)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

        assert failures == []
        assert ("1", 1.0) in answers and ("2", 2.0) in answers
        # Once version 2 answered, version 1 never answers again.
        first_v2 = next(index for index, (version, _) in enumerate(answers) if version == "2")
        assert all(version == "2" for version, _ in answers[first_v2 + 8 :])
        assert all(value == {"1": 1.0, "2": 2.0}[version] for version, value in answers)
        assert not client.is_model_ready("slow", "1")
        assert client.is_model_ready("slow", "2")
    finally:
        assert server.terminate_and_wait() == 0


def test_failed_reload_keeps_the_old_version_serving(tmp_path: Path) -> None:
    write_slow_version(tmp_path, 1, factor=5.0)
    server = start_weir(tmp_path, "--model-control-mode", "explicit", "--load-model", "slow")
    try:
        client = triton.InferenceServerClient(server.grpc_url)
        (tmp_path / "slow" / "config.pbtxt").write_text("name: 'slow' max_batch_size: [ oops")
        with pytest.raises(InferenceServerException) as raised:
            client.load_model("slow")
        assert "cannot parse" in str(raised.value)
        assert raised.value.status() == "StatusCode.FAILED_PRECONDITION"
        result = client.infer("slow", slow_inputs(1.0, 1))
        np.testing.assert_allclose(result.as_numpy("y"), [[5.0]])
        assert client.is_model_ready("slow")
    finally:
        assert server.terminate_and_wait() == 0
