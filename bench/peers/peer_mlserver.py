"""MLServer 1.7.1 serving the demo MLP with adaptive batching.

    .peers/mlserver/bin/python bench/peers/peer_mlserver.py --port P --model MODEL.pt

Writes settings.json and model-settings.json into a temporary folder and execs `mlserver start` on it.
The runtime is mlserver_mlp.TorchMLP (this folder is put on PYTHONPATH). Adaptive batching:
max_batch_size 32, max_batch_time WEIR_PEER_MLSERVER_BATCH_TIME (default 0.002 s). parallel_workers comes
from MLSERVER_PARALLEL_WORKERS (default 0 here: inference in the main process; 1 = one worker process).
gRPC binds 127.0.0.1:P; MLServer's REST and metrics servers cannot be switched off, so they bind
127.0.0.1 on free ports.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CLASSES, FEATURES, LOOPBACK, MODEL, Peer, free_port  # noqa: E402

PEER = Peer(name="mlserver", script=Path(__file__).resolve(), venv="mlserver", ready_timeout_s=180)


def serve(port: int, model_path: Path) -> None:
    import json
    import os
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="weir-peer-mlserver-"))
    workers = int(os.environ.get("MLSERVER_PARALLEL_WORKERS", "0"))
    batch_time = float(os.environ.get("WEIR_PEER_MLSERVER_BATCH_TIME", "0.002"))
    settings = {
        "host": LOOPBACK,
        "grpc_port": port,
        "http_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": workers,
        "debug": False,
        "load_models_at_startup": True,
    }
    model_settings = {
        "name": MODEL,
        "implementation": "mlserver_mlp.TorchMLP",
        "max_batch_size": 32,
        "max_batch_time": batch_time,
        "inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [-1, FEATURES]}],
        "outputs": [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, CLASSES]}],
        "parameters": {"version": "1"},
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (folder / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    # Environment wins over settings.json in MLServer: drop any MLSERVER_* that could rebind it.
    for key in ("MLSERVER_HOST", "MLSERVER_GRPC_PORT", "MLSERVER_HTTP_PORT", "MLSERVER_METRICS_PORT"):
        os.environ.pop(key, None)
    os.environ["MLSERVER_PARALLEL_WORKERS"] = str(workers)
    os.environ["WEIR_PEER_MODEL"] = str(model_path)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    print(f"mlserver: settings in {folder}: {json.dumps(settings)}", flush=True)
    executable = Path(sys.executable).parent / "mlserver"
    os.execv(str(executable), [str(executable), "start", str(folder)])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    args = parser.parse_args()
    serve(args.port, args.model)
