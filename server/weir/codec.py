"""Proto <-> numpy: decoding and validating ModelInferRequest, encoding ModelInferResponse.

Raw contents are the fast path: each input becomes a zero-copy ``np.frombuffer`` view of the
request's bytes. Validation runs against the model's signature and names the input, the expected
and the received datatype, shape or byte size.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weir.datatypes import DataType
from weir.errors import InvalidArgumentError
from weir.model_config import ModelSignature, TensorSpec
from weir_proto.inference import messages as pb

_LENGTH_PREFIX = struct.Struct("<I")
_ACCEPTED_SHAPES_LIMIT = 1024  # validated (input, shape) pairs remembered per model version


@dataclass(slots=True)
class DecodedRequest:
    model_name: str
    model_version: str
    request_id: str
    inputs: dict[str, np.ndarray]  # by input name, shaped as sent (batch dim included)
    requested_outputs: list[str]  # output names in the order the response lists them
    batch_size: int  # rows in the batch dimension; 1 for models that do not batch
    parameters: dict[str, Any] = field(default_factory=dict)


def parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def decode_request(
    request: pb.ModelInferRequest, signature: ModelSignature, max_tensor_elements: int
) -> DecodedRequest:
    """Validate ``request`` against ``signature`` and return its inputs as numpy arrays."""
    specs = signature.inputs_by_name
    accepted_shapes = signature.accepted_shapes
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise InvalidArgumentError(
            f"raw_input_contents: expected one entry per input ({len(request.inputs)}), got {len(raw_contents)}"
        )
    arrays: dict[str, np.ndarray] = {}
    batch_size: int | None = None
    for index, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgumentError(
                f"inputs[{index}].name: expected one of {sorted(specs)}, got unexpected input '{tensor.name}'"
            )
        if tensor.name in arrays:
            raise InvalidArgumentError(f"inputs[{index}].name: input '{tensor.name}' is given more than once")
        if tensor.datatype != spec.datatype.name:
            raise InvalidArgumentError(
                f"input '{tensor.name}' datatype: expected {spec.datatype.name}, got '{tensor.datatype}'"
            )
        shape = tuple(tensor.shape)
        known = accepted_shapes.get((tensor.name, shape))
        if known is None:
            known = _check_shape(tensor.name, shape, spec, signature)
            if len(accepted_shapes) < _ACCEPTED_SHAPES_LIMIT:
                accepted_shapes[(tensor.name, shape)] = known
        rows, element_count = known
        if element_count > max_tensor_elements:
            raise InvalidArgumentError(
                f"input '{tensor.name}' shape {list(shape)}: expected at most {max_tensor_elements} elements, "
                f"got {element_count}"
            )
        if batch_size is None:
            batch_size = rows
        elif rows != batch_size:
            raise InvalidArgumentError(
                f"input '{tensor.name}' shape: expected batch size {batch_size} like the other inputs, got {rows}"
            )
        has_typed = tensor.HasField("contents")
        if raw_contents:
            if has_typed:
                raise InvalidArgumentError(
                    f"input '{tensor.name}': contents and raw_input_contents are both set; "
                    "when any input is raw, every input must be raw"
                )
            arrays[tensor.name] = _decode_raw(tensor.name, spec.datatype, shape, element_count, raw_contents[index])
        else:
            arrays[tensor.name] = _decode_typed(tensor.name, spec.datatype, shape, element_count, tensor.contents)
    missing = [spec.name for spec in signature.inputs if spec.name not in arrays and not spec.optional]
    if missing:
        raise InvalidArgumentError(
            f"inputs: expected {[spec.name for spec in signature.inputs]}, got {list(arrays)} (missing {missing})"
        )
    return DecodedRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        request_id=request.id,
        inputs=arrays,
        requested_outputs=_requested_outputs(request, signature),
        batch_size=batch_size if batch_size is not None and signature.batched else 1,
        parameters={key: parameter_value(value) for key, value in request.parameters.items()}
        if request.parameters
        else {},
    )


def _check_shape(name: str, shape: tuple[int, ...], spec: TensorSpec, signature: ModelSignature) -> tuple[int, int]:
    """(rows, elements) of a valid shape for ``spec``; raises naming what was expected otherwise."""
    expected = signature.full_shape(spec)
    if any(dim < 0 for dim in shape):
        raise InvalidArgumentError(f"input '{name}' shape: expected non-negative dimensions, got {list(shape)}")
    if len(shape) != len(expected) or any(want not in (-1, got) for want, got in zip(expected, shape, strict=False)):
        raise InvalidArgumentError(f"input '{name}' shape: expected {expected}, got {list(shape)}")
    element_count = math.prod(shape)  # Python ints: a huge shape cannot overflow
    if not signature.batched:
        return 1, element_count
    rows = shape[0]
    if not 1 <= rows <= signature.max_batch_size:
        raise InvalidArgumentError(
            f"input '{name}' shape {list(shape)}: expected a batch size of 1 to {signature.max_batch_size} "
            f"(max_batch_size), got {rows}"
        )
    return rows, element_count


def _decode_raw(name: str, datatype: DataType, shape: tuple[int, ...], element_count: int, raw: bytes) -> np.ndarray:
    if datatype.name == "BYTES":
        return _decode_bytes_elements(name, raw, element_count).reshape(shape)
    expected_size = element_count * datatype.element_size
    if len(raw) != expected_size:
        raise InvalidArgumentError(
            f"input '{name}' raw_input_contents: expected {expected_size} bytes "
            f"({element_count} {datatype.name} elements of shape {list(shape)}), got {len(raw)}"
        )
    # A view of the request's bytes: no copy on the way in.
    return np.frombuffer(raw, dtype=datatype.numpy_dtype).reshape(shape)


def _decode_bytes_elements(name: str, raw: bytes, element_count: int) -> np.ndarray:
    elements = np.empty(element_count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for index in range(element_count):
        if offset + 4 > len(view):
            raise InvalidArgumentError(
                f"input '{name}' raw_input_contents: expected {element_count} length-prefixed BYTES elements, "
                f"the data ends after {index}"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidArgumentError(
                f"input '{name}' raw_input_contents: element {index} declares {length} bytes, "
                f"only {len(view) - offset} remain"
            )
        elements[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InvalidArgumentError(
            f"input '{name}' raw_input_contents: expected {element_count} BYTES elements, "
            f"got {len(view) - offset} bytes left over after them"
        )
    return elements


def _decode_typed(
    name: str, datatype: DataType, shape: tuple[int, ...], element_count: int, contents: pb.InferTensorContents
) -> np.ndarray:
    if datatype.contents_field is None:
        raise InvalidArgumentError(
            f"input '{name}': {datatype.name} travels only in raw_input_contents, got typed contents"
        )
    values = getattr(contents, datatype.contents_field)
    if len(values) != element_count:
        raise InvalidArgumentError(
            f"input '{name}' contents.{datatype.contents_field}: expected {element_count} values for shape "
            f"{list(shape)}, got {len(values)}"
        )
    if datatype.name == "BYTES":
        array = np.empty(element_count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    target = datatype.numpy_dtype
    if target.kind in "iu" and target.itemsize < 8:
        # INT8/16 and UINT8/16 share 32-bit fields: check the range, as a cast would wrap silently.
        wide = np.array(values, dtype=np.int64)
        limits = np.iinfo(target)
        if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
            raise InvalidArgumentError(
                f"input '{name}' contents.{datatype.contents_field}: expected values in "
                f"[{limits.min}, {limits.max}] for {datatype.name}, got {wide.min()}..{wide.max()}"
            )
        return wide.astype(target).reshape(shape)
    return np.array(values, dtype=target).reshape(shape)


def _requested_outputs(request: pb.ModelInferRequest, signature: ModelSignature) -> list[str]:
    if not request.outputs:
        return signature.output_names
    known = signature.outputs_by_name
    names: list[str] = []
    for index, requested in enumerate(request.outputs):
        if requested.name not in known:
            raise InvalidArgumentError(
                f"outputs[{index}].name: expected one of {sorted(known)}, got unknown output '{requested.name}'"
            )
        if requested.name not in names:
            names.append(requested.name)
    return names


def encode_bytes_elements(array: np.ndarray) -> bytes:
    """BYTES tensor -> raw form: each element as a 4-byte little-endian length, then its bytes."""
    parts: list[bytes] = []
    for element in array.reshape(-1):
        data = element.encode("utf-8") if isinstance(element, str) else bytes(element)
        parts.append(_LENGTH_PREFIX.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Sequence[tuple[TensorSpec, np.ndarray]],
    parameters: Mapping[str, pb.InferParameter] | None = None,
) -> pb.ModelInferResponse:
    """Outputs always travel as raw_output_contents, as Triton sends them (the fast path)."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    if parameters:
        for key, value in parameters.items():
            response.parameters[key].CopyFrom(value)
    raw_contents = response.raw_output_contents
    for spec, array in outputs:
        tensor = response.outputs.add(name=spec.name, datatype=spec.datatype.name)
        tensor.shape.extend(array.shape)
        if spec.datatype.name == "BYTES":
            raw_contents.append(encode_bytes_elements(array))
        else:
            raw_contents.append(np.ascontiguousarray(array, dtype=spec.datatype.numpy_dtype).tobytes())
    return response


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_MODEL_NAME_TAG = b"\x0a"  # ModelInferResponse field 1 (model_name), length-delimited
_ID_TAG = b"\x1a"  # ModelInferResponse field 3 (id), length-delimited


_PARAMETERS_TAG = b"\x22"  # ModelInferResponse field 4 (parameters map), length-delimited entries
_ENTRY_KEY_TAG = b"\x0a"  # map entry field 1 (key)
_ENTRY_VALUE_TAG = b"\x12"  # map entry field 2 (value: InferParameter)
_STRING_PARAM_TAG = b"\x1a"  # InferParameter field 3 (string_param)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def with_caller_fields(
    serialized: bytes, model_name: str, request_id: str, string_parameters: Mapping[str, str] | None = None
) -> bytes:
    """A serialized ModelInferResponse stored without ``model_name``, ``id`` and per-caller
    parameters, completed for one caller by appending those fields (protobuf reads fields in any
    order; map entries merge), so a cache hit is answered without parsing and re-serializing."""
    parts = [serialized]
    for tag, text in ((_MODEL_NAME_TAG, model_name), (_ID_TAG, request_id)):
        if text:
            encoded = text.encode("utf-8")
            parts += (tag, _varint(len(encoded)), encoded)
    for key, value in (string_parameters or {}).items():
        parameter = _length_delimited(_STRING_PARAM_TAG, value.encode("utf-8"))
        entry = _length_delimited(_ENTRY_KEY_TAG, key.encode("utf-8")) + _length_delimited(_ENTRY_VALUE_TAG, parameter)
        parts.append(_length_delimited(_PARAMETERS_TAG, entry))
    return b"".join(parts)
