"""One ModelInferRequest per worker, built from the model's metadata and serialized once.

Shapes: a ``-1`` in the batch dimension becomes ``--batch-rows``, any other ``-1`` becomes 1. The batch
dimension is the first one when the model's config says ``max_batch_size > 0``; without a config
(ModelConfig is a Triton extension) a leading ``-1`` is taken as the batch dimension.

Payloads: ``raw`` puts every tensor in ``raw_input_contents``; ``typed`` fills ``contents``. FP16 and
BF16 have no typed field, and the protocol forbids mixing raw and typed inputs in one request, so a
typed request with such an input goes raw as a whole (``PlannedRequest.payload`` says which).

The client is not part of the server: it uses tritonclient's protos, not Weir's.
"""

from __future__ import annotations

import string
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PAYLOADS = ("raw", "typed")
INPUT_DATA = ("random", "zeros")
BYTES_ELEMENT_MAX = 16  # random BYTES elements are 1..16 printable ASCII characters
_BYTES_ALPHABET = np.frombuffer((string.ascii_lowercase + " ").encode(), dtype=np.uint8)

# V2 datatype -> (numpy dtype of the raw little-endian bytes, typed contents field or None if raw only)
DATATYPES: dict[str, tuple[str, str | None]] = {
    "BOOL": ("bool", "bool_contents"),
    "UINT8": ("<u1", "uint_contents"),
    "UINT16": ("<u2", "uint_contents"),
    "UINT32": ("<u4", "uint_contents"),
    "UINT64": ("<u8", "uint64_contents"),
    "INT8": ("<i1", "int_contents"),
    "INT16": ("<i2", "int_contents"),
    "INT32": ("<i4", "int_contents"),
    "INT64": ("<i8", "int64_contents"),
    "FP16": ("<f2", None),
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
    "BF16": ("<u2", None),  # numpy has no bfloat16: the upper 16 bits of an FP32
    "BYTES": ("object", "bytes_contents"),
}


class PayloadError(ValueError):
    """The model's inputs cannot be turned into a request with the options given."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # as the server declares it; -1 for a variable dimension


@dataclass(frozen=True)
class PlannedRequest:
    body: bytes
    payload: str  # what was actually sent: "raw" or "typed"
    shapes: dict[str, list[int]]


def specs_from_metadata(inputs: Iterable[Any]) -> list[InputSpec]:
    """From ModelMetadataResponse.inputs (TensorMetadata: name, datatype, shape)."""
    specs = [InputSpec(item.name, item.datatype, tuple(int(dim) for dim in item.shape)) for item in inputs]
    if not specs:
        raise PayloadError("the model's metadata lists no inputs")
    for spec in specs:
        if spec.datatype not in DATATYPES:
            raise PayloadError(f"input '{spec.name}': unsupported datatype {spec.datatype!r}")
    return specs


def concrete_shape(spec: InputSpec, batch_rows: int, max_batch_size: int | None) -> tuple[int, ...]:
    """The shape sent for ``spec``. ``max_batch_size`` None means the config is unknown."""
    has_batch_dimension = (max_batch_size or 0) > 0 if max_batch_size is not None else spec.shape[:1] == (-1,)
    shape = []
    for position, dim in enumerate(spec.shape):
        if dim >= 0:
            shape.append(dim)
        else:
            shape.append(batch_rows if has_batch_dimension and position == 0 else 1)
    return tuple(shape)


def check_batch_rows(batch_rows: int, max_batch_size: int | None) -> None:
    if max_batch_size is not None and max_batch_size > 0 and batch_rows > max_batch_size:
        raise PayloadError(f"--batch-rows {batch_rows} exceeds the model's max_batch_size {max_batch_size}")


def tensor_data(datatype: str, shape: Sequence[int], input_data: str, rng: np.random.Generator) -> np.ndarray:
    """Values for one input: ``zeros``, or ``random`` (floats in [0, 1), integers in [0, 16), random
    booleans, BYTES of 1..16 lowercase letters and spaces so UTF-8 models accept them)."""
    dtype_text, _ = DATATYPES[datatype]
    count = int(np.prod(shape, dtype=np.int64))
    if datatype == "BYTES":
        elements = np.empty(count, dtype=object)
        if input_data == "zeros":
            elements[:] = [b""] * count
        else:
            lengths = rng.integers(1, BYTES_ELEMENT_MAX + 1, size=count)
            elements[:] = [_BYTES_ALPHABET[rng.integers(0, _BYTES_ALPHABET.size, size=n)].tobytes() for n in lengths]
        return elements.reshape(shape)
    dtype = np.dtype(dtype_text)
    if input_data == "zeros":
        return np.zeros(shape, dtype=dtype)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if datatype == "BF16":
        floats = rng.random(size=shape, dtype=np.float32)
        return (floats.view(np.uint32) >> 16).astype(dtype)
    if dtype.kind == "f":
        return rng.random(size=shape).astype(dtype)
    return rng.integers(0, 16, size=shape).astype(dtype)


def raw_bytes(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":  # each element: 4-byte little-endian length, then the bytes
        return b"".join(struct.pack("<I", len(element)) + element for element in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=np.dtype(DATATYPES[datatype][0])).tobytes()


def build_request(
    model: str,
    version: str,
    specs: Sequence[InputSpec],
    *,
    max_batch_size: int | None,
    payload: str = "raw",
    batch_rows: int = 1,
    input_data: str = "random",
    seed: int = 0,
) -> PlannedRequest:
    """A serialized ModelInferRequest carrying every input, with no requested outputs (all of them)."""
    from tritonclient.grpc import service_pb2

    if payload not in PAYLOADS:
        raise PayloadError(f"payload must be one of {', '.join(PAYLOADS)}, got {payload!r}")
    if input_data not in INPUT_DATA:
        raise PayloadError(f"input data must be one of {', '.join(INPUT_DATA)}, got {input_data!r}")
    check_batch_rows(batch_rows, max_batch_size)
    raw = payload == "raw" or any(DATATYPES[spec.datatype][1] is None for spec in specs)
    rng = np.random.default_rng(seed)
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        shape = concrete_shape(spec, batch_rows, max_batch_size)
        array = tensor_data(spec.datatype, shape, input_data, rng)
        tensor = request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        shapes[spec.name] = list(shape)
        if raw:
            request.raw_input_contents.append(raw_bytes(spec.datatype, array))
            continue
        field = getattr(tensor.contents, DATATYPES[spec.datatype][1] or "")
        values = array.reshape(-1)
        field.extend(values.tolist() if spec.datatype != "BYTES" else list(values))
    return PlannedRequest(request.SerializeToString(), "raw" if raw else "typed", shapes)
