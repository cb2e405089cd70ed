"""Weir's main job on embedded defaults: `weir up` (a control plane and a data plane following it,
SQLite and a local artifact store, generated tokens), then the release flow a team runs:

1. build the demo models locally (nothing is downloaded);
2. push them to the registry with `weir models push` (progress bar, sha256 checked), alias `champion`;
3. deploy them with `weir deploy`; the data plane fetches, loads, warms up and routes to them;
4. send requests with the unmodified tritonclient through the data plane and print the results;
5. print the deployments, the replica's status and the audit log; stop `weir up` with SIGTERM.

    python examples/run_demo.py [--state-dir build/weir-up] [--repository build/demo-repository]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

DEMO_MODELS = ("mlp_classifier", "text_stats")


def start_weir_up(state_dir: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    ready_file = state_dir / "ready.json"
    command = [
        sys.executable, "-m", "weir.cli", "up", "--state-dir", str(state_dir),
        "--control-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--ready-file", str(ready_file), "--log-format", "json",
    ]  # fmt: skip
    print("$ weir " + " ".join(command[3:]))
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)

    def follow_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            print(f"  [weir up] {line.rstrip()}")

    threading.Thread(target=follow_log, daemon=True).start()
    deadline = time.monotonic() + 120
    while not ready_file.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("weir up did not start; see its log above")
        time.sleep(0.2)
    return process, json.loads(ready_file.read_text())


def weir(ready: dict[str, str], *args: str) -> dict:
    """A `weir` client command against the control plane, with the admin token `weir up` wrote."""
    token = Path(ready["admin_token_file"]).read_text().strip()
    command = [sys.executable, "-m", "weir.cli", *args, "--control-plane", ready["control_plane"], "--json"]
    print("$ weir " + " ".join(args))
    result = subprocess.run(command, env={**os.environ, "WEIR_TOKEN": token}, capture_output=True, text=True)
    if result.stderr.strip():
        print(result.stderr.rstrip().splitlines()[-1])  # the progress bar's last state
    if result.returncode != 0:
        raise SystemExit(f"weir {args[0]} failed: {result.stdout}{result.stderr}")
    return json.loads(result.stdout)


def push_and_deploy(ready: dict[str, str], repository: Path) -> None:
    for name in DEMO_MODELS:
        model_file = next((repository / name / "1").glob("model.pt*"))
        version = weir(
            ready, "models", "push", name, str(model_file), "--config", str(repository / name / "config.pbtxt"),
            "--description", f"demo {name}", "--tag", "source=examples", "--code-version", "demo",
            "--alias", "champion",
        )  # fmt: skip
        print(f"  {name} version {version['version']}: {version['state']}, sha256 {version['artifact_sha256'][:16]}...")
        deployment = weir(ready, "deploy", name, name, "champion")
        print(f"  endpoint {name} -> {deployment['resolved'][0]['model_name']}:{deployment['resolved'][0]['version']}")


def wait_until_served(url: str) -> None:
    client = triton.InferenceServerClient(url)
    deadline = time.monotonic() + 120
    while not all(client.is_model_ready(name) for name in DEMO_MODELS):
        if time.monotonic() > deadline:
            raise SystemExit("the data plane did not load the deployed models in time")
        time.sleep(0.2)
    client.close()


def run_requests(url: str, token: str) -> None:
    client = triton.InferenceServerClient(url)
    metadata = client.get_server_metadata()
    print(f"\nserver: {metadata.name} {metadata.version}, ready={client.is_server_ready()}")
    # inference is open; the repository index lists every model directory, so it needs a token (viewer)
    index = client.get_model_repository_index(headers={"authorization": f"Bearer {token}"})
    for entry in index.models:
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


def show_state(ready: dict[str, str]) -> None:
    listing = weir(ready, "deployments")
    for deployment in listing["deployments"]:
        resolved = ", ".join(f"{ref['model_name']}:{ref['version']}" for ref in deployment["resolved"])
        print(f"  endpoint {deployment['endpoint']} -> {resolved} (revision {deployment['revision']})")
    for replica in listing["replicas"]:
        states = ", ".join(f"{s['endpoint']}={s['state']}" for s in replica["status"].get("endpoints", []))
        print(f"  replica {replica['replica_id']} at {replica['address']}: {states}")
    events = weir(ready, "audit", "--limit", "8")
    for event in events:
        print(f"  audit {event['at']} {event['actor']} {event['action']} {event['target']} -> {event['result']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("build/demo-repository"))
    parser.add_argument("--state-dir", type=Path, default=Path("build/weir-up"))
    args = parser.parse_args()
    print(f"building the demo models in {args.repository} ...")
    build_demo_repository.build(args.repository)
    shutil.rmtree(args.state_dir, ignore_errors=True)  # a fresh registry each run: the demo is repeatable
    process, ready = start_weir_up(args.state_dir)
    try:
        print(f"\ncontrol plane {ready['control_plane']}, data plane {ready['data_plane']}\n")
        push_and_deploy(ready, args.repository)
        wait_until_served(ready["data_plane"])
        run_requests(ready["data_plane"], Path(ready["admin_token_file"]).read_text().strip())
        print()
        show_state(ready)
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
    print(f"\nweir up stopped on SIGTERM with exit code {exit_code}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
