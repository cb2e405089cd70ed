"""The PyTorch backend: TorchScript (``model.pt``) and torch.export (``model.pt2``) models.

It follows the conventions of Triton's PyTorch backend so a Triton repository loads unchanged:
inputs go to ``forward`` positionally in config order (or by the ``NAME__<index>`` suffix when
every input is named that way), outputs are matched the same way, or by name when the model
returns a dict. Pickled ``nn.Module`` files (``torch.save(model)``) are refused: unpickling a
file can run arbitrary code.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weir.errors import InternalError, InvalidArgumentError, ModelLoadError
from weir.model_config import ModelSignature, TensorSpec

_INDEXED_NAME = re.compile(r"^.+__(\d+)$")
MODEL_FILE_CANDIDATES = ("model.pt", "model.pt2")


def find_model_file(version_dir: Path, default_model_filename: str) -> Path:
    candidates = (default_model_filename,) if default_model_filename else MODEL_FILE_CANDIDATES
    for candidate in candidates:
        path = version_dir / candidate
        if path.is_file():
            return path
    raise ModelLoadError(f"{version_dir}: expected a model file named {' or '.join(candidates)}, found none")


def _archive_kind(path: Path) -> str:
    """'torchscript', 'export' or 'pickle', from the zip archive's member names alone (nothing is
    unpickled to find out)."""
    if not zipfile.is_zipfile(path):
        return "pickle"  # torch.save's legacy format, or not a torch file at all
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("archive_format") for name in names) or any(
        "/models/" in name and name.endswith(".json") for name in names
    ):
        return "export"
    if any("/code/" in name for name in names) and any(name.endswith("constants.pkl") for name in names):
        return "torchscript"
    return "pickle"


def _ordered(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """Triton's PyTorch convention: NAME__<index> fixes the position; otherwise config order."""
    matches = [_INDEXED_NAME.match(spec.name) for spec in specs]
    if specs and all(matches):
        return sorted(specs, key=lambda spec: int(_INDEXED_NAME.match(spec.name).group(1)))  # type: ignore[union-attr]
    return list(specs)


class TorchBackend:
    def __init__(self, model_path: Path, signature: ModelSignature, device: str = "cpu") -> None:
        import torch

        self._torch = torch
        self._signature = signature
        self._device = torch.device(device)
        self._input_order = _ordered(signature.inputs)
        self._output_order = _ordered(signature.outputs)
        kind = _archive_kind(model_path)
        if kind == "pickle":
            raise ModelLoadError(
                f"{model_path}: refusing to load a pickled Python object (torch.save of a module or "
                "state dict): unpickling can run arbitrary code. Save the model as TorchScript "
                "(torch.jit.script/trace + torch.jit.save, model.pt) or with torch.export.save (model.pt2)."
            )
        try:
            if kind == "export":
                self._module: Any = torch.export.load(str(model_path)).module()
                self._module.to(self._device)
            else:
                self._module = torch.jit.load(str(model_path), map_location=self._device)
                self._module.eval()
        except Exception as error:  # torch raises many types for a corrupt file
            raise ModelLoadError(f"{model_path}: cannot load {kind} model: {error}") from error

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        arguments = [self._to_torch(spec, inputs.get(spec.name)) for spec in self._input_order]
        with torch.inference_mode():
            result = self._module(*arguments)
        return self._outputs_from(result, output_names)

    def unload(self) -> None:
        self._module = None

    def _to_torch(self, spec: TensorSpec, array: np.ndarray | None) -> Any:
        torch = self._torch
        if array is None:
            return None  # an optional input the request left out
        if spec.datatype.name == "BYTES":
            # TorchScript has no bytes type: BYTES elements reach the model as a flat List[str].
            try:
                return [element.decode("utf-8") for element in array.reshape(-1)]
            except UnicodeDecodeError as error:
                raise InvalidArgumentError(
                    f"input '{spec.name}': expected UTF-8 text for this model's BYTES input, got undecodable bytes"
                ) from error
        with warnings.catch_warnings():
            # Raw inputs are read-only views of the request's bytes; models do not write their inputs.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(array)
        if spec.datatype.name == "BF16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.to(self._device, non_blocking=True) if self._device.type != "cpu" else tensor

    def _outputs_from(self, result: Any, output_names: list[str]) -> dict[str, np.ndarray]:
        specs = self._signature.outputs_by_name
        if isinstance(result, dict):
            by_name = result
        else:
            values = list(result) if isinstance(result, (tuple, list)) and not _is_string_list(result) else [result]
            if len(values) != len(self._output_order):
                raise InternalError(
                    f"model returned {len(values)} outputs, the config declares {len(self._output_order)}: "
                    f"{[spec.name for spec in self._output_order]}"
                )
            by_name = {spec.name: value for spec, value in zip(self._output_order, values, strict=True)}
        outputs: dict[str, np.ndarray] = {}
        for name in output_names:
            if name not in by_name:
                raise InternalError(f"model did not return output '{name}'")
            outputs[name] = self._to_numpy(specs[name], by_name[name])
        return outputs

    def _to_numpy(self, spec: TensorSpec, value: Any) -> np.ndarray:
        torch = self._torch
        if spec.datatype.name == "BYTES":
            if isinstance(value, torch.Tensor):
                raise InternalError(
                    f"output '{spec.name}': config says BYTES, the model returned a {value.dtype} tensor"
                )
            array = np.empty(len(value), dtype=object)
            array[:] = [element.encode("utf-8") if isinstance(element, str) else bytes(element) for element in value]
            return array
        if not isinstance(value, torch.Tensor):
            raise InternalError(f"output '{spec.name}': expected a tensor, the model returned {type(value).__name__}")
        value = value.detach()
        if value.device.type != "cpu":
            value = value.cpu()
        if spec.datatype.name == "BF16":
            if value.dtype != torch.bfloat16:
                raise InternalError(f"output '{spec.name}': config says BF16, the model returned {value.dtype}")
            return value.contiguous().view(torch.uint16).numpy()
        array = value.numpy()
        if array.dtype.newbyteorder("<") != spec.datatype.numpy_dtype:
            raise InternalError(
                f"output '{spec.name}': config says {spec.datatype.name}, the model returned {value.dtype}"
            )
        return array


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], (str, bytes))
