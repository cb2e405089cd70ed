"""TensorRT engines: a serialized engine (``model.plan``, Triton's ``tensorrt_plan``) or one built at
load from an ONNX export of the torch model (``weir_tensorrt: fp32|fp16|int8``), with one optimisation
profile from batch 1 to ``max_batch_size``. Needs GPU instances and the ``tensorrt`` package; without
them a load is refused as FAILED_PRECONDITION saying so. Each instance (executor thread) has its own
execution context and CUDA stream.

int8 builds use TensorRT's explicit quantization: the ONNX graph must carry Q/DQ nodes (implicit
int8 calibration is deprecated in TensorRT 10); a graph without them is built in fp16 by TensorRT.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from weir.errors import ErrorKind, ModelLoadError
from weir.model_config import ModelSignature

PLAN_FILE = "model.plan"


def _tensorrt(where: str) -> Any:
    try:
        import tensorrt
    except ImportError:
        raise ModelLoadError(
            f"{where}: TensorRT is not installed here (pip install tensorrt on a machine with an NVIDIA GPU)",
            ErrorKind.FAILED_PRECONDITION,
        ) from None
    return tensorrt


class TensorRTBackend:
    def __init__(
        self, model_path: Path, signature: ModelSignature, device: str, precision: str = "fp32", model_name: str = ""
    ) -> None:
        where = f"model '{model_name}'"
        if not device.startswith("cuda"):
            raise ModelLoadError(
                f"{where}: a TensorRT engine needs GPU instances (instance_group kind KIND_GPU)",
                ErrorKind.FAILED_PRECONDITION,
            )
        trt = _tensorrt(where)
        import torch

        self._torch = torch
        self._trt = trt
        self._signature = signature
        self._device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        if model_path.name == PLAN_FILE:
            serialized = model_path.read_bytes()
        else:
            serialized = self._build_from_torch(model_path, precision, where)
        runtime = trt.Runtime(self._logger)
        self._engine = runtime.deserialize_cuda_engine(serialized)
        if self._engine is None:
            raise ModelLoadError(f"{where}: {model_path.name} is not a TensorRT engine this TensorRT can load")
        self._local = threading.local()
        self.accuracy = None

    def _build_from_torch(self, model_path: Path, precision: str, where: str) -> bytes:
        """ONNX export of the torch model, parsed and built with a profile for batch 1..max_batch_size."""
        trt, torch = self._trt, self._torch
        from weir.backends.torch_backend import TorchBackend

        module = TorchBackend(model_path, self._signature, "cpu")._module
        signature = self._signature
        examples = tuple(
            torch.zeros([2 if signature.batched else 1, *[max(d, 1) for d in spec.dims]], dtype=torch.float32)
            for spec in signature.inputs
        )
        with tempfile.TemporaryDirectory() as scratch:
            onnx_path = Path(scratch) / "model.onnx"
            names_in = [spec.name for spec in signature.inputs]
            names_out = [spec.name for spec in signature.outputs]
            torch.onnx.export(
                module, examples, str(onnx_path), input_names=names_in, output_names=names_out,
                dynamic_axes={name: {0: "batch"} for name in names_in + names_out} if signature.batched else None,
            )  # fmt: skip
            builder = trt.Builder(self._logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, self._logger)
            if not parser.parse(onnx_path.read_bytes()):
                errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
                raise ModelLoadError(f"{where}: TensorRT cannot parse the ONNX export: {errors}")
        config = builder.create_builder_config()
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        if signature.batched:
            profile = builder.create_optimization_profile()
            largest = max(1, signature.max_batch_size)
            for spec in signature.inputs:
                dims = [max(d, 1) for d in spec.dims]
                profile.set_shape(spec.name, [1, *dims], [max(1, largest // 2), *dims], [largest, *dims])
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelLoadError(f"{where}: TensorRT could not build an engine ({precision})")
        return bytes(serialized)

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        local = self._local
        if not hasattr(local, "context"):
            local.context = self._engine.create_execution_context()
            local.stream = torch.cuda.Stream(device=self._device)
        context = local.context
        keep = []
        with torch.cuda.stream(local.stream):
            for spec in self._signature.inputs:
                tensor = torch.from_numpy(np.ascontiguousarray(inputs[spec.name])).to(self._device, non_blocking=True)
                keep.append(tensor)
                context.set_input_shape(spec.name, tuple(tensor.shape))
                context.set_tensor_address(spec.name, tensor.data_ptr())
            outputs = {}
            for spec in self._signature.outputs:
                shape = tuple(context.get_tensor_shape(spec.name))
                dtype = torch.from_numpy(np.zeros(0, spec.datatype.numpy_dtype)).dtype
                outputs[spec.name] = torch.empty(shape, dtype=dtype, device=self._device)
                context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
            if not context.execute_async_v3(local.stream.cuda_stream):
                raise ModelLoadError("TensorRT execution failed")
            local.stream.synchronize()
        return {name: outputs[name].cpu().numpy() for name in output_names}

    def unload(self) -> None:
        self._engine = None
