"""KServe 0.21 Python ModelServer serving the demo MLP over V2 gRPC.

    .peers/kserve/bin/python bench/peers/peer_kserve.py --port P --model MODEL.pt

A kserve.Model subclass decodes INPUT__0 (raw_input_contents), runs the TorchScript module and returns
OUTPUT__0 as raw output. KServe's Python ModelServer has no request batching of its own (KServe batches
in its Go agent sidecar, in Kubernetes only), so this peer serves every request on its own.

Binding: KServe 0.21 has no host option. Its gRPC server listens on "[::]:PORT" and its REST server
(uvicorn) on 0.0.0.0, so this script patches both at run time, before the server starts: the
grpc.aio server that kserve.protocol.grpc.server creates gets "127.0.0.1:PORT", and uvicorn.Config gets
host 127.0.0.1. The REST port is a free loopback port. Nothing in the venv is edited.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CLASSES, FEATURES, LOOPBACK, MODEL, Peer, free_port  # noqa: E402

PEER = Peer(name="kserve", script=Path(__file__).resolve(), venv="kserve", ready_timeout_s=180)


def _bind_loopback() -> None:
    import grpc.aio
    import kserve.protocol.grpc.server as kserve_grpc
    import uvicorn

    class LoopbackAio:
        def __getattr__(self, name: str):
            return getattr(grpc.aio, name)

        @staticmethod
        def server(*args, **kwargs):
            server = grpc.aio.server(*args, **kwargs)
            add = server.add_insecure_port

            def add_loopback(address: str) -> int:
                port = address.rsplit(":", 1)[1]
                print(f"kserve peer: gRPC {address} -> {LOOPBACK}:{port}", flush=True)
                return add(f"{LOOPBACK}:{port}")

            server.add_insecure_port = add_loopback
            return server

    kserve_grpc.aio = LoopbackAio()

    original_init = uvicorn.Config.__init__

    def loopback_init(self, *args, **kwargs):
        kwargs["host"] = LOOPBACK
        original_init(self, *args, **kwargs)

    uvicorn.Config.__init__ = loopback_init


def serve(port: int, model_path: Path) -> None:
    import os

    sys.argv = sys.argv[:1]  # kserve.model_server parses sys.argv at import: "--model" would match "--model_name"
    import kserve
    import torch
    from kserve import InferOutput, InferRequest, InferResponse

    _bind_loopback()
    if os.environ.get("WEIR_PEER_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["WEIR_PEER_TORCH_THREADS"]))

    class TorchMLP(kserve.Model):
        def __init__(self) -> None:
            super().__init__(MODEL)
            self.module = None
            self.load()

        def load(self) -> bool:
            self.module = torch.jit.load(str(model_path)).eval()
            self.ready = True
            return True

        def get_input_types(self) -> list[dict]:
            return [{"name": "INPUT__0", "datatype": "FP32", "shape": [-1, FEATURES]}]

        def get_output_types(self) -> list[dict]:
            return [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, CLASSES]}]

        async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            request_input = next(item for item in payload.inputs if item.name == "INPUT__0")
            features = request_input.as_numpy()
            with torch.inference_mode():
                output = self.module(torch.from_numpy(features)).numpy()
            result = InferOutput(name="OUTPUT__0", shape=list(output.shape), datatype="FP32")
            result.set_data_from_numpy(output, binary_data=True)
            return InferResponse(
                response_id=payload.id,
                model_name=self.name,
                infer_outputs=[result],
                from_grpc=payload.from_grpc,
                use_binary_outputs=True,
            )

    print(f"kserve peer: gRPC {LOOPBACK}:{port}", flush=True)
    kserve.ModelServer(http_port=free_port(), grpc_port=port, enable_grpc=True, workers=1).start([TorchMLP()])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    args = parser.parse_args()
    serve(args.port, args.model)
