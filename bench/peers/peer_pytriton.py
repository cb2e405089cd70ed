"""PyTriton 0.7.0 (nvidia-pytriton, with the Triton server it bundles) serving the demo MLP.

    .peers/pytriton/bin/python bench/peers/peer_pytriton.py --port P --model MODEL.pt

A @batch infer function bound with Triton's dynamic batcher (max_batch_size 64,
max_queue_delay_microseconds WEIR_PEER_PYTRITON_QUEUE_DELAY_US, default 1000). TritonConfig binds gRPC to
127.0.0.1:P and HTTP and metrics to 127.0.0.1 on free ports. tritonserver needs libpython of the running
interpreter, so LD_LIBRARY_PATH gets sysconfig's LIBDIR (PEER.env_hook). Stopped with SIGINT to its whole
process group (tritonserver and the python-backend stubs are children).
"""

from __future__ import annotations

import os
import signal
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CLASSES, FEATURES, LOOPBACK, MODEL, Peer, free_port  # noqa: E402


def _libdir() -> str:
    # The peer venv is made from the same base interpreter as Weir's venv, so its LIBDIR is this one's.
    return str(sysconfig.get_config_var("LIBDIR") or "")


def _env_hook(env: dict[str, str]) -> None:
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [_libdir(), env.get("LD_LIBRARY_PATH")]))


PEER = Peer(
    name="pytriton",
    script=Path(__file__).resolve(),
    venv="pytriton",
    stop_signal=signal.SIGINT,
    ready_timeout_s=240,
    env_hook=_env_hook,
)


def serve(port: int, model_path: Path) -> None:
    import logging

    import numpy as np
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.environ.get("WEIR_PEER_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["WEIR_PEER_TORCH_THREADS"]))
    module = torch.jit.load(str(model_path)).eval()
    delay_us = int(os.environ.get("WEIR_PEER_PYTRITON_QUEUE_DELAY_US", "1000"))

    @batch
    def infer(INPUT__0: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return {"OUTPUT__0": module(torch.from_numpy(INPUT__0)).numpy()}

    config = TritonConfig(
        grpc_address=LOOPBACK,
        grpc_port=port,
        http_address=LOOPBACK,
        http_port=free_port(),
        metrics_address=LOOPBACK,
        metrics_port=free_port(),
        log_verbose=0,
    )
    with Triton(config=config) as triton:  # workspace: a temporary folder Triton removes on exit
        triton.bind(
            model_name=MODEL,
            infer_func=infer,
            inputs=[Tensor(name="INPUT__0", dtype=np.float32, shape=(FEATURES,))],
            outputs=[Tensor(name="OUTPUT__0", dtype=np.float32, shape=(CLASSES,))],
            config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=delay_us)),
            strict=True,
        )
        print(f"pytriton: serving gRPC on {LOOPBACK}:{port}", flush=True)
        triton.serve()  # returns on SIGINT/SIGTERM


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    args = parser.parse_args()
    serve(args.port, args.model)
