"""The bounds every number and file name in a model config must keep, checked once for the registry
(at upload) and the data plane (at load, including RepositoryModelLoad's ``config`` parameter).

A config is input from outside: a deployer's upload or a client's load request. Each number Weir acts
on sizes an allocation, a loop or a wait (priority levels allocate queues, dims size the warm-up
tensors, a queue delay holds requests), so each is bounded here, and each file a config names must
stay inside the model's directory. Fields Weir does not act on are reported as unsupported and never
used, so they need no bound. The bounds are fixed (not flags): the README's limits table lists them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from weir_proto.errors import InvalidArgumentError
from weir_proto.inference import messages as pb

MAX_BATCH_SIZE = 65_536  # max_batch_size
MAX_TENSORS = 256  # input, output: entries each
MAX_NAME_LENGTH = 256  # tensor, instance group and warm-up names
MAX_RANK = 16  # dims: entries per tensor
# dims: product per row (-1 counted as 1), and summed over the inputs; warm-up: batch x dims, summed
# over every sample (they are all held while the version warms up).
MAX_ELEMENTS = 64 * 1024 * 1024
MAX_INSTANCE_GROUPS = 16  # instance_group: entries
MAX_INSTANCES = 64  # instance_group[].count, and their sum
MAX_GPU_INDEX = 63  # instance_group[].gpus: each index
MAX_PREFERRED_BATCH_SIZES = 16  # dynamic_batching.preferred_batch_size: entries
MAX_QUEUE_DELAY_MICROSECONDS = 10_000_000  # dynamic_batching.max_queue_delay_microseconds (10 s)
MAX_PRIORITY_LEVELS = 64  # dynamic_batching.priority_levels
MAX_QUEUE_TIMEOUT_MICROSECONDS = 3_600_000_000  # queue policies' default_timeout_microseconds (1 h)
MAX_QUEUE_SIZE = 1_048_576  # queue policies' max_queue_size
MAX_VERSIONS = 64  # version_policy: latest.num_versions, specific.versions entries
MAX_WARMUPS = 16  # model_warmup: entries
MAX_WARMUP_COUNT = 100  # model_warmup[].count
MAX_PARAMETERS = 256  # parameters: entries
MAX_PARAMETER_LENGTH = 4096  # parameters: each key and value, in characters
MAX_FILENAME_LENGTH = 255  # default_model_filename
MAX_PATH_LENGTH = 1024  # model_warmup[].inputs[].input_data_file


def check_config_limits(config: pb.ModelConfig, source: str) -> None:
    """Raise ``InvalidArgumentError`` naming the field, the bound and the value for the first number
    or file name in ``config`` that is out of bounds. ``source`` prefixes the message (e.g.
    ``model 'm' config.pbtxt``)."""
    check = _Checker(source)
    check.range("max_batch_size", config.max_batch_size, 0, MAX_BATCH_SIZE)
    batch_limit = max(1, config.max_batch_size)
    for kind, tensors in (("input", config.input), ("output", config.output)):
        check.range(f"{kind} entries", len(tensors), 0, MAX_TENSORS, what="entries")
        for index, tensor in enumerate(tensors):
            check.name(f"{kind}[{index}].name", tensor.name)
            check.dims(f"{kind}[{index}].dims", tensor.dims)
    row_elements = sum(math.prod(1 if dim == -1 else dim for dim in tensor.dims) for tensor in config.input)
    check.range("input elements per row (all inputs, -1 as 1)", row_elements, 0, MAX_ELEMENTS)
    check.range("instance_group entries", len(config.instance_group), 0, MAX_INSTANCE_GROUPS, what="entries")
    for index, group in enumerate(config.instance_group):
        check.name(f"instance_group[{index}].name", group.name)
        check.range(f"instance_group[{index}].count", group.count, 0, MAX_INSTANCES)
        check.range(f"instance_group[{index}].gpus entries", len(group.gpus), 0, MAX_GPU_INDEX + 1, what="entries")
        for gpu in group.gpus:
            check.range(f"instance_group[{index}].gpus", gpu, 0, MAX_GPU_INDEX)
    instances = sum(max(1, group.count) for group in config.instance_group)
    check.range("instance_group count (sum over groups)", instances, 0, MAX_INSTANCES)
    if config.HasField("dynamic_batching"):
        _check_dynamic_batching(check, config.dynamic_batching, batch_limit)
    _check_version_policy(check, config.version_policy)
    check.range("parameters entries", len(config.parameters), 0, MAX_PARAMETERS, what="entries")
    for key, parameter in config.parameters.items():
        check.length(f"parameters key {key[:64]!r}", key, MAX_PARAMETER_LENGTH)
        check.length(f"parameters[{key[:64]!r}].string_value", parameter.string_value, MAX_PARAMETER_LENGTH)
    if config.default_model_filename:
        check_file_name("default_model_filename", config.default_model_filename, source)
    _check_warmup(check, config, batch_limit)


def check_file_name(field: str, name: str, source: str = "") -> str:
    """A plain file name (no directory part): what may name a file in a version directory."""
    prefix = f"{source}: field " if source else ""
    if (
        not name
        or len(name) > MAX_FILENAME_LENGTH
        or name in (".", "..")
        or any(character in name for character in "/\\\0")
    ):
        raise InvalidArgumentError(
            f"{prefix}{field}: expected a file name inside the version directory (no '/', '\\', '..', at most "
            f"{MAX_FILENAME_LENGTH} characters), got {_shown(name)}"
        )
    return name


def check_relative_path(field: str, path: str, source: str = "") -> str:
    """A relative path that cannot leave its directory by its text (symlinks are checked where the
    file is opened, by resolving it)."""
    prefix = f"{source}: field " if source else ""
    parts = PurePosixPath(path).parts
    if not path or len(path) > MAX_PATH_LENGTH or "\0" in path or "\\" in path or path.startswith("/") or ".." in parts:
        raise InvalidArgumentError(
            f"{prefix}{field}: expected a relative path inside the model's directory (not absolute, no '..', at "
            f"most {MAX_PATH_LENGTH} characters), got {_shown(path)}"
        )
    return path


def _check_dynamic_batching(check: _Checker, dynamic: Any, batch_limit: int) -> None:
    where = "dynamic_batching"
    sizes = dynamic.preferred_batch_size
    check.range(f"{where}.preferred_batch_size entries", len(sizes), 0, MAX_PREFERRED_BATCH_SIZES, what="entries")
    for size in sizes:
        check.range(f"{where}.preferred_batch_size", size, 1, batch_limit, bound_name="max(1, max_batch_size)")
    check.range(f"{where}.max_queue_delay_microseconds", dynamic.max_queue_delay_microseconds, 0,
                MAX_QUEUE_DELAY_MICROSECONDS)  # fmt: skip
    check.range(f"{where}.priority_levels", dynamic.priority_levels, 0, MAX_PRIORITY_LEVELS)
    levels = max(1, dynamic.priority_levels)
    check.range(f"{where}.default_priority_level", dynamic.default_priority_level, 0, levels,
                bound_name="priority_levels")  # fmt: skip
    _check_queue_policy(check, f"{where}.default_queue_policy", dynamic.default_queue_policy)
    check.range(f"{where}.priority_queue_policy entries", len(dynamic.priority_queue_policy), 0, levels,
                what="entries", bound_name="priority_levels")  # fmt: skip
    for level, policy in dynamic.priority_queue_policy.items():
        check.range(f"{where}.priority_queue_policy level", level, 1, levels, bound_name="priority_levels")
        _check_queue_policy(check, f"{where}.priority_queue_policy[{level}]", policy)


def _check_queue_policy(check: _Checker, where: str, policy: Any) -> None:
    check.range(f"{where}.default_timeout_microseconds", policy.default_timeout_microseconds, 0,
                MAX_QUEUE_TIMEOUT_MICROSECONDS)  # fmt: skip
    check.range(f"{where}.max_queue_size", policy.max_queue_size, 0, MAX_QUEUE_SIZE)


def _check_version_policy(check: _Checker, policy: Any) -> None:
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest":
        check.range("version_policy.latest.num_versions", policy.latest.num_versions, 0, MAX_VERSIONS)
    elif choice == "specific":
        versions = policy.specific.versions
        check.range("version_policy.specific.versions entries", len(versions), 0, MAX_VERSIONS, what="entries")
        for version in versions:
            check.range("version_policy.specific.versions", version, 0, 2**63 - 1)


def _check_warmup(check: _Checker, config: pb.ModelConfig, batch_limit: int) -> None:
    check.range("model_warmup entries", len(config.model_warmup), 0, MAX_WARMUPS, what="entries")
    batched = config.max_batch_size > 0
    total = 0
    for index, warmup in enumerate(config.model_warmup):
        where = f"model_warmup[{index}]"
        check.name(f"{where}.name", warmup.name)
        check.range(f"{where}.count", warmup.count, 0, MAX_WARMUP_COUNT)
        check.range(f"{where}.batch_size", warmup.batch_size, 0, batch_limit, bound_name="max(1, max_batch_size)")
        batch = max(1, warmup.batch_size) if batched else 1
        for name, sample in warmup.inputs.items():
            field = f"{where}.inputs[{_shown(name, 64)}]"
            check.name(f"{where}.inputs key", name)
            check.range(f"{field}.dims entries", len(sample.dims), 0, MAX_RANK, what="entries")
            for dim in sample.dims:
                check.range(f"{field}.dims", dim, 1, MAX_ELEMENTS)
            elements = batch * math.prod(sample.dims)
            check.range(f"{field} elements (batch_size x dims)", elements, 0, MAX_ELEMENTS)
            total += elements
            check.range("model_warmup elements (all samples, batch_size x dims)", total, 0, MAX_ELEMENTS)
            if sample.WhichOneof("input_data_type") == "input_data_file":
                check_relative_path(f"{field}.input_data_file", sample.input_data_file, check.source)


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def range(self, field: str, value: int, low: int, high: int, what: str = "", bound_name: str = "") -> None:
        if low <= value <= high:
            return
        bound = f"{high} ({bound_name})" if bound_name else str(high)
        noun = f" {what}" if what else ""
        raise InvalidArgumentError(
            f"{self.source}: field {field}: expected {low}..{bound}{noun} (Weir's limit), got {value}"
        )

    def length(self, field: str, text: str, limit: int) -> None:
        if len(text) > limit:
            raise InvalidArgumentError(
                f"{self.source}: field {field}: expected at most {limit} characters (Weir's limit), got {len(text)}"
            )

    def name(self, field: str, text: str) -> None:
        self.length(field, text, MAX_NAME_LENGTH)

    def dims(self, field: str, dims: Sequence[int]) -> None:
        self.range(f"{field} entries", len(dims), 0, MAX_RANK, what="entries")
        for dim in dims:
            if dim != -1 and not 1 <= dim <= MAX_ELEMENTS:
                raise InvalidArgumentError(
                    f"{self.source}: field {field}: expected -1 or a size from 1 to {MAX_ELEMENTS} (Weir's limit), "
                    f"got {_shown(str(list(dims)))}"
                )
        elements = math.prod(1 if dim == -1 else dim for dim in dims)
        if elements > MAX_ELEMENTS:
            raise InvalidArgumentError(
                f"{self.source}: field {field}: expected at most {MAX_ELEMENTS} elements per row (Weir's limit), "
                f"got {_shown(str(list(dims)))} ({elements} elements)"
            )


def _shown(text: str, limit: int = 128) -> str:
    """A config string as an error message shows it: quoted, and cut short when long."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
