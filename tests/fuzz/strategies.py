"""Hypothesis strategies shared by the property-based tests: model signatures, valid requests for a
signature (with the arrays they carry), and arbitrary, hostile ModelInferRequests."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from weir import datatypes
from weir.codec import encode_bytes_elements
from weir.model_config import ModelSignature, TensorSpec
from weir_proto.inference import messages as pb

DATATYPES = list(datatypes.NAMES)
RAW_ONLY = {name for name, datatype in datatypes.BY_NAME.items() if datatype.contents_field is None}

# Names a client may send: any Unicode text protobuf can carry (no surrogates), short.
names = st.text(min_size=1, max_size=12)

# Dimensions: small ones, the sizes that found bugs, and anything an int64 holds.
HOSTILE_DIMS = [0, 2**26, 67108864, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -1, -(2**63)]
dims = st.one_of(st.integers(-2, 4), st.sampled_from(HOSTILE_DIMS), st.integers(-(2**63), 2**63 - 1))


@st.composite
def signatures(draw: st.DrawFn) -> ModelSignature:
    """1-3 inputs and 1-2 outputs of any datatypes, dims of -1 or 1..3, batched or not."""
    count = draw(st.integers(1, 3))
    tensor_names = draw(st.lists(names, min_size=count + 2, max_size=count + 2, unique=True))

    def spec(name: str, optional: bool) -> TensorSpec:
        datatype = datatypes.BY_NAME[draw(st.sampled_from(DATATYPES))]
        shape = tuple(draw(st.lists(st.one_of(st.just(-1), st.integers(1, 3)), max_size=3)))
        return TensorSpec(name, datatype, shape, optional)

    inputs = tuple(spec(name, draw(st.booleans()) and index > 0) for index, name in enumerate(tensor_names[:count]))
    outputs = tuple(spec(name, False) for name in tensor_names[count : count + draw(st.integers(1, 2))])
    return ModelSignature(inputs, outputs, max_batch_size=draw(st.integers(0, 4)))


def array_of(draw: st.DrawFn, datatype: datatypes.DataType, shape: tuple[int, ...]) -> np.ndarray:
    """Values of ``datatype`` in ``shape``, reaching every end of the type's range (NaN and inf included)."""
    if datatype.name == "BYTES":
        count = math.prod(shape)
        values = draw(st.lists(st.binary(max_size=8), min_size=count, max_size=count))
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    return draw(hnp.arrays(datatype.numpy_dtype, shape))


@dataclass
class ValidRequest:
    request: pb.ModelInferRequest
    arrays: dict[str, np.ndarray]  # what decode must return, by input name
    rows: int  # the batch size decode must report


@st.composite
def valid_requests(draw: st.DrawFn, signature: ModelSignature) -> ValidRequest:
    """A request ``signature`` accepts: every required input (optional ones maybe), one batch size,
    every -1 filled with 0..3, all raw or all typed (raw when a datatype travels only raw)."""
    rows = draw(st.integers(1, signature.max_batch_size)) if signature.batched else 1
    chosen = [spec for spec in signature.inputs if not spec.optional or draw(st.booleans())]
    chosen = draw(st.permutations(chosen))
    raw = any(spec.datatype.name in RAW_ONLY for spec in chosen) or draw(st.booleans())
    request = pb.ModelInferRequest(model_name=draw(names), id=draw(st.text(max_size=8)))
    arrays: dict[str, np.ndarray] = {}
    for spec in chosen:
        concrete = tuple(draw(st.integers(0, 3)) if dim == -1 else dim for dim in spec.dims)
        shape = (rows, *concrete) if signature.batched else concrete
        array = array_of(draw, spec.datatype, shape)
        arrays[spec.name] = array
        tensor = request.inputs.add(name=spec.name, datatype=spec.datatype.name, shape=shape)
        if raw:
            request.raw_input_contents.append(
                encode_bytes_elements(array) if spec.datatype.name == "BYTES" else array.tobytes()
            )
        else:
            assert spec.datatype.contents_field is not None
            getattr(tensor.contents, spec.datatype.contents_field).extend(array.reshape(-1).tolist())
    for spec in draw(st.lists(st.sampled_from(signature.outputs), max_size=3)):
        request.outputs.add(name=spec.name)
    return ValidRequest(request, arrays, rows)


def _typed_values(field: str) -> st.SearchStrategy[list[Any]]:
    element: st.SearchStrategy[Any]
    if field == "bool_contents":
        element = st.booleans()
    elif field == "int_contents":
        element = st.integers(-(2**31), 2**31 - 1)
    elif field == "int64_contents":
        element = st.integers(-(2**63), 2**63 - 1)
    elif field == "uint_contents":
        element = st.integers(0, 2**32 - 1)
    elif field == "uint64_contents":
        element = st.integers(0, 2**64 - 1)
    elif field == "fp32_contents":
        element = st.floats(width=32)
    elif field == "fp64_contents":
        element = st.floats()
    else:
        element = st.binary(max_size=8)
    return st.lists(element, max_size=8)


TYPED_FIELDS = sorted({d.contents_field for d in datatypes.BY_NAME.values() if d.contents_field})

parameter_values = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=16), st.floats(), st.integers(0, 2**64 - 1)
)


def set_parameter(target: Any, key: str, value: Any) -> None:
    """InferParameter from a Python value (bool, int64, uint64 beyond int64, double, string)."""
    parameter = target[key]
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        if value >= 2**63:
            parameter.uint64_param = value
        else:
            parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value


@dataclass(frozen=True)
class InputShape:
    """What a server expects of one input: its name, V2 datatype and full shape (-1 = any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def input_shapes(signature: ModelSignature) -> list[InputShape]:
    return [InputShape(spec.name, spec.datatype.name, tuple(signature.full_shape(spec))) for spec in signature.inputs]


@st.composite
def hostile_requests(draw: st.DrawFn, expected: list[InputShape], model_names: list[str]) -> pb.ModelInferRequest:
    """Anything a client can send: names known or not, any datatype text, any shape an int64 list
    holds, raw contents that fit or not, typed contents in any field, parameters of any type. Half
    the inputs are near misses of ``expected`` (its name and datatype, a shape whose free dims are
    hostile), where validation has the most to do."""
    request = pb.ModelInferRequest(
        model_name=draw(st.one_of(st.sampled_from(model_names), st.text(max_size=20))) if model_names else "",
        model_version=draw(st.one_of(st.just(""), st.just("1"), st.text(max_size=4))),
        id=draw(st.text(max_size=16)),
    )
    for key, value in draw(st.dictionaries(st.text(max_size=8), parameter_values, max_size=3)).items():
        set_parameter(request.parameters, key, value)
    count = draw(st.integers(0, 3))
    for _ in range(count):
        if expected and draw(st.booleans()):
            near = draw(st.sampled_from(expected))
            name, datatype = near.name, near.datatype
            shape = [draw(dims) if dim == -1 else dim for dim in near.shape]
        else:
            name = draw(names)
            datatype = draw(st.one_of(st.sampled_from(DATATYPES), st.text(max_size=6)))
            shape = draw(st.lists(dims, max_size=5))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if draw(st.booleans()):
            field = draw(st.sampled_from(TYPED_FIELDS))
            getattr(tensor.contents, field).extend(draw(_typed_values(field)))
        for key, value in draw(st.dictionaries(st.text(max_size=8), parameter_values, max_size=2)).items():
            set_parameter(tensor.parameters, key, value)
    if draw(st.booleans()):
        raw_count = draw(st.one_of(st.just(count), st.integers(0, 4)))
        request.raw_input_contents.extend(
            draw(st.lists(st.binary(max_size=48), min_size=raw_count, max_size=raw_count))
        )
    for name in draw(
        st.lists(st.one_of(names, st.sampled_from([item.name for item in expected] or ["x"])), max_size=2)
    ):
        request.outputs.add(name=name)
    return request
