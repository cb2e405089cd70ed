"""Warm-up inputs: from config.pbtxt's ``model_warmup`` or, when it has none, zero-filled samples
at a few batch sizes, each run several times (see ``DEFAULT_RUNS_PER_BATCH_SIZE``). A version reports
ready only after its warm-up ran and produced outputs that match its config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from weir import datatypes
from weir.errors import ModelConfigError
from weir.model_config import ModelSignature, resolve_inside
from weir_proto.inference import messages as pb

# TorchScript's profiling executor runs a new input shape unoptimised twice before it specialises,
# and after two static specialisations compiles one graph for any batch size: without these runs the
# first requests of each new batch size take milliseconds instead of microseconds, on real traffic
# (a canary's p99 over a few hundred requests is its second-slowest call: a good version was rolled back).
DEFAULT_RUNS_PER_BATCH_SIZE = 3
DEFAULT_LARGEST_WARMUP_BATCH = 8


def warmup_samples(
    config: pb.ModelConfig, signature: ModelSignature, model_dir: Path
) -> list[tuple[dict[str, np.ndarray], int]]:
    """(inputs, batch size) pairs to run, in order."""
    if not config.model_warmup:
        return _default_samples(config, signature)
    samples: list[tuple[dict[str, np.ndarray], int]] = []
    for warmup in config.model_warmup:
        batch_size = max(1, warmup.batch_size) if signature.batched else 1
        inputs: dict[str, np.ndarray] = {}
        for name, sample in warmup.inputs.items():
            datatype = datatypes.BY_CONFIG_NAME[pb.DataType.Name(sample.data_type)]
            shape = ([batch_size] if signature.batched else []) + list(sample.dims)
            source = sample.WhichOneof("input_data_type")
            if source == "input_data_file":
                sample_dims = list(sample.dims)
                array = _read_sample_file(model_dir, warmup.name, name, sample.input_data_file, datatype, sample_dims)
                if signature.batched:
                    array = np.repeat(array[np.newaxis, ...], batch_size, axis=0)
            else:
                array = filled_array(datatype.name, shape, zero=source != "random_data")
            inputs[name] = array
        for _ in range(max(1, warmup.count)):
            samples.append((inputs, batch_size))
    return samples


def _default_samples(config: pb.ModelConfig, signature: ModelSignature) -> list[tuple[dict[str, np.ndarray], int]]:
    """Zeros at batch sizes 1, 2 and min(max_batch_size, 8), each run ``DEFAULT_RUNS_PER_BATCH_SIZE`` times
    (variable dims become 1); a model without a batch dimension runs its one sample as often."""
    sizes = [1]
    if signature.batched:
        sizes = sorted({size for size in (1, 2, min(config.max_batch_size, DEFAULT_LARGEST_WARMUP_BATCH)) if size >= 1})
    samples: list[tuple[dict[str, np.ndarray], int]] = []
    for batch_size in sizes:
        zeros = {}
        for spec in signature.inputs:
            shape = signature.full_shape(spec)
            if signature.batched:
                shape = [batch_size, *shape[1:]]
            zeros[spec.name] = filled_array(spec.datatype.name, shape, zero=True)
        samples.extend([(zeros, batch_size)] * DEFAULT_RUNS_PER_BATCH_SIZE)
    return samples


def _read_sample_file(
    model_dir: Path, warmup_name: str, input_name: str, relative: str, datatype: datatypes.DataType, shape: list[int]
) -> np.ndarray:
    """A warm-up sample from ``<model>/warmup/<relative>``: a regular file inside the model's directory
    (no absolute path, '..' or symlink out of it), exactly one sample's bytes long, read no further."""
    where = f"model_warmup '{warmup_name[:128]}' input '{input_name[:128]}'"
    path = resolve_inside(model_dir / "warmup", relative, f"{where}: input_data_file", within=model_dir)
    if datatype.numpy_dtype is None or datatype.numpy_dtype.hasobject:
        raise ModelConfigError(f"{where}: input_data_file: expected a fixed-size datatype, got {datatype.name}")
    expected = datatype.numpy_dtype.itemsize * math.prod(shape)
    try:
        if not path.is_file():
            raise ModelConfigError(f"{where}: input_data_file {relative!r}: expected a regular file in {path.parent}")
        with path.open("rb") as handle:
            raw = handle.read(expected + 1)
    except OSError as error:
        raise ModelConfigError(f"{where}: cannot read input_data_file {relative!r}: {error.strerror}") from error
    if len(raw) != expected:
        raise ModelConfigError(
            f"{where}: input_data_file {relative!r}: expected {expected} bytes (dims {shape} of {datatype.name}), "
            f"got {'more' if len(raw) > expected else len(raw)}"
        )
    return np.frombuffer(raw, dtype=datatype.numpy_dtype).reshape(shape)


def filled_array(datatype_name: str, shape: list[int], zero: bool) -> np.ndarray:
    """Zeros, or seeded values (standard normal for floating types), of a shape whose -1s become 1;
    also the accuracy gate's synthetic validation rows."""
    concrete = [1 if dim < 0 else dim for dim in shape]
    datatype = datatypes.BY_NAME[datatype_name]
    if datatype_name == "BYTES":
        array = np.empty(int(np.prod(concrete)), dtype=object)
        array[:] = [b"" if zero else b"warmup"] * array.size
        return array.reshape(concrete)
    if zero:
        return np.zeros(concrete, dtype=datatype.numpy_dtype)
    generator = np.random.default_rng(0)
    if datatype.numpy_dtype.kind == "f":
        return generator.standard_normal(concrete).astype(datatype.numpy_dtype)
    if datatype_name == "BF16":
        return np.zeros(concrete, dtype=datatype.numpy_dtype)
    return generator.integers(0, 2, size=concrete).astype(datatype.numpy_dtype)
