"""Proto <-> numpy: decoding and validating ModelInferRequest, encoding ModelInferResponse.

Raw contents are the fast path: each input becomes a zero-copy ``np.frombuffer`` view of the
request's bytes. Validation runs against the model's signature and names the input, the expected
and the received datatype, shape or byte size.

Every request is validated completely here, before it is queued: a request that would fail in the
model call would otherwise fail every request batched with it. Sizes are checked against the bytes
the request really carries before anything is allocated, so memory stays in proportion to the
message (a BYTES element takes at least its 4-byte length prefix), and client strings quoted in
errors are clipped (``errors.clip``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weir.datatypes import DataType
from weir.errors import InvalidArgumentError, clip, clip_repr
from weir.model_config import ModelSignature, TensorSpec
from weir_proto.inference import messages as pb

_LENGTH_PREFIX = struct.Struct("<I")
_ACCEPTED_SHAPES_LIMIT = 1024  # validated (input, shape) pairs remembered per model version
_PREFIX_SIZE = _LENGTH_PREFIX.size  # the least a BYTES element takes on the wire

DEFAULT_MAX_BYTES_ELEMENTS = 1 << 20
"""Most elements one BYTES input tensor may have (``--max-bytes-elements``). Each element becomes a
Python ``bytes`` object (~40 bytes of overhead for a 5-byte wire element), so this bounds a BYTES
tensor's decoded size far below what ``max_tensor_elements`` allows for numeric tensors."""

MAX_DIMS = 64  # numpy's own limit on dimensions; a longer shape is refused before it is copied

# Protocol extensions Weir does not implement, refused rather than ignored: each changes what the
# answer means (classification labels instead of the tensor, data in a shared-memory region).
SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
CLASSIFICATION_PARAMETER = "classification"
BINARY_DATA_PARAMETER = "binary_data"  # per input/output tensor (HTTP's binary tensor extension)
BINARY_DATA_OUTPUT_PARAMETER = "binary_data_output"  # per request: the default of every output


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
    request: pb.ModelInferRequest,
    signature: ModelSignature,
    max_tensor_elements: int,
    *,
    max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
    bytes_as_text: bool = False,
) -> DecodedRequest:
    """Validate ``request`` against ``signature`` and return its inputs as numpy arrays.

    ``bytes_as_text``: the model receives BYTES inputs as text, so each element must be UTF-8;
    checked here so that one request's bad string cannot fail a batch it shares."""
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
                f"inputs[{index}].name: expected one of {sorted(specs)}, got unexpected input '{clip(tensor.name)}'"
            )
        if tensor.name in arrays:
            raise InvalidArgumentError(f"inputs[{index}].name: input '{tensor.name}' is given more than once")
        if tensor.datatype != spec.datatype.name:
            raise InvalidArgumentError(
                f"input '{tensor.name}' datatype: expected {spec.datatype.name}, got '{clip(tensor.datatype)}'"
            )
        if len(tensor.shape) > MAX_DIMS:
            raise InvalidArgumentError(
                f"input '{tensor.name}' shape: expected {signature.full_shape(spec)}, "
                f"got a shape of {len(tensor.shape)} dimensions"
            )
        shape = tuple(tensor.shape)
        known = accepted_shapes.get((tensor.name, shape))
        if known is None:
            known = _check_shape(tensor.name, shape, spec, signature, max_tensor_elements)
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
        if tensor.parameters:
            _check_input_parameters(tensor, raw=bool(raw_contents))
        is_bytes = spec.datatype.name == "BYTES"
        if is_bytes and element_count > max_bytes_elements:
            raise InvalidArgumentError(
                f"input '{tensor.name}' shape {list(shape)}: expected at most {max_bytes_elements} BYTES elements "
                f"(max_bytes_elements), got {element_count}"
            )
        has_typed = tensor.HasField("contents")
        if raw_contents:
            if has_typed:
                raise InvalidArgumentError(
                    f"input '{tensor.name}': contents and raw_input_contents are both set; "
                    "when any input is raw, every input must be raw"
                )
            if is_bytes:
                array = _decode_bytes_elements(tensor.name, raw_contents[index], element_count, bytes_as_text)
                arrays[tensor.name] = array.reshape(shape)
            else:
                arrays[tensor.name] = _decode_raw(tensor.name, spec.datatype, shape, element_count, raw_contents[index])
        else:
            arrays[tensor.name] = _decode_typed(
                tensor.name, spec.datatype, shape, element_count, tensor.contents, bytes_as_text
            )
    missing = [spec.name for spec in signature.inputs if spec.name not in arrays and not spec.optional]
    if missing:
        raise InvalidArgumentError(
            f"inputs: expected {[spec.name for spec in signature.inputs]}, got {list(arrays)} (missing {missing})"
        )
    parameters: dict[str, Any] = {}
    if request.parameters:
        parameters = {key: parameter_value(value) for key, value in request.parameters.items()}
        if BINARY_DATA_OUTPUT_PARAMETER in parameters:
            _require_binary_output(
                f"parameters['{BINARY_DATA_OUTPUT_PARAMETER}']", parameters[BINARY_DATA_OUTPUT_PARAMETER]
            )
    return DecodedRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        request_id=request.id,
        inputs=arrays,
        requested_outputs=_requested_outputs(request, signature),
        batch_size=batch_size if batch_size is not None and signature.batched else 1,
        parameters=parameters,
    )


def _check_input_parameters(tensor: pb.ModelInferRequest.InferInputTensor, raw: bool) -> None:
    where = f"input '{tensor.name}' parameters"
    _refuse_shared_memory(where, tensor.parameters)
    if BINARY_DATA_PARAMETER in tensor.parameters:
        value = parameter_value(tensor.parameters[BINARY_DATA_PARAMETER])
        if value is not raw:  # says the data travels another way than it does (or is no bool)
            travels = "raw_input_contents (binary_data true)" if raw else "typed contents (binary_data false)"
            raise InvalidArgumentError(
                f"{where}['{BINARY_DATA_PARAMETER}']: expected {str(raw).lower()}, as this input travels in "
                f"{travels}, got {clip_repr(value)}"
            )


def _check_output_parameters(index: int, requested: pb.ModelInferRequest.InferRequestedOutputTensor) -> None:
    where = f"outputs[{index}] ('{requested.name}') parameters"
    parameters = requested.parameters
    _refuse_shared_memory(where, parameters)
    if CLASSIFICATION_PARAMETER in parameters:
        count = parameter_value(parameters[CLASSIFICATION_PARAMETER])
        if count not in (None, 0) or isinstance(count, bool):
            raise InvalidArgumentError(
                f"{where}['{CLASSIFICATION_PARAMETER}']: the classification extension is not supported by this "
                f"server; expected 0 or no parameter, got {clip_repr(count)} (compute top-k from the output tensor)"
            )
    if BINARY_DATA_PARAMETER in parameters:
        _require_binary_output(
            f"{where}['{BINARY_DATA_PARAMETER}']", parameter_value(parameters[BINARY_DATA_PARAMETER])
        )


def _refuse_shared_memory(where: str, parameters: Mapping[str, pb.InferParameter]) -> None:
    for key in SHARED_MEMORY_PARAMETERS:
        if key in parameters:
            raise InvalidArgumentError(
                f"{where}['{key}']: the shared-memory extensions are not supported by this server; "
                "send tensor data in the request (raw_input_contents)"
            )


def _require_binary_output(where: str, value: object) -> None:
    if value is not True:
        raise InvalidArgumentError(
            f"{where}: expected true (this server answers every output as binary raw_output_contents; "
            f"outputs as typed contents are not supported), got {clip_repr(value)}"
        )


def _check_shape(
    name: str, shape: tuple[int, ...], spec: TensorSpec, signature: ModelSignature, max_tensor_elements: int
) -> tuple[int, int]:
    """(rows, elements) of a valid shape for ``spec``; raises naming what was expected otherwise."""
    expected = signature.full_shape(spec)
    if any(dim < 0 for dim in shape):
        raise InvalidArgumentError(f"input '{name}' shape: expected non-negative dimensions, got {list(shape)}")
    if len(shape) != len(expected) or any(want not in (-1, got) for want, got in zip(expected, shape, strict=False)):
        raise InvalidArgumentError(f"input '{name}' shape: expected {expected}, got {list(shape)}")
    element_count = math.prod(shape)  # Python ints: a huge shape cannot overflow
    if not element_count:
        # An empty tensor holds nothing, but numpy cannot even describe [0, 2, 2**62]: its other
        # dimensions are held to the element limit too.
        spread = math.prod(dim for dim in shape if dim)
        if spread > max_tensor_elements:
            raise InvalidArgumentError(
                f"input '{name}' shape {list(shape)}: expected its non-zero dimensions to multiply to at most "
                f"{max_tensor_elements} elements, got {spread}"
            )
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
    expected_size = element_count * datatype.element_size
    if len(raw) != expected_size:
        raise InvalidArgumentError(
            f"input '{name}' raw_input_contents: expected {expected_size} bytes "
            f"({element_count} {datatype.name} elements of shape {list(shape)}), got {len(raw)}"
        )
    # A view of the request's bytes: no copy on the way in.
    return np.frombuffer(raw, dtype=datatype.numpy_dtype).reshape(shape)


def _decode_bytes_elements(name: str, raw: bytes, element_count: int, as_text: bool) -> np.ndarray:
    # The claim is checked against the bytes present before the element array is allocated: a
    # shape of 64 Mi elements with 5 bytes of data must not cost 512 MiB of pointers first.
    if element_count > len(raw) // _PREFIX_SIZE:
        raise InvalidArgumentError(
            f"input '{name}' raw_input_contents: expected {element_count} length-prefixed BYTES elements "
            f"(at least {_PREFIX_SIZE} bytes each), got {len(raw)} bytes"
        )
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
        element = bytes(view[offset : offset + length])
        if as_text and not element.isascii():  # isascii: no copy, and most text is ASCII
            _require_utf8(name, index, element)
        elements[index] = element
        offset += length
    if offset != len(view):
        raise InvalidArgumentError(
            f"input '{name}' raw_input_contents: expected {element_count} BYTES elements, "
            f"got {len(view) - offset} bytes left over after them"
        )
    return elements


def _require_utf8(name: str, index: int, element: bytes) -> None:
    try:
        element.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgumentError(
            f"input '{name}' element {index}: expected UTF-8 text (this model takes its BYTES input as strings), "
            f"got undecodable bytes at byte {error.start}"
        ) from None


def _decode_typed(
    name: str,
    datatype: DataType,
    shape: tuple[int, ...],
    element_count: int,
    contents: pb.InferTensorContents,
    bytes_as_text: bool,
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
        if bytes_as_text:
            for index, element in enumerate(values):
                if not element.isascii():
                    _require_utf8(name, index, element)
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
                f"outputs[{index}].name: expected one of {sorted(known)}, got unknown output '{clip(requested.name)}'"
            )
        if requested.parameters:
            _check_output_parameters(index, requested)
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
