"""Per-model optimization, declared in config.pbtxt parameters:

    parameters { key: "weir_precision" value: { string_value: "int8_dynamic" } }   # fp32 (default), fp16, bf16,
                                                                                 # int8_dynamic, int8_weight_only
    parameters { key: "weir_compile"   value: { string_value: "max-autotune" } }   # off (default), default,
                                                                                 # reduce-overhead, max-autotune, ...
    parameters { key: "weir_tensorrt"  value: { string_value: "fp16" } }           # off (default), fp32, fp16, int8
    # the accuracy gate of a lowered precision, run at load on validation inputs:
    parameters { key: "weir_accuracy_max_abs_diff"       value: { string_value: "0.05" } }    # default: not checked
    parameters { key: "weir_accuracy_min_top1_agreement" value: { string_value: "0.99" } }
    parameters { key: "weir_accuracy_gate"               value: { string_value: "refuse" } }   # or warn
    parameters { key: "weir_validation_inputs"           value: { string_value: "validation.npz" } }

What runs where (anything else is refused at load, naming this table):

    precision          CPU instances                  GPU instances            model file
    fp32               yes                            yes                      .pt or .pt2
    bf16               yes                            yes                      .pt or .pt2
    fp16               no (slow or missing kernels)   yes                      .pt or .pt2
    int8_dynamic       yes (fbgemm / onednn)          no (use int8_weight_only) .pt2 (torch.export)
    int8_weight_only   yes (weir_kernels fallback)    yes (weir_kernels Triton) .pt2
    compile            .pt2 only (a TorchScript module is already compiled by TorchScript)
    tensorrt           GPU only, and only where the tensorrt package imports

int8 rewrites the exported graph: every ``aten.linear`` whose weight is a parameter becomes a dynamic
int8 linear (activations quantized per batch, weights per output channel) or a weight-only int8 linear
with fused dequantization. TorchScript graphs cannot be rewritten that way, hence .pt2 only.

The gate runs the fp32 model and the optimized one on the validation inputs (the npz file in the
version directory, arrays named by input: the one ``weir_validation_inputs`` names, else
``validation.npz`` if there is one, as `weir models push --validation` puts it there; else 256 rows
of standard-normal values per floating input)
and measures the largest absolute output difference and the top-1 agreement (argmax of the last axis
of the first output); the figures are reported in the served config's parameters and in /metrics. By
default the gate requires 99% top-1 agreement; a limit on the absolute difference applies when
configured (what is acceptable depends on the scale of the model's outputs).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from weir.errors import ErrorKind, ModelLoadError, WeirError
from weir.model_config import resolve_inside
from weir.warmup import filled_array
from weir_proto.inference import messages as pb
from weir_proto.validation_inputs import VALIDATION_FILENAME, check_validation_npz

PRECISION = "weir_precision"
COMPILE = "weir_compile"
TENSORRT = "weir_tensorrt"
MAX_ABS_DIFF = "weir_accuracy_max_abs_diff"
MIN_TOP1 = "weir_accuracy_min_top1_agreement"
GATE = "weir_accuracy_gate"
VALIDATION = "weir_validation_inputs"

PRECISIONS = ("fp32", "bf16", "fp16", "int8_dynamic", "int8_weight_only")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TENSORRT_PRECISIONS = ("off", "fp32", "fp16", "int8")
VALIDATION_ROWS = 256
VARIABLE_DIM = 16  # a variable non-batch dimension's length in synthetic validation rows
SUPPORT = (
    "supported: fp32 and bf16 anywhere; fp16 on GPU instances; int8_dynamic on CPU instances with a .pt2 "
    "(torch.export) model; int8_weight_only with a .pt2 model; weir_compile with a .pt2 model; weir_tensorrt on "
    "GPU instances with the tensorrt package installed"
)


@dataclass(frozen=True)
class OptimizationSpec:
    precision: str = "fp32"
    compile_mode: str = "off"
    tensorrt: str = "off"
    max_abs_diff: float = math.inf  # checked when configured: what is acceptable depends on the outputs' scale
    min_top1_agreement: float = 0.99
    refuse_on_failure: bool = True
    validation_file: str = ""

    @property
    def lowers_precision(self) -> bool:
        return self.precision != "fp32"

    @property
    def is_default(self) -> bool:
        return self.precision == "fp32" and self.compile_mode == "off" and self.tensorrt == "off"

    @classmethod
    def from_config(cls, config: pb.ModelConfig) -> OptimizationSpec:
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        source = f"model '{config.name}' config.pbtxt parameters"

        def choice(key: str, options: tuple[str, ...], default: str) -> str:
            value = parameters.get(key, default).strip().lower() or default
            if value not in options:
                raise ModelLoadError(f"{source}['{key}']: expected one of {list(options)}, got {value!r}")
            return value

        def number(key: str, default: float, low: float, high: float) -> float:
            text = parameters.get(key, "")
            try:
                value = float(text) if text else default
            except ValueError:
                value = math.nan
            if not low <= value <= high:
                raise ModelLoadError(f"{source}['{key}']: expected a number from {low} to {high}, got {text!r}")
            return value

        return cls(
            precision=choice(PRECISION, PRECISIONS, "fp32"),
            compile_mode=choice(COMPILE, COMPILE_MODES, "off"),
            tensorrt=choice(TENSORRT, TENSORRT_PRECISIONS, "off"),
            max_abs_diff=number(MAX_ABS_DIFF, math.inf, 0.0, math.inf),
            min_top1_agreement=number(MIN_TOP1, 0.99, 0.0, 1.0),
            refuse_on_failure=choice(GATE, ("refuse", "warn"), "refuse") == "refuse",
            validation_file=parameters.get(VALIDATION, ""),
        )

    def check(self, model_kind: str, device: str, model_name: str) -> None:
        """Refuse what does not run here, saying what does."""
        on_gpu = device.startswith("cuda")
        where = f"model '{model_name}' ({'GPU' if on_gpu else 'CPU'} instances, {model_kind} model)"

        def refuse(reason: str, kind: ErrorKind = ErrorKind.INVALID_ARGUMENT) -> None:
            raise ModelLoadError(f"{where}: {reason}; {SUPPORT}", kind)

        if self.precision == "fp16" and not on_gpu:
            refuse(
                f"{PRECISION} fp16 needs GPU instances (instance_group kind KIND_GPU); on CPU use bf16 or int8_dynamic"
            )
        if self.precision == "int8_dynamic" and on_gpu:
            refuse(
                f"{PRECISION} int8_dynamic runs on CPU instances (fbgemm/onednn); on GPU use int8_weight_only or fp16"
            )
        if self.precision.startswith("int8") and model_kind != "export":
            refuse(
                f"{PRECISION} {self.precision} rewrites the model's graph and needs a torch.export model (model.pt2)"
            )
        if self.compile_mode != "off" and model_kind != "export":
            refuse(f"{COMPILE} {self.compile_mode} needs a torch.export model (model.pt2)")
        if self.tensorrt != "off":
            if not on_gpu:
                refuse(f"{TENSORRT} {self.tensorrt} needs GPU instances (instance_group kind KIND_GPU)")
            if not tensorrt_available():
                refuse(f"{TENSORRT} {self.tensorrt}: TensorRT is not installed here", ErrorKind.FAILED_PRECONDITION)


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


# --- graph rewrites -----------------------------------------------------------------------------


def _linear_nodes(module: Any) -> Iterator[tuple[Any, Any, Any, Any]]:
    """(node, input node, weight parameter, bias parameter or None) for each aten.linear of a
    torch.export module whose weight (and bias) are the module's own parameters."""
    import torch

    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        x, weight_node, *rest = node.args
        bias_node = rest[0] if rest else None
        if getattr(weight_node, "op", None) != "get_attr":
            continue
        weight = _attribute(module, weight_node.target)
        bias = None
        if bias_node is not None and getattr(bias_node, "op", None) == "get_attr":
            bias = _attribute(module, bias_node.target)
        if bias_node is not None and bias is None:
            continue
        yield node, x, weight, bias


def _attribute(module: Any, target: str) -> Any:
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def quantize_dynamic_int8(module: Any) -> int:
    """Replace each parameter-weighted linear with fbgemm/onednn's dynamic int8 linear (weights int8 per
    output channel, activations quantized per call); returns how many were replaced."""
    import torch

    replaced = 0
    for node, x, weight, bias in _linear_nodes(module):
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
        with warnings.catch_warnings():
            # torch marks quantized tensors deprecated in favour of torchao, which is not installed here;
            # these are the ops torch.ao.quantization.quantize_dynamic itself uses.
            warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
            warnings.filterwarnings("ignore", category=UserWarning, message=".*quantized tensor creation.*")
            qweight = torch.quantize_per_channel(
                weight, scales, torch.zeros(weight.shape[0], dtype=torch.int64), 0, torch.qint8
            )
            packed = torch.ops.quantized.linear_prepack(qweight, bias.detach().float() if bias is not None else None)
        name = f"_weir_int8_linear_{replaced}"
        setattr(module, name, packed)
        with module.graph.inserting_before(node), warnings.catch_warnings():
            # the packed weights are a TorchScript object, which FX does not count among attributes it
            # knows (it warns); the generated code reads it as an attribute all the same
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
            packed_node = module.graph.get_attr(name)
        node.target = torch.ops.quantized.linear_dynamic.default
        node.args = (x, packed_node)
        replaced += 1
    _finish(module)
    return replaced


def quantize_weight_only_int8(module: Any) -> int:
    """Replace each parameter-weighted linear with weir_kernels' int8 weight-only linear (dequantization
    fused into the matmul on GPU, the CPU fallback here); returns how many were replaced."""
    from weir_kernels import int8_linear

    replaced = 0
    for node, x, weight, bias in _linear_nodes(module):
        qweight, scale = int8_linear.quantize_weight(weight.detach())
        names = [f"_weir_w8_{replaced}_{part}" for part in ("qweight", "scale", "bias")]
        module.register_buffer(names[0], qweight)
        module.register_buffer(names[1], scale)
        if bias is not None:
            module.register_buffer(names[2], bias.detach().clone())
        with module.graph.inserting_before(node):
            arguments = [x, module.graph.get_attr(names[0]), module.graph.get_attr(names[1])]
            arguments.append(module.graph.get_attr(names[2]) if bias is not None else None)
        node.target = int8_linear.linear
        node.args = tuple(arguments)
        replaced += 1
    _finish(module)
    return replaced


def _finish(module: Any) -> None:
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.recompile()
    # parameters no node reads any more (the fp32 weights) would keep their memory: drop them
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(module.named_parameters()):
        if name not in used:
            owner_name, _, leaf = name.rpartition(".")
            owner = _attribute(module, owner_name) if owner_name else module
            delattr(owner, leaf)


class Cast:
    """Calls a module in a lower floating precision: floating inputs cast in, floating outputs cast
    back to float32 (what the config declares)."""

    def __init__(self, module: Any, dtype: Any) -> None:
        import torch

        self._torch = torch
        self._module = module.to(dtype)
        self._dtype = dtype

    def __call__(self, *arguments: Any) -> Any:
        torch = self._torch
        cast = [a.to(self._dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in arguments]
        return _map_tensors(self._module(*cast), lambda t: t.float() if t.is_floating_point() else t)


def _map_tensors(value: Any, function: Callable[[Any], Any]) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, function) for item in value)
    return value


def optimize(module: Any, spec: OptimizationSpec, model_kind: str, where: str) -> Any:
    """The module as the spec asks (already checked by ``spec.check``)."""
    import copy

    import torch

    optimized = module
    if spec.precision in ("int8_dynamic", "int8_weight_only"):
        optimized = copy.deepcopy(module)
        rewrite = quantize_dynamic_int8 if spec.precision == "int8_dynamic" else quantize_weight_only_int8
        if rewrite(optimized) == 0:
            raise ModelLoadError(f"{where}: {PRECISION} {spec.precision}: the model has no linear layers to quantize")
    elif spec.precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float16
        optimized = Cast(copy.deepcopy(module) if model_kind == "export" else module, dtype)
    if spec.compile_mode != "off":
        optimized = torch.compile(optimized, mode=None if spec.compile_mode == "default" else spec.compile_mode)
    return optimized


# --- the accuracy gate --------------------------------------------------------------------------


@dataclass(frozen=True)
class AccuracyReport:
    precision: str
    rows: int
    max_abs_diff: float
    top1_agreement: float

    def passed(self, spec: OptimizationSpec) -> bool:
        return self.max_abs_diff <= spec.max_abs_diff and self.top1_agreement >= spec.min_top1_agreement

    def as_parameters(self) -> dict[str, str]:
        """What the served config reports."""
        return {
            "weir_accuracy_measured_max_abs_diff": f"{self.max_abs_diff:.6g}",
            "weir_accuracy_measured_top1_agreement": f"{self.top1_agreement:.6g}",
            "weir_accuracy_validation_rows": str(self.rows),
        }


def validation_inputs(
    spec: OptimizationSpec, signature: Any, version_dir: Path, model_name: str
) -> dict[str, np.ndarray]:
    """The gate's inputs: the configured npz file, else the version's validation.npz (the registry's
    copy of `weir models push --validation`), else standard-normal rows for floating inputs."""
    validation_file = spec.validation_file
    if not validation_file and (version_dir / VALIDATION_FILENAME).is_file():
        validation_file = VALIDATION_FILENAME
    if validation_file:
        # An npz inside the model's directory: bounded, plain arrays only (np.load refuses pickled
        # object arrays too, by default).
        path = resolve_inside(version_dir, validation_file, f"parameters['{VALIDATION}']", within=version_dir.parent)
        try:
            check_validation_npz(path, str(path))
        except WeirError as error:
            raise ModelLoadError(f"model '{model_name}' {VALIDATION}: {error.message}") from None
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"model '{model_name}' {VALIDATION}: cannot read {path}: {error}") from error
        missing = [tensor.name for tensor in signature.inputs if tensor.name not in arrays]
        if missing:
            raise ModelLoadError(f"model '{model_name}' {VALIDATION}: {path} lacks arrays for inputs {missing}")
        return {tensor.name: arrays[tensor.name].astype(tensor.datatype.numpy_dtype) for tensor in signature.inputs}
    inputs = {}
    for tensor in signature.inputs:
        shape = [VARIABLE_DIM if dim < 0 else dim for dim in signature.full_shape(tensor)]
        if signature.batched:
            shape[0] = VALIDATION_ROWS
        dtype = tensor.datatype.numpy_dtype
        if dtype is None or dtype.kind not in "f":
            raise ModelLoadError(
                f"model '{model_name}' {VALIDATION}: input '{tensor.name}' is {tensor.datatype.name}; synthetic "
                "validation rows exist for floating inputs only: give an npz file"
            )
        inputs[tensor.name] = filled_array(tensor.datatype.name, shape, zero=False)
    return inputs


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], precision: str) -> AccuracyReport:
    reference = {name: array for name, array in reference.items() if array.dtype.kind in "fiub"}
    if not reference:
        return AccuracyReport(precision, 0, 0.0, 1.0)  # text outputs only: nothing numeric to compare
    first = next(iter(reference))
    expected, got = reference[first].astype(np.float64), candidate[first].astype(np.float64)
    max_abs_diff = max(float(np.max(np.abs(reference[n].astype(np.float64) - candidate[n]))) for n in reference)
    if expected.ndim >= 1 and expected.shape[-1] > 1:
        agreement = float(np.mean(np.argmax(expected, axis=-1) == np.argmax(got, axis=-1)))
    else:
        agreement = 1.0  # one value per row: nothing to rank; the max difference decides
    rows = int(expected.shape[0]) if expected.ndim else 1
    return AccuracyReport(precision, rows, max_abs_diff, agreement)


class AccuracyCollector(Collector):
    """Per loaded version with a lowered precision, the gate's figures."""

    def __init__(self, reports: Callable[[], list[tuple[str, str, AccuracyReport]]]) -> None:
        self._reports = reports

    def collect(self) -> Iterator[Metric]:
        diff = GaugeMetricFamily(
            "weir_model_accuracy_max_abs_diff", "Largest output difference from fp32 on the validation inputs.",
            labels=["model", "version", "precision"],
        )  # fmt: skip
        agreement = GaugeMetricFamily(
            "weir_model_accuracy_top1_agreement", "Share of validation rows whose top-1 matches fp32's.",
            labels=["model", "version", "precision"],
        )  # fmt: skip
        for model, version, report in self._reports():
            diff.add_metric([model, version, report.precision], report.max_abs_diff)
            agreement.add_metric([model, version, report.precision], report.top1_agreement)
        yield diff
        yield agreement
