"""config.pbtxt: parsing, validation, the fields Weir acts on, and the model's signature.

Weir's ModelConfig message carries Triton's whole schema, so any Triton config.pbtxt parses; the
fields Weir does not act on are reported (logged and shown in RepositoryIndex) instead of being
dropped silently. Everything the request path needs from a config is computed once here into a
``ModelSignature``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message

from weir import datatypes
from weir.datatypes import DataType
from weir.errors import InternalError, InvalidArgumentError, ModelConfigError
from weir_proto.inference import messages as pb
from weir_proto.model_config_limits import check_config_limits, check_relative_path

# Field paths Weir honours; a path covers everything beneath it.
SUPPORTED_FIELDS = frozenset(
    {
        "name",
        "platform",
        "backend",
        "version_policy",
        "max_batch_size",
        "input.name",
        "input.data_type",
        "input.dims",
        "input.optional",
        "output.name",
        "output.data_type",
        "output.dims",
        "instance_group.name",
        "instance_group.count",
        "instance_group.kind",
        "instance_group.gpus",
        "default_model_filename",
        "parameters",
        "model_warmup",
        "dynamic_batching",
        "response_cache",
    }
)

# Triton names for the PyTorch backend; Weir's torch backend answers to all of them.
TORCH_BACKEND_NAMES = frozenset({"pytorch", "torch", "weir_torch"})
TORCH_PLATFORM_NAMES = frozenset({"pytorch_libtorch", "torch_export"})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: DataType
    dims: tuple[int, ...]  # without the batch dimension when the model batches; -1 = any size
    optional: bool = False


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # 0 = the model does not batch: shapes are full shapes

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def full_shape(self, spec: TensorSpec) -> list[int]:
        """The shape as metadata reports it: a leading -1 for the batch dimension if any."""
        return [-1, *spec.dims] if self.batched else list(spec.dims)

    # Computed once per loaded version, not per request (cached_property writes the instance
    # dict directly, so it works on a frozen dataclass).
    @functools.cached_property
    def inputs_by_name(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.inputs}

    @functools.cached_property
    def outputs_by_name(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.outputs}

    @functools.cached_property
    def output_names(self) -> list[str]:
        """Every output, in config order (shared: callers must not modify it)."""
        return [spec.name for spec in self.outputs]

    @functools.cached_property
    def accepted_shapes(self) -> dict[tuple[str, tuple[int, ...]], tuple[int, int]]:
        """(input name, shape) -> (rows, elements) for shapes that passed validation: clients send the
        same few shapes over and over, so each is checked once (the codec bounds the memo's size)."""
        return {}


def parse_config_text(text: str, source: str) -> pb.ModelConfig:
    config = pb.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ModelConfigError(f"{source}: cannot parse as ModelConfig text format: {error}") from error
    return config


def load_config_file(path: Path) -> pb.ModelConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ModelConfigError(f"{path}: config.pbtxt is missing") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ModelConfigError(f"{path}: cannot read: {error}") from error
    return parse_config_text(text, str(path))


def unsupported_fields(config: Message) -> list[str]:
    """Paths of fields set in ``config`` that Weir does not act on, e.g. ``sequence_batching``."""
    found: list[str] = []
    _collect_unsupported(config, "", found)
    return sorted(set(found))


def _collect_unsupported(message: Message, prefix: str, found: list[str]) -> None:
    for field_descriptor, value in message.ListFields():
        path = f"{prefix}{field_descriptor.name}"
        if path in SUPPORTED_FIELDS:
            continue
        is_map = field_descriptor.message_type is not None and field_descriptor.message_type.GetOptions().map_entry
        if field_descriptor.message_type is None or is_map:
            found.append(path)
            continue
        elements: Iterable[Message] = value if field_descriptor.is_repeated else [value]
        before = len(found)
        for element in elements:
            _collect_unsupported(element, path + ".", found)
        if len(found) == before and not any(s.startswith(path + ".") for s in SUPPORTED_FIELDS):
            found.append(path)  # an empty but present message, e.g. `sequence_batching {}`


def normalize_config(config: pb.ModelConfig, model_name: str, source: str = "") -> pb.ModelConfig:
    """Validate a parsed config for the model directory ``model_name`` and fill Triton's
    auto-completed fields (name, backend, platform, one instance group), returning a copy. Every
    number and file name is held to ``weir_proto.model_config_limits``. ``source`` names where the
    config came from in messages (default: the model's config.pbtxt)."""
    normalized = pb.ModelConfig()
    normalized.CopyFrom(config)
    source = source or f"model '{model_name}' config.pbtxt"
    if normalized.name and normalized.name != model_name:
        raise ModelConfigError(
            f"{source}: field name: expected the model directory's name '{model_name}', got {normalized.name[:128]!r}"
        )
    normalized.name = model_name
    backend, platform = normalized.backend, normalized.platform
    if backend and backend not in TORCH_BACKEND_NAMES:
        raise ModelConfigError(
            f"{source}: field backend: expected one of {sorted(TORCH_BACKEND_NAMES)}, got '{backend}'"
        )
    if platform and platform not in TORCH_PLATFORM_NAMES:
        raise ModelConfigError(
            f"{source}: field platform: expected one of {sorted(TORCH_PLATFORM_NAMES)}, got '{platform}'"
        )
    normalized.backend = "pytorch"
    normalized.platform = platform or "pytorch_libtorch"
    if normalized.max_batch_size < 0:
        raise ModelConfigError(f"{source}: field max_batch_size: expected 0 or more, got {normalized.max_batch_size}")
    if not normalized.input:
        raise ModelConfigError(f"{source}: field input: expected at least one input, got none")
    if not normalized.output:
        raise ModelConfigError(f"{source}: field output: expected at least one output, got none")
    _check_tensors(source, "input", normalized.input)
    _check_tensors(source, "output", normalized.output)
    if not normalized.instance_group:
        normalized.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
    for index, group in enumerate(normalized.instance_group):
        if group.count == 0:
            group.count = 1
        if group.count < 0:
            raise ModelConfigError(
                f"{source}: field instance_group[{index}].count: expected 1 or more, got {group.count}"
            )
    try:
        check_config_limits(normalized, source)
    except InvalidArgumentError as error:
        raise ModelConfigError(error.message) from error
    _check_warmup(source, normalized)
    if normalized.version_policy.WhichOneof("policy_choice") is None:
        normalized.version_policy.latest.num_versions = 1
    return normalized


def _check_tensors(source: str, kind: str, tensors: Sequence[Any]) -> None:
    seen: set[str] = set()
    for index, tensor in enumerate(tensors):
        where = f"{source}: field {kind}[{index}]"
        if not tensor.name:
            raise ModelConfigError(f"{where}.name: expected a non-empty name, got ''")
        if tensor.name in seen:
            raise ModelConfigError(f"{where}.name: expected a unique name, got '{tensor.name}' twice")
        seen.add(tensor.name)
        config_type = pb.DataType.Name(tensor.data_type)
        if config_type not in datatypes.BY_CONFIG_NAME:
            raise ModelConfigError(f"{where}.data_type: expected one of TYPE_BOOL..TYPE_BF16, got {config_type}")
        for dim in tensor.dims:
            if dim != -1 and dim <= 0:
                raise ModelConfigError(f"{where}.dims: expected -1 or a positive size, got {list(tensor.dims)}")


def _check_warmup(source: str, config: pb.ModelConfig) -> None:
    """Warm-up samples must feed every required input with its declared datatype and a concrete
    shape that fits (Triton's rule), so a bad sample fails here with a message, not mid-load."""
    inputs = {tensor.name: tensor for tensor in config.input}
    for index, warmup in enumerate(config.model_warmup):
        where = f"{source}: field model_warmup[{index}]"
        missing = [name for name, tensor in inputs.items() if name not in warmup.inputs and not tensor.optional]
        if missing:
            raise ModelConfigError(f"{where}.inputs: expected a sample for every input, missing {missing}")
        for name, sample in warmup.inputs.items():
            if name not in inputs:
                raise ModelConfigError(f"{where}.inputs: expected one of {sorted(inputs)}, got unknown input '{name}'")
            declared = inputs[name]
            if sample.data_type != declared.data_type:
                raise ModelConfigError(
                    f"{where}.inputs['{name}'].data_type: expected {pb.DataType.Name(declared.data_type)}, "
                    f"got {pb.DataType.Name(sample.data_type)}"
                )
            dims, declared_dims = list(sample.dims), list(declared.dims)
            if len(dims) != len(declared_dims) or any(
                dim <= 0 or want not in (-1, dim) for want, dim in zip(declared_dims, dims, strict=False)
            ):
                raise ModelConfigError(
                    f"{where}.inputs['{name}'].dims: expected concrete dims fitting {declared_dims}, got {dims}"
                )


def resolve_inside(directory: Path, relative: str, field: str, within: Path | None = None) -> Path:
    """``directory / relative``, refused unless the text is a relative path without '..' and the file,
    symlinks followed, lies inside ``within`` (default: ``directory``): a config never reaches a file
    outside its model's directory. The path is returned unresolved (its name still says its kind)."""
    try:
        check_relative_path(field, relative)
    except InvalidArgumentError as error:
        raise ModelConfigError(error.message) from error
    path = directory / relative
    try:
        inside = path.resolve().is_relative_to((within or directory).resolve())
    except (OSError, RuntimeError) as error:  # a symlink loop (RuntimeError before Python 3.13)
        raise ModelConfigError(f"{field}: cannot resolve {relative!r}: {error}") from error
    if not inside:
        raise ModelConfigError(
            f"{field}: expected a file inside the model's directory {within or directory}, got {relative!r}, "
            "which resolves outside it (a symlink out of the directory)"
        )
    return path


def signature_of(config: pb.ModelConfig) -> ModelSignature:
    """The signature of a normalized config."""

    def spec(tensor: pb.ModelInput | pb.ModelOutput, optional: bool) -> TensorSpec:
        datatype = datatypes.BY_CONFIG_NAME[pb.DataType.Name(tensor.data_type)]
        return TensorSpec(tensor.name, datatype, tuple(tensor.dims), optional)

    return ModelSignature(
        inputs=tuple(spec(tensor, tensor.optional) for tensor in config.input),
        outputs=tuple(spec(tensor, False) for tensor in config.output),
        max_batch_size=config.max_batch_size,
    )


def select_versions(policy: pb.ModelVersionPolicy, available: Sequence[int]) -> tuple[list[int], list[str]]:
    """Versions to serve under ``policy`` out of the ``available`` version directories, and the
    problems to report (a specific version that does not exist)."""
    ordered = sorted(set(available))
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return ordered, []
    if choice == "specific":
        wanted = sorted(set(policy.specific.versions))
        missing = [
            f"version {version} is listed in version_policy but has no directory"
            for version in wanted
            if version not in ordered
        ]
        return [version for version in wanted if version in ordered], missing
    count = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions > 0 else 1
    return ordered[-count:], []


def conform_outputs(
    signature: ModelSignature, outputs: dict[str, np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
    """Check the backend's outputs against the config's shapes (catching a model/config mismatch
    with a clear message instead of sending a wrong tensor) and give flat BYTES outputs their
    configured shape."""
    specs = signature.outputs_by_name
    for name, array in outputs.items():
        spec = specs[name]
        expected = [batch_size, *spec.dims] if signature.batched else list(spec.dims)
        if spec.datatype.name == "BYTES" and array.ndim == 1 and len(expected) > 1 and expected.count(-1) <= 1:
            # On failure the shape check just below reports the shape the model really produced.
            with contextlib.suppress(ValueError):
                array = outputs[name] = array.reshape(expected)
        shape = list(array.shape)
        if len(shape) != len(expected) or any(
            want not in (-1, got) for want, got in zip(expected, shape, strict=False)
        ):
            raise InternalError(f"output '{name}': the config declares shape {expected}, the model returned {shape}")
    return outputs
