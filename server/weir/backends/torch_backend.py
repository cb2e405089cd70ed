"""The PyTorch backend: TorchScript (``model.pt``) and torch.export (``model.pt2``) models.

It follows the conventions of Triton's PyTorch backend so a Triton repository loads unchanged:
inputs go to ``forward`` positionally in config order (or by the ``NAME__<index>`` suffix when
every input is named that way), outputs are matched the same way, or by name when the model
returns a dict. A file with any pickled payload (``torch.save(model)``, a torch.export archive with a
``use_pickle`` weight, ...) is refused before torch opens it (``weir_proto.artifact_safety``):
unpickling a file can run arbitrary code.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weir.backends.optimization import AccuracyReport, OptimizationSpec, compare, optimize, validation_inputs
from weir.errors import InternalError, InvalidArgumentError, ModelLoadError
from weir.model_config import ModelSignature, TensorSpec, resolve_inside
from weir_proto.artifact_safety import inspect_artifact
from weir_proto.model_config_limits import check_file_name

log = logging.getLogger(__name__)

_INDEXED_NAME = re.compile(r"^.+__(\d+)$")
MODEL_FILE_CANDIDATES = ("model.pt", "model.pt2", "model.plan")


def find_model_file(version_dir: Path, default_model_filename: str) -> Path:
    """The version's model file, which must stay inside the model's directory (a symlink out of it is
    refused, like a default_model_filename naming another directory)."""
    if default_model_filename:
        try:
            check_file_name("default_model_filename", default_model_filename)
        except InvalidArgumentError as error:
            raise ModelLoadError(error.message) from error
    candidates = (default_model_filename,) if default_model_filename else MODEL_FILE_CANDIDATES
    for candidate in candidates:
        path = version_dir / candidate
        if path.is_file():
            field = "default_model_filename" if default_model_filename else "model file"
            return resolve_inside(version_dir, candidate, field, within=version_dir.parent)
    raise ModelLoadError(f"{version_dir}: expected a model file named {' or '.join(candidates)}, found none")


def _archive_kind(path: Path) -> str:
    """'torchscript' or 'export', judged from the zip alone (nothing is unpickled to find out); a file
    with any pickled payload, or no TorchScript/torch.export archive at all, is refused here."""
    try:
        return inspect_artifact(path).value
    except InvalidArgumentError as error:
        raise ModelLoadError(error.message) from error


def _ordered(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """Triton's PyTorch convention: NAME__<index> fixes the position; otherwise config order."""
    matches = [_INDEXED_NAME.match(spec.name) for spec in specs]
    if specs and all(matches):
        return sorted(specs, key=lambda spec: int(_INDEXED_NAME.match(spec.name).group(1)))  # type: ignore[union-attr]
    return list(specs)


class TorchBackend:
    def __init__(
        self,
        model_path: Path,
        signature: ModelSignature,
        device: str = "cpu",
        optimization: OptimizationSpec | None = None,
        model_name: str = "",
    ) -> None:
        import torch

        self._torch = torch
        self._signature = signature
        self._device = torch.device(device)
        self._input_order = _ordered(signature.inputs)
        self._output_order = _ordered(signature.outputs)
        self.accuracy: AccuracyReport | None = None  # the accuracy gate's figures, for a lowered precision
        self._gpu_local = threading.local()  # per instance thread: CUDA stream and pinned host buffers
        kind = _archive_kind(model_path)
        if optimization is not None and kind != "pickle":
            optimization.check(kind, device, model_name)
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
        if optimization is not None and not optimization.is_default:
            self._optimize(optimization, kind, model_path, model_name)

    def _optimize(self, spec: OptimizationSpec, kind: str, model_path: Path, model_name: str) -> None:
        """Swap in the optimized module; for a lowered precision, only after the accuracy gate."""
        where = f"model '{model_name}'"
        names = [output.name for output in self._signature.outputs]
        if spec.lowers_precision:  # the fp32 answers first: casting a TorchScript module changes it in place
            inputs = validation_inputs(spec, self._signature, model_path.parent, model_name)
            expected = self._run_chunked(self._module, inputs, names)
        try:
            optimized = optimize(self._module, spec, kind, where)
        except ModelLoadError:
            raise
        except Exception as error:  # torch's own failure to rewrite or compile this graph
            raise ModelLoadError(f"{where}: cannot apply {spec}: {type(error).__name__}: {error}") from error
        if spec.lowers_precision:
            report = compare(expected, self._run_chunked(optimized, inputs, names), spec.precision)
            if not report.passed(spec):
                message = (
                    f"{where}: accuracy gate: {spec.precision} against fp32 on {report.rows} validation rows: max abs "
                    f"diff {report.max_abs_diff:.4g} (limit {spec.max_abs_diff:g}, weir_accuracy_max_abs_diff), top-1 "
                    f"agreement {report.top1_agreement:.4f} (minimum {spec.min_top1_agreement:g}, "
                    "weir_accuracy_min_top1_agreement)"
                )
                if spec.refuse_on_failure:
                    raise ModelLoadError(message + "; weir_accuracy_gate: warn serves it anyway")
                log.warning(message + "; served anyway (weir_accuracy_gate: warn)")
            self.accuracy = report
        self._module = optimized

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        return self._run(self._module, inputs, output_names)

    def _run_chunked(self, module: Any, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """Validation rows in batches the model accepts (its max_batch_size)."""
        step = self._signature.max_batch_size
        rows = len(next(iter(inputs.values()))) if inputs else 0
        if not self._signature.batched or rows <= step:
            return self._run(module, inputs, names)
        parts = [
            self._run(module, {name: array[start : start + step] for name, array in inputs.items()}, names)
            for start in range(0, rows, step)
        ]
        return {name: np.concatenate([part[name] for part in parts]) for name in names}

    def _run(self, module: Any, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        if self._device.type == "cuda":
            return self._run_on_gpu(module, inputs, output_names)
        arguments = [self._to_torch(spec, inputs.get(spec.name)) for spec in self._input_order]
        with torch.inference_mode():
            result = module(*arguments)
        return self._outputs_from(result, output_names)

    def _run_on_gpu(self, module: Any, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Each instance (executor thread) has its own CUDA stream and pinned host buffers: inputs are
        copied into pinned memory and sent asynchronously, so instances overlap transfers with compute.
        With weir_compile reduce-overhead, torch.compile replays CUDA graphs per batch size."""
        torch = self._torch
        local = self._gpu_local
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device=self._device)
            local.pinned = {}
        with torch.cuda.stream(local.stream), torch.inference_mode():
            arguments = [self._to_device(spec, inputs.get(spec.name), local.pinned) for spec in self._input_order]
            result = module(*arguments)
            outputs = self._outputs_from(result, output_names)  # the copy back waits for the stream's work
        return outputs

    def _to_device(self, spec: TensorSpec, array: np.ndarray | None, pinned: dict[str, Any]) -> Any:
        torch = self._torch
        if array is None or spec.datatype.name in ("BYTES", "BF16"):
            return self._to_torch(spec, array)
        staging = pinned.get(spec.name)
        dtype = torch.from_numpy(array[:0]).dtype
        if staging is None or staging.numel() < array.size or staging.dtype != dtype:
            staging = torch.empty(max(array.size, 1), dtype=dtype).pin_memory()
            pinned[spec.name] = staging
        host = staging[: array.size].view(array.shape)
        host.copy_(torch.from_numpy(np.ascontiguousarray(array)))
        return host.to(self._device, non_blocking=True)

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
