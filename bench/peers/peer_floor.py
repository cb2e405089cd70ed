"""Floor: the least a Python grpc.aio server can do per V2 ModelInfer call.

    .venv/bin/python bench/peers/peer_floor.py --port P --model MODEL.pt

Generic handlers with no (de)serializers: every request's bytes are ignored and every ModelInfer returns
the same pre-serialized ModelInferResponse (raw [1, 10] FP32 OUTPUT__0). The canned output is the model's
output for common.check_input(), computed once at start-up, so the one-request check still compares with
torch. Also answers ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelConfig
(canned) so that tritonclient and load generators can start. Binds 127.0.0.1 only. Runs in Weir's venv.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CLASSES, FEATURES, INPUT, LOOPBACK, MODEL, OUTPUT, Peer  # noqa: E402

PEER = Peer(name="floor", script=Path(__file__).resolve(), venv=None, ready_timeout_s=60)


def canned_responses(model_path: Path) -> dict[str, bytes]:
    import torch
    from common import check_input

    from weir_proto.inference import messages as pb

    module = torch.jit.load(str(model_path)).eval()
    with torch.inference_mode():
        output = module(torch.from_numpy(check_input())).numpy().astype("<f4")
    infer = pb.ModelInferResponse(model_name=MODEL, model_version="1")
    infer.outputs.add(name=OUTPUT, datatype="FP32", shape=[1, CLASSES])
    infer.raw_output_contents.append(output.tobytes())
    metadata = pb.ModelMetadataResponse(name=MODEL, versions=["1"], platform="pytorch_libtorch")
    metadata.inputs.add(name=INPUT, datatype="FP32", shape=[-1, FEATURES])
    metadata.outputs.add(name=OUTPUT, datatype="FP32", shape=[-1, CLASSES])
    config = pb.ModelConfigResponse()
    config.config.name = MODEL
    config.config.platform = "pytorch_libtorch"
    config.config.max_batch_size = 64
    config.config.input.add(name=INPUT, data_type=pb.TYPE_FP32, dims=[FEATURES])
    config.config.output.add(name=OUTPUT, data_type=pb.TYPE_FP32, dims=[CLASSES])
    return {
        "ModelInfer": infer.SerializeToString(),
        "ServerLive": pb.ServerLiveResponse(live=True).SerializeToString(),
        "ServerReady": pb.ServerReadyResponse(ready=True).SerializeToString(),
        "ModelReady": pb.ModelReadyResponse(ready=True).SerializeToString(),
        "ServerMetadata": pb.ServerMetadataResponse(name="floor", version="0").SerializeToString(),
        "ModelMetadata": metadata.SerializeToString(),
        "ModelConfig": config.SerializeToString(),
    }


def serve(port: int, model_path: Path) -> None:
    import asyncio
    import signal

    import grpc

    responses = canned_responses(model_path)

    def unary(payload: bytes):
        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return payload

        return grpc.unary_unary_rpc_method_handler(handler)  # no (de)serializers: bytes in, bytes out

    handlers = {name: unary(payload) for name, payload in responses.items()}

    async def main() -> None:
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)]
        )
        if server.add_insecure_port(f"{LOOPBACK}:{port}") != port:
            raise SystemExit(f"floor: could not bind {LOOPBACK}:{port}")
        await server.start()
        print(f"floor: serving on {LOOPBACK}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await server.stop(grace=1.0)

    asyncio.run(main())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    args = parser.parse_args()
    serve(args.port, args.model)
