"""`weir serve --workers N`: N processes share one gRPC port, and SIGTERM drains them all."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

from tests.conftest import start_weir


def started_workers(lines: list[str]) -> dict[int, int]:
    """pid -> metrics port of every worker that logged "server started"."""
    records = [json.loads(line) for line in list(lines) if '"server started"' in line]
    return {record["pid"]: record["metrics_port"] for record in records}


def successes(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    prefix = 'weir_inference_request_success_total{model="mlp_classifier"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_two_workers_share_the_port_and_stop_cleanly(demo_repository: Path) -> None:
    server = start_weir(
        demo_repository, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "mlp_classifier"
    )
    try:
        deadline = time.monotonic() + 60
        while len(started_workers(server.log_lines)) < 2:  # the second worker may still be loading
            assert time.monotonic() < deadline, "\n".join(server.log_lines[-20:])
            time.sleep(0.05)
        workers = started_workers(server.log_lines)
        assert server.process.pid not in workers  # the parent supervises, the children serve

        for _ in range(40):  # a new connection each time: the kernel spreads connections over workers
            client = triton.InferenceServerClient(server.grpc_url)
            tensor = triton.InferInput("INPUT__0", [1, 256], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 256), np.float32))
            assert client.infer("mlp_classifier", [tensor]).as_numpy("OUTPUT__0").shape == (1, 10)
            client.close()
        per_worker = [successes(port) for port in workers.values()]
        assert sum(per_worker) == 40
        assert all(count > 0 for count in per_worker), per_worker

        assert server.terminate_and_wait(timeout=60) == 0
        assert sum('"server stopped"' in line for line in server.log_lines) == 2
    finally:
        if server.process.poll() is None:
            server.process.kill()
