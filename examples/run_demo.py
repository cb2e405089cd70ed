"""Weir's main job on embedded defaults: build the demo repository, start `weir serve`, send
requests with the unmodified tritonclient, print the results, stop cleanly with SIGTERM.

    python examples/run_demo.py [--repository build/demo-repository]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_demo_repository


def start_server(repository: Path) -> tuple[subprocess.Popen[str], int]:
    command = [
        sys.executable, "-m", "weir.cli", "serve", "--model-repository", str(repository),
        "--listen-address", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--log-format", "json",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    port: list[int] = []
    ready = threading.Event()

    def follow_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            if '"server started"' in line and not ready.is_set():
                port.append(json.loads(line)["grpc_port"])
                ready.set()
            print(f"  [weir] {line.rstrip()}")

    threading.Thread(target=follow_log, daemon=True).start()
    deadline = time.monotonic() + 120
    while not ready.wait(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("weir serve did not start; see its log above")
    return process, port[0]


def run_requests(url: str) -> None:
    client = triton.InferenceServerClient(url)
    metadata = client.get_server_metadata()
    print(f"\nserver: {metadata.name} {metadata.version}, ready={client.is_server_ready()}")
    for entry in client.get_model_repository_index().models:
        print(f"  model {entry.name} v{entry.version}: {entry.state} {entry.reason}")

    features = np.random.default_rng(0).standard_normal((4, build_demo_repository.FEATURES)).astype(np.float32)
    tensor = triton.InferInput("INPUT__0", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features)
    result = client.infer("mlp_classifier", [tensor], request_id="demo-1")
    logits = result.as_numpy("OUTPUT__0")
    print(f"\nmlp_classifier: 4 rows -> logits {logits.shape}, predicted classes {logits.argmax(axis=1).tolist()}")

    texts = np.array([[b"Weir serves PyTorch models"], [b"over the Open Inference protocol"]], dtype=object)
    text_tensor = triton.InferInput("TEXT", list(texts.shape), "BYTES")
    text_tensor.set_data_from_numpy(texts)
    result = client.infer("text_stats", [text_tensor])
    for text, stats, upper in zip(texts[:, 0], result.as_numpy("STATS"), result.as_numpy("UPPER")[:, 0], strict=True):
        print(f"text_stats: {text.decode()!r}: {int(stats[0])} chars, {int(stats[1])} words -> {upper.decode()!r}")

    statistics = client.get_inference_statistics("mlp_classifier").model_stats[0]
    print(f"\nmlp_classifier statistics: {statistics.inference_count} inferences, "
          f"{statistics.execution_count} executions, success {statistics.inference_stats.success.count}")  # fmt: skip
    client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("build/demo-repository"))
    args = parser.parse_args()
    print(f"building the demo repository in {args.repository} ...")
    build_demo_repository.build(args.repository)
    process, port = start_server(args.repository)
    try:
        run_requests(f"127.0.0.1:{port}")
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
    print(f"\nweir serve stopped on SIGTERM with exit code {exit_code}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
