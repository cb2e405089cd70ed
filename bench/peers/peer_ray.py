"""Ray Serve 2.60 serving the demo MLP through its gRPC proxy, with @serve.batch.

    .peers/ray/bin/python bench/peers/peer_ray.py --port P --model MODEL.pt

One deployment (one replica) implements the V2 methods by name (ModelInfer, ServerReady, ModelReady,
ServerLive, ServerMetadata, ModelMetadata) with tritonclient's generated protos; the proxy is given
tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server. ModelInfer goes through
@serve.batch(max_batch_size 32, batch_wait_timeout_s WEIR_PEER_RAY_BATCH_WAIT_S, default 0.002).

Ray's GCS, raylet, dashboard agent and Serve proxy bind all interfaces, so the peer runs inside a private
network namespace (`unshare -rn`, loopback up; PEER.netns): nothing it opens is reachable from outside,
and the load client must enter the same namespace (Handle.client_prefix() gives the nsenter command).
Stopped with SIGTERM to its process group: the script shuts Serve and Ray down, then exits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CLASSES, FEATURES, LOOPBACK, MODEL, Peer  # noqa: E402


def _env_hook(env: dict[str, str]) -> None:
    # ray_shim/grpc_service_pb2.py lets Ray unpickle tritonclient's request classes (see that file)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "ray_shim"), env.get("PYTHONPATH")]))


PEER = Peer(
    name="ray",
    script=Path(__file__).resolve(),
    venv="ray",
    ready_timeout_s=300,
    netns=True,
    signal_group=False,  # SIGTERM to the driver only; it shuts Serve and Ray down, stop() kills the rest
    env_hook=_env_hook,
    env={"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "RAY_AUTH_MODE": "disabled"},
)


def serve_forever(port: int, model_path: Path) -> None:
    import signal
    import threading

    import numpy as np
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions
    from tritonclient.grpc import service_pb2 as pb

    batch_wait = float(os.environ.get("WEIR_PEER_RAY_BATCH_WAIT_S", "0.002"))

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class MLP:
        def __init__(self, path: str) -> None:
            import torch

            if os.environ.get("WEIR_PEER_TORCH_THREADS"):
                torch.set_num_threads(int(os.environ["WEIR_PEER_TORCH_THREADS"]))
            self.torch = torch
            self.module = torch.jit.load(path).eval()

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=batch_wait)
        async def run(self, rows: list[np.ndarray]) -> list[np.ndarray]:
            sizes = [row.shape[0] for row in rows]
            with self.torch.inference_mode():
                output = self.module(self.torch.from_numpy(np.concatenate(rows))).numpy()
            return np.split(output, np.cumsum(sizes)[:-1])

        async def ModelInfer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
            index = next(i for i, item in enumerate(request.inputs) if item.name == "INPUT__0")
            shape = list(request.inputs[index].shape)
            features = np.frombuffer(request.raw_input_contents[index], dtype="<f4").reshape(shape)
            output = await self.run(features)
            response = pb.ModelInferResponse(model_name=MODEL, model_version="1", id=request.id)
            response.outputs.add(name="OUTPUT__0", datatype="FP32", shape=list(output.shape))
            response.raw_output_contents.append(np.ascontiguousarray(output, dtype="<f4").tobytes())
            return response

        def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=True)

        def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=request.name == MODEL)

        def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name="ray-serve", version=ray.__version__)

        def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
            response = pb.ModelMetadataResponse(name=MODEL, versions=["1"], platform="pytorch_libtorch")
            response.inputs.add(name="INPUT__0", datatype="FP32", shape=[-1, FEATURES])
            response.outputs.add(name="OUTPUT__0", datatype="FP32", shape=[-1, CLASSES])
            return response

    ray.init(
        _node_ip_address=LOOPBACK,
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        logging_level="WARNING",
    )
    serve.start(
        http_options={"host": LOOPBACK, "port": port + 1 if port < 65535 else port - 1},  # private netns: free
        grpc_options=gRPCOptions(
            port=port,
            grpc_servicer_functions=["tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"],
        ),
    )
    # route_prefix must be set: with None the proxy gets no endpoint, and gRPC calls without an
    # "application" metadata key fail NOT_FOUND. With one application the proxy routes every call to it.
    serve.run(MLP.bind(str(model_path)), name=MODEL, route_prefix="/")
    print(f"ray peer: Serve gRPC proxy on port {port} (inside a private network namespace)", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):  # a bare wait() would not wake for the signal handler
        pass
    print("ray peer: shutting down", flush=True)
    threading.Timer(20.0, lambda: os._exit(3)).start()  # a hung shutdown must not hold the runner
    serve.shutdown()
    ray.shutdown()
    os._exit(0)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    args = parser.parse_args()
    serve_forever(args.port, args.model)
