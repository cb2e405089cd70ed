"""MLServer runtime for the demo MLP (imported by MLServer inside .peers/mlserver only).

Decodes INPUT__0 with NumpyCodec, runs the TorchScript module under torch.inference_mode and returns
OUTPUT__0. MLServer's adaptive batching (model-settings max_batch_size / max_batch_time) merges
concurrent requests along the first dimension before predict() and splits the response after it.
"""

from __future__ import annotations

import os

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class TorchMLP(MLModel):
    async def load(self) -> bool:
        if os.environ.get("WEIR_PEER_TORCH_THREADS"):  # default: torch's own choice, as Weir's default
            torch.set_num_threads(int(os.environ["WEIR_PEER_TORCH_THREADS"]))
        self._module = torch.jit.load(os.environ["WEIR_PEER_MODEL"]).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request_input = next(item for item in payload.inputs if item.name == "INPUT__0")
        features = NumpyCodec.decode_input(request_input)
        with torch.inference_mode():
            output = self._module(torch.from_numpy(features.astype("float32", copy=False))).numpy()
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name="OUTPUT__0", payload=output)],
        )
