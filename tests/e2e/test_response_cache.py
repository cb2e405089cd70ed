"""The response cache through real `weir serve` processes: hits skip compute and echo the caller's
id, a new version never answers from the old one's entries, replicas share Redis, and a Redis that
dies mid-run costs nothing but hits."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from tests.conftest import WeirProcess, free_port, start_redis_server, start_weir, stop_redis_server

CACHED_CONFIG = """
name: "cached"
backend: "pytorch"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
response_cache { enable: true }
"""


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def write_version(repository: Path, version: int, factor: float) -> None:
    (repository / "cached" / str(version)).mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Scale(factor)), str(repository / "cached" / str(version) / "model.pt"))
    (repository / "cached" / "config.pbtxt").write_text(CACHED_CONFIG)


def infer(client: triton.InferenceServerClient, values: list[float], request_id: str = "") -> triton.InferResult:
    tensor = triton.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.array([values], dtype=np.float32))
    return client.infer("cached", [tensor], request_id=request_id)


def statistics(client: triton.InferenceServerClient) -> tuple[int, int, int]:
    """(cache hits, cache misses, executions) of the latest version."""
    stats = client.get_inference_statistics("cached").model_stats[-1]
    return stats.inference_stats.cache_hit.count, stats.inference_stats.cache_miss.count, stats.execution_count


def metric(server: WeirProcess, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture
def redis_port() -> Iterator[int]:
    port = free_port()
    process = start_redis_server(port)
    try:
        yield port
    finally:
        stop_redis_server(process)


def test_identical_requests_are_answered_from_the_cache_with_their_own_id(tmp_path: Path) -> None:
    write_version(tmp_path, 1, factor=3.0)
    server = start_weir(tmp_path)
    try:
        client = triton.InferenceServerClient(server.grpc_url)
        first = infer(client, [1.0, 2.0], request_id="first")
        second = infer(client, [1.0, 2.0], request_id="second")
        other = infer(client, [5.0, 2.0], request_id="other")
        np.testing.assert_array_equal(first.as_numpy("y"), [[3.0, 6.0]])
        np.testing.assert_array_equal(second.as_numpy("y"), [[3.0, 6.0]])
        np.testing.assert_array_equal(other.as_numpy("y"), [[15.0, 6.0]])
        assert (second.get_response().id, second.get_response().model_version) == ("second", "1")
        assert statistics(client) == (1, 2, 2)  # one hit, two misses, two executions
        assert metric(server, "weir_cache_hits_total") == 1
    finally:
        assert server.terminate_and_wait() == 0


def test_a_new_version_never_answers_from_the_old_versions_entries(tmp_path: Path) -> None:
    write_version(tmp_path, 1, factor=3.0)
    server = start_weir(tmp_path, "--model-control-mode", "explicit", "--load-model", "cached")
    try:
        client = triton.InferenceServerClient(server.grpc_url)
        infer(client, [1.0, 1.0])
        np.testing.assert_array_equal(infer(client, [1.0, 1.0]).as_numpy("y"), [[3.0, 3.0]])  # a hit
        write_version(tmp_path, 2, factor=7.0)
        client.load_model("cached")
        answer = infer(client, [1.0, 1.0])
        assert answer.get_response().model_version == "2"
        np.testing.assert_array_equal(answer.as_numpy("y"), [[7.0, 7.0]])
        assert statistics(client) == (0, 1, 1)  # version 2: a miss, computed
    finally:
        assert server.terminate_and_wait() == 0


def test_the_same_version_reloaded_with_other_files_does_not_answer_from_old_entries(tmp_path: Path) -> None:
    """Triton-style repositories get rewritten in place (and the control plane may put another
    artifact under a version number): the cache namespace follows the files, not the number."""
    write_version(tmp_path, 1, factor=3.0)
    server = start_weir(tmp_path, "--model-control-mode", "explicit", "--load-model", "cached")
    try:
        client = triton.InferenceServerClient(server.grpc_url)
        infer(client, [1.0, 1.0])
        np.testing.assert_array_equal(infer(client, [1.0, 1.0]).as_numpy("y"), [[3.0, 3.0]])  # a hit
        write_version(tmp_path, 1, factor=5.0)
        client.load_model("cached")
        np.testing.assert_array_equal(infer(client, [1.0, 1.0]).as_numpy("y"), [[5.0, 5.0]])
    finally:
        assert server.terminate_and_wait() == 0


def test_replicas_share_answers_through_redis(tmp_path: Path, redis_port: int) -> None:
    write_version(tmp_path, 1, factor=2.0)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    first, second = start_weir(tmp_path, "--redis-url", redis_url), start_weir(tmp_path, "--redis-url", redis_url)
    try:
        computing = triton.InferenceServerClient(first.grpc_url)
        np.testing.assert_array_equal(infer(computing, [4.0, 1.0]).as_numpy("y"), [[8.0, 2.0]])
        reading = triton.InferenceServerClient(second.grpc_url)
        # The first replica writes to Redis in the background: poll (bounded) until the second sees it.
        for _ in range(100):
            answer = infer(reading, [4.0, 1.0])
            if statistics(reading)[0] == 1:
                break
        np.testing.assert_array_equal(answer.as_numpy("y"), [[8.0, 2.0]])
        hits, _, executions = statistics(reading)
        assert hits == 1
        assert metric(second, 'weir_cache_hits_total{tier="redis"}') == 1
        assert executions == statistics(reading)[1]  # every miss computed, the hit did not
    finally:
        assert first.terminate_and_wait() == 0
        assert second.terminate_and_wait() == 0


def test_redis_stopped_mid_run_costs_only_hits(tmp_path: Path) -> None:
    write_version(tmp_path, 1, factor=2.0)
    port = free_port()
    redis_process = start_redis_server(port)
    server = start_weir(tmp_path, "--redis-url", f"redis://127.0.0.1:{port}/0", "--redis-timeout-ms", "50")
    try:
        client = triton.InferenceServerClient(server.grpc_url)
        infer(client, [1.0, 1.0])
        stop_redis_server(redis_process)
        for value in range(20):  # all distinct: each is a local miss that would ask Redis
            np.testing.assert_array_equal(infer(client, [float(value), 0.0]).as_numpy("y"), [[2.0 * value, 0.0]])
        assert metric(server, "weir_cache_redis_errors_total") >= 1
        assert metric(server, "weir_inference_request_failure_total") == 0
        np.testing.assert_array_equal(infer(client, [3.0, 0.0]).as_numpy("y"), [[6.0, 0.0]])  # local tier still hits
        assert statistics(client)[0] == 1
    finally:
        stop_redis_server(redis_process)
        assert server.terminate_and_wait() == 0


def test_failed_requests_are_not_cached(tmp_path: Path) -> None:
    write_version(tmp_path, 1, factor=2.0)
    server = start_weir(tmp_path)
    try:
        client = triton.InferenceServerClient(server.grpc_url)
        bad = triton.InferInput("x", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
        for _ in range(2):
            with pytest.raises(triton.InferenceServerException):
                client.infer("cached", [bad])
        assert statistics(client)[0] == 0
    finally:
        assert server.terminate_and_wait() == 0
