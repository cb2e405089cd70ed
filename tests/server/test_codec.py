"""weir.codec without a server: every V2 datatype through decode_request (raw and typed) and
encode_response, and the validation errors, which must name the input, what was expected and what
was received."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from weir import codec, datatypes
from weir.errors import ECHO_LIMIT, InvalidArgumentError, clip, clip_repr
from weir.grpc_status import MAX_STATUS_MESSAGE_BYTES, bounded_message
from weir.model_config import ModelSignature, TensorSpec
from weir_proto.inference import messages as pb

# What the wire format says, written out here rather than read from weir.datatypes: the numpy
# dtype a decoded tensor must have and the InferTensorContents field typed values travel in.
WIRE_DTYPE = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BF16": "<u2",  # carried as bit patterns
}
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
RAW_ONLY = ("FP16", "BF16")

# Six values per datatype (shape [2, 3]), reaching both ends of each range.
SAMPLES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 127, 128, 254, 255],
    "UINT16": [0, 1, 255, 256, 65534, 65535],
    "UINT32": [0, 1, 2**16, 2**31, 2**32 - 2, 2**32 - 1],
    "UINT64": [0, 1, 2**32, 2**63, 2**64 - 2, 2**64 - 1],
    "INT8": [-128, -1, 0, 1, 100, 127],
    "INT16": [-32768, -1, 0, 1, 1000, 32767],
    "INT32": [-(2**31), -1, 0, 1, 123456, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 1, 2**40, 2**63 - 1],
    "FP16": [-2.5, -1.0, 0.0, 0.5, 1.0, 65504.0],
    "FP32": [-1.5, 0.0, 2.0**-20, 3.25, 1e30, float("inf")],
    "FP64": [-1e300, -0.5, 0.0, 1e-300, 2.0, 1e300],
    "BF16": [0x0000, 0x3F80, 0xBF80, 0x4049, 0x7F80, 0xFF80],  # 0, 1, -1, ~3.14, inf, -inf
    "BYTES": [b"", b"a", b"hello", b"\x00\xff", "é".encode(), b"x" * 300],
}
SHAPE = [2, 3]
ALL_DATATYPES = list(SAMPLES)
TYPED_DATATYPES = [name for name in ALL_DATATYPES if name not in RAW_ONLY]


def test_the_tables_above_cover_every_v2_datatype() -> None:
    assert set(SAMPLES) == set(datatypes.NAMES)
    assert set(WIRE_DTYPE) | {"BYTES"} == set(datatypes.NAMES)
    assert set(TYPED_FIELD) | set(RAW_ONLY) == set(datatypes.NAMES)


# --- helpers ---------------------------------------------------------------------------------


def spec(name: str, datatype: str, dims: Sequence[int], optional: bool = False) -> TensorSpec:
    return TensorSpec(name, datatypes.BY_NAME[datatype], tuple(dims), optional)


def one_tensor_signature(datatype: str, dims: Sequence[int] = (2, 3), max_batch_size: int = 0) -> ModelSignature:
    return ModelSignature((spec("IN", datatype, dims),), (spec("OUT", datatype, dims),), max_batch_size)


def bytes_raw(elements: Sequence[bytes]) -> bytes:
    """The raw BYTES form, built by hand: a 4-byte little-endian length, then the element."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def raw_of(datatype: str, values: Sequence[Any]) -> bytes:
    if datatype == "BYTES":
        return bytes_raw(values)
    return np.array(values, dtype=WIRE_DTYPE[datatype]).tobytes()


def expected_array(datatype: str, values: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    return np.array(values, dtype=WIRE_DTYPE[datatype]).reshape(shape)


def assert_same_tensor(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
        assert all(type(element) is bytes for element in actual.reshape(-1))
    else:
        np.testing.assert_array_equal(actual, expected)


def raw_input(name: str, datatype: str, shape: Sequence[int], data: bytes) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape), "raw": data}


def typed_input(name: str, datatype: str, shape: Sequence[int], field: str, values: Sequence[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape), "typed": (field, list(values))}


def bare_input(name: str, datatype: str, shape: Sequence[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def make_request(
    *inputs: dict[str, Any], outputs: Sequence[str] = (), extra_raw: Sequence[bytes] = ()
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", model_version="1", id="req-1")
    for item in inputs:
        tensor = request.inputs.add(name=item["name"], datatype=item["datatype"], shape=item["shape"])
        if "raw" in item:
            request.raw_input_contents.append(item["raw"])
        if "typed" in item:
            field, values = item["typed"]
            getattr(tensor.contents, field).extend(values)
    request.raw_input_contents.extend(extra_raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode(request: pb.ModelInferRequest, signature: ModelSignature, max_tensor_elements: int = 1 << 20):
    return codec.decode_request(request, signature, max_tensor_elements)


def f32(count: int) -> bytes:
    return np.arange(count, dtype="<f4").tobytes()


def i64(count: int) -> bytes:
    return np.arange(count, dtype="<i8").tobytes()


# --- every datatype, in and out --------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_raw_input_of_every_datatype_decodes_to_the_sent_values(datatype: str) -> None:
    values = SAMPLES[datatype]
    request = make_request(raw_input("IN", datatype, SHAPE, raw_of(datatype, values)))

    decoded = decode(request, one_tensor_signature(datatype))

    assert list(decoded.inputs) == ["IN"]
    assert_same_tensor(decoded.inputs["IN"], expected_array(datatype, values, SHAPE))


@pytest.mark.parametrize("datatype", TYPED_DATATYPES)
def test_typed_input_of_every_datatype_decodes_to_the_sent_values(datatype: str) -> None:
    values = SAMPLES[datatype]
    request = make_request(typed_input("IN", datatype, SHAPE, TYPED_FIELD[datatype], values))

    decoded = decode(request, one_tensor_signature(datatype))

    assert_same_tensor(decoded.inputs["IN"], expected_array(datatype, values, SHAPE))


@pytest.mark.parametrize("datatype", RAW_ONLY)
@pytest.mark.parametrize("field", ["uint_contents", "fp32_contents"])
def test_fp16_and_bf16_are_refused_as_typed_contents(datatype: str, field: str) -> None:
    request = make_request(typed_input("IN", datatype, SHAPE, field, [1] * 6))

    with pytest.raises(InvalidArgumentError) as caught:
        decode(request, one_tensor_signature(datatype))

    message = caught.value.message
    assert "'IN'" in message and datatype in message and "raw_input_contents" in message
    assert "typed contents" in message


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_encode_response_sends_every_datatype_as_little_endian_raw_output(datatype: str) -> None:
    values = SAMPLES[datatype]
    array = expected_array(datatype, values, SHAPE)

    response = codec.encode_response("m", "3", "req-9", [(spec("OUT", datatype, [3]), array)])

    assert (response.model_name, response.model_version, response.id) == ("m", "3", "req-9")
    assert len(response.outputs) == 1 and len(response.raw_output_contents) == 1
    tensor = response.outputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("OUT", datatype, SHAPE)
    assert not tensor.HasField("contents")
    assert response.raw_output_contents[0] == raw_of(datatype, values)


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_raw_request_bytes_survive_decode_then_encode_unchanged(datatype: str) -> None:
    raw = raw_of(datatype, SAMPLES[datatype])
    signature = one_tensor_signature(datatype, dims=[3], max_batch_size=4)
    decoded = decode(make_request(raw_input("IN", datatype, SHAPE, raw)), signature)

    response = codec.encode_response("m", "1", decoded.request_id, [(signature.outputs[0], decoded.inputs["IN"])])

    assert list(response.outputs[0].shape) == SHAPE
    assert response.raw_output_contents[0] == raw


@pytest.mark.parametrize(
    ("datatype", "values", "wire"),
    [
        ("INT32", [1, -2], b"\x01\x00\x00\x00\xfe\xff\xff\xff"),
        ("UINT16", [0x0102], b"\x02\x01"),
        ("FP16", [1.0], b"\x00\x3c"),
        ("FP32", [1.0], b"\x00\x00\x80\x3f"),
        ("BF16", [0x3F80], b"\x80\x3f"),
        ("BOOL", [True, False], b"\x01\x00"),
        ("BYTES", [b"ab", b""], b"\x02\x00\x00\x00ab\x00\x00\x00\x00"),
    ],
)
def test_wire_bytes_are_little_endian_as_the_protocol_says(datatype: str, values: list[Any], wire: bytes) -> None:
    array = expected_array(datatype, values, [len(values)])
    response = codec.encode_response("m", "1", "", [(spec("OUT", datatype, [-1]), array)])
    assert response.raw_output_contents[0] == wire

    decoded = decode(make_request(raw_input("IN", datatype, [len(values)], wire)), one_tensor_signature(datatype, [-1]))
    assert_same_tensor(decoded.inputs["IN"], array)


def test_encode_response_writes_str_bytes_elements_as_utf8_with_length_prefixes() -> None:
    array = np.array([["héllo", b"\xff"], ["", "z"]], dtype=object)

    response = codec.encode_response("m", "1", "", [(spec("OUT", "BYTES", [2]), array)])

    assert list(response.outputs[0].shape) == [2, 2]
    assert response.raw_output_contents[0] == bytes_raw(["héllo".encode(), b"\xff", b"", b"z"])


def test_encode_response_converts_to_the_declared_datatype_and_copies_parameters() -> None:
    transposed = np.arange(6, dtype=np.float64).reshape(2, 3).T  # not contiguous, wrong dtype
    big_endian = np.array([1, 2], dtype=">i4")
    parameter = pb.InferParameter(string_param="yes")

    response = codec.encode_response(
        "m",
        "1",
        "r",
        [(spec("A", "FP32", [2]), transposed), (spec("B", "INT32", [2]), big_endian)],
        parameters={"cached": parameter},
    )

    assert [tensor.name for tensor in response.outputs] == ["A", "B"]
    assert list(response.outputs[0].shape) == [3, 2]
    assert response.raw_output_contents[0] == np.array([[0, 3], [1, 4], [2, 5]], dtype="<f4").tobytes()
    assert response.raw_output_contents[1] == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    assert response.parameters["cached"].string_param == "yes"


# --- what else a decoded request carries -----------------------------------------------------

BATCHED = ModelSignature(
    inputs=(spec("INPUT0", "FP32", [3]), spec("INPUT1", "INT64", [-1]), spec("OPT", "BYTES", [1], optional=True)),
    outputs=(spec("OUTPUT0", "FP32", [3]), spec("OUTPUT1", "INT64", [-1]), spec("OUTPUT2", "BYTES", [1])),
    max_batch_size=4,
)


def valid_inputs(rows: int = 2) -> tuple[dict[str, Any], dict[str, Any]]:
    return raw_input("INPUT0", "FP32", [rows, 3], f32(rows * 3)), raw_input("INPUT1", "INT64", [rows, 5], i64(rows * 5))


def test_decoded_request_carries_names_id_batch_size_and_all_outputs_by_default() -> None:
    decoded = decode(make_request(*valid_inputs(rows=3)), BATCHED)

    assert (decoded.model_name, decoded.model_version, decoded.request_id) == ("m", "1", "req-1")
    assert decoded.batch_size == 3
    assert decoded.inputs["INPUT0"].shape == (3, 3)
    assert decoded.inputs["INPUT1"].shape == (3, 5)
    assert decoded.requested_outputs == ["OUTPUT0", "OUTPUT1", "OUTPUT2"]
    assert decoded.parameters == {}


def test_optional_input_may_be_omitted_or_sent() -> None:
    without = decode(make_request(*valid_inputs()), BATCHED)
    assert "OPT" not in without.inputs

    with_optional = decode(
        make_request(*valid_inputs(), raw_input("OPT", "BYTES", [2, 1], bytes_raw([b"a", b"bc"]))), BATCHED
    )
    assert with_optional.inputs["OPT"].tolist() == [[b"a"], [b"bc"]]


def test_model_without_batching_reports_batch_size_one_whatever_the_leading_dim() -> None:
    signature = one_tensor_signature("INT32", dims=[5, -1], max_batch_size=0)
    decoded = decode(make_request(raw_input("IN", "INT32", [5, 2], bytes(40))), signature)
    assert decoded.batch_size == 1
    assert decoded.inputs["IN"].shape == (5, 2)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (["OUTPUT1", "OUTPUT0"], ["OUTPUT1", "OUTPUT0"]),
        (["OUTPUT2"], ["OUTPUT2"]),
        (["OUTPUT0", "OUTPUT2", "OUTPUT0"], ["OUTPUT0", "OUTPUT2"]),
    ],
    ids=["reordered", "subset", "duplicate-collapsed"],
)
def test_requested_outputs_keep_the_request_order(requested: list[str], expected: list[str]) -> None:
    decoded = decode(make_request(*valid_inputs(), outputs=requested), BATCHED)
    assert decoded.requested_outputs == expected


def test_request_parameters_of_every_kind_are_decoded() -> None:
    request = make_request(*valid_inputs())
    request.parameters["flag"].bool_param = True
    request.parameters["count"].int64_param = -7
    request.parameters["tag"].string_param = "abc"
    request.parameters["ratio"].double_param = 0.25
    request.parameters["big"].uint64_param = 2**64 - 1
    request.parameters["unset"].SetInParent()

    decoded = decode(request, BATCHED)

    assert decoded.parameters == {
        "flag": True,
        "count": -7,
        "tag": "abc",
        "ratio": 0.25,
        "big": 2**64 - 1,
        "unset": None,
    }
    assert type(decoded.parameters["flag"]) is bool


def test_raw_fp32_input_is_a_read_only_view_of_the_request_bytes() -> None:
    raw = np.array([[1.0, 2.0, 3.0]], dtype="<f4").tobytes()
    decoded = decode(make_request(raw_input("INPUT0", "FP32", [1, 3], raw), valid_inputs(1)[1]), BATCHED)

    array = decoded.inputs["INPUT0"]
    assert not array.flags.owndata
    assert not array.flags.writeable
    owner: Any = array
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner, bytes) and owner == raw
    assert np.shares_memory(array, np.frombuffer(owner, dtype=np.uint8))


# --- validation ------------------------------------------------------------------------------

# (request, max_tensor_elements, fragments the message must contain); BATCHED has INPUT0 FP32 [-1, 3],
# INPUT1 INT64 [-1, -1], optional OPT BYTES [-1, 1] and max_batch_size 4.
INPUT1 = raw_input("INPUT1", "INT64", [2, 5], i64(10))
INVALID = [
    pytest.param(
        make_request(raw_input("INPUT0", "FP64", [2, 3], bytes(48)), INPUT1),
        None,
        ["'INPUT0'", "datatype", "expected FP32", "'FP64'"],
        id="wrong-datatype",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [6], f32(6)), INPUT1),
        None,
        ["'INPUT0'", "shape", "expected [-1, 3]", "got [6]"],
        id="wrong-rank",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [2, 4], f32(8)), INPUT1),
        None,
        ["'INPUT0'", "expected [-1, 3]", "got [2, 4]"],
        id="wrong-fixed-dim",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [2, 3], f32(6)), raw_input("INPUT1", "INT64", [2, -5], b"")),
        None,
        ["'INPUT1'", "non-negative", "got [2, -5]"],
        id="negative-dim",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [5, 3], f32(15)), INPUT1),
        None,
        ["'INPUT0'", "1 to 4", "max_batch_size", "got 5"],
        id="batch-over-max",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [0, 3], b""), INPUT1),
        None,
        ["'INPUT0'", "1 to 4", "got 0"],
        id="batch-zero",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [2, 3], f32(6)), raw_input("INPUT1", "INT64", [3, 5], i64(15))),
        None,
        ["'INPUT1'", "expected batch size 2", "got 3"],
        id="different-batch-sizes",
    ),
    pytest.param(
        make_request(raw_input("INPUT9", "FP32", [2, 3], f32(6)), INPUT1),
        None,
        ["inputs[0].name", "'INPUT0', 'INPUT1', 'OPT'", "'INPUT9'"],
        id="unknown-input",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [2, 3], f32(6)), raw_input("INPUT0", "FP32", [2, 3], f32(6))),
        None,
        ["inputs[1].name", "'INPUT0'", "more than once"],
        id="duplicate-input",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [2, 3], f32(6))),
        None,
        ["expected ['INPUT0', 'INPUT1', 'OPT']", "got ['INPUT0']", "missing ['INPUT1']"],
        id="missing-required-input",
    ),
    pytest.param(
        make_request(
            raw_input("INPUT0", "FP32", [2, 3], f32(6)),
            typed_input("INPUT1", "INT64", [2, 5], "int64_contents", range(10)),
            extra_raw=[i64(10)],
        ),
        None,
        ["'INPUT1'", "contents", "raw_input_contents", "both set"],
        id="mixed-raw-and-typed",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [2, 3], f32(6)), bare_input("INPUT1", "INT64", [2, 5])),
        None,
        ["raw_input_contents", "one entry per input (2)", "got 1"],
        id="raw-count-below-inputs",
    ),
    pytest.param(
        make_request(*valid_inputs(), extra_raw=[b""]),
        None,
        ["raw_input_contents", "one entry per input (2)", "got 3"],
        id="raw-count-above-inputs",
    ),
    pytest.param(
        make_request(raw_input("INPUT0", "FP32", [2, 3], f32(5)), INPUT1),
        None,
        ["'INPUT0'", "raw_input_contents", "expected 24 bytes", "6 FP32 elements", "[2, 3]", "got 20"],
        id="wrong-raw-byte-size",
    ),
    pytest.param(
        make_request(*valid_inputs(), raw_input("OPT", "BYTES", [2, 1], bytes_raw([b"ab"]) + b"\x01\x00")),
        None,
        ["'OPT'", "expected 2 length-prefixed BYTES elements", "ends after 1"],
        id="bytes-length-prefix-cut-short",
    ),
    pytest.param(
        make_request(*valid_inputs(), raw_input("OPT", "BYTES", [2, 1], bytes_raw([b"a"]) + b"\x01\x00")),
        None,
        ["'OPT'", "expected 2 length-prefixed BYTES elements", "at least 4 bytes each", "got 7 bytes"],
        id="bytes-more-elements-than-the-data-can-hold",
    ),
    pytest.param(
        make_request(*valid_inputs(), raw_input("OPT", "BYTES", [2, 1], bytes_raw([b"a"]) + b"\x05\x00\x00\x00ab")),
        None,
        ["'OPT'", "element 1 declares 5 bytes", "only 2 remain"],
        id="bytes-length-past-the-end",
    ),
    pytest.param(
        make_request(*valid_inputs(), raw_input("OPT", "BYTES", [2, 1], bytes_raw([b"a", b"b"]) + b"zz")),
        None,
        ["'OPT'", "expected 2 BYTES elements", "2 bytes left over"],
        id="bytes-leftover",
    ),
    pytest.param(
        make_request(
            typed_input("INPUT0", "FP32", [2, 3], "fp32_contents", [1.0] * 5),
            typed_input("INPUT1", "INT64", [2, 5], "int64_contents", range(10)),
        ),
        None,
        ["'INPUT0'", "contents.fp32_contents", "expected 6 values", "[2, 3]", "got 5"],
        id="typed-count-mismatch",
    ),
    pytest.param(
        make_request(
            typed_input("INPUT0", "FP32", [2, 3], "fp32_contents", [1.0] * 6),
            typed_input("INPUT1", "INT64", [2, 5], "int_contents", range(10)),
        ),
        None,
        ["'INPUT1'", "contents.int64_contents", "expected 10 values", "got 0"],
        id="typed-values-in-the-wrong-field",
    ),
    pytest.param(
        make_request(*valid_inputs()),
        8,
        ["'INPUT1'", "[2, 5]", "at most 8 elements", "got 10"],
        id="over-max-tensor-elements",
    ),
    pytest.param(
        make_request(*valid_inputs(), outputs=["OUTPUT0", "OUTPUT9"]),
        None,
        ["outputs[1].name", "'OUTPUT0', 'OUTPUT1', 'OUTPUT2'", "'OUTPUT9'"],
        id="unknown-requested-output",
    ),
]


@pytest.mark.parametrize(("request_", "max_elements", "fragments"), INVALID)
def test_invalid_request_is_refused_with_a_message_naming_what_is_wrong(
    request_: pb.ModelInferRequest, max_elements: int | None, fragments: list[str]
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        decode(request_, BATCHED, max_elements or 1 << 20)

    missing = [fragment for fragment in fragments if fragment not in caught.value.message]
    assert not missing, f"{caught.value.message!r} lacks {missing}"


def test_element_limit_counts_elements_not_bytes_and_allows_exactly_the_limit() -> None:
    decoded = decode(make_request(*valid_inputs()), BATCHED, max_tensor_elements=10)
    assert decoded.inputs["INPUT1"].size == 10


def test_element_count_that_overflows_int64_is_still_refused() -> None:
    # 2**32 * 2**32 wraps to 0 in int64 arithmetic: the count must be computed without overflow.
    signature = one_tensor_signature("FP32", dims=[-1, -1], max_batch_size=0)
    request = make_request(raw_input("IN", "FP32", [2**32, 2**32], b""))

    with pytest.raises(InvalidArgumentError) as caught:
        decode(request, signature, max_tensor_elements=1000)

    assert "'IN'" in caught.value.message and "at most 1000 elements" in caught.value.message


@pytest.mark.parametrize(
    ("datatype", "field", "value"),
    [
        ("UINT8", "uint_contents", 300),
        ("UINT16", "uint_contents", 70000),
        ("INT8", "int_contents", 200),
        ("INT8", "int_contents", -129),
        ("INT16", "int_contents", 40000),
    ],
)
def test_typed_value_that_does_not_fit_the_datatype_is_refused(datatype: str, field: str, value: int) -> None:
    request = make_request(typed_input("IN", datatype, [2], field, [1, value]))

    with pytest.raises(InvalidArgumentError) as caught:
        decode(request, one_tensor_signature(datatype, dims=[2]))

    message = caught.value.message
    assert "'IN'" in message and f"contents.{field}" in message and datatype in message


@pytest.mark.parametrize("request_id", ["", "a", "é-" * 100])  # empty, short, a multi-byte varint length
def test_a_cached_response_completed_for_a_caller_parses_with_their_name_and_id(request_id: str) -> None:
    from weir.codec import with_caller_fields

    stored = pb.ModelInferResponse(model_version="3")
    stored.outputs.add(name="y", datatype="FP32", shape=[1, 2])
    stored.raw_output_contents.append(np.array([[1.5, -2.0]], np.float32).tobytes())

    answer = pb.ModelInferResponse.FromString(with_caller_fields(stored.SerializeToString(), "model", request_id))
    assert (answer.model_name, answer.model_version, answer.id) == ("model", "3", request_id)
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], np.float32), [1.5, -2.0])


def test_a_cached_answer_gets_the_callers_string_parameters_appended() -> None:
    from weir.codec import with_caller_fields

    stored = pb.ModelInferResponse(model_version="2")
    stored.parameters["kept"].int64_param = 7
    answer = pb.ModelInferResponse.FromString(
        with_caller_fields(stored.SerializeToString(), "web", "id-1", {"weir_variant": "canary", "other": "é"})
    )
    assert (answer.model_name, answer.id, answer.model_version) == ("web", "id-1", "2")
    assert answer.parameters["weir_variant"].string_param == "canary"
    assert answer.parameters["other"].string_param == "é"
    assert answer.parameters["kept"].int64_param == 7


# --- issue 14: sizes checked before allocating, text checked before batching, bounded echoes ---------

TEXT = one_tensor_signature("BYTES", dims=[-1], max_batch_size=0)  # the reproduction's model: dims [-1]


def test_a_bytes_shape_claiming_more_elements_than_the_data_holds_is_refused_before_allocating() -> None:
    """Finding 2: shape [67108864] with 5 bytes of data allocated 512 MiB of element slots first."""
    request = make_request(raw_input("IN", "BYTES", [64 * 1024 * 1024], bytes_raw([b"a"])))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgumentError) as caught:
            # Both limits as high as the claim: the check against the data must hold on its own.
            codec.decode_request(request, TEXT, 64 * 1024 * 1024, max_bytes_elements=64 * 1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = caught.value.message
    assert "'IN'" in message and "67108864" in message and "got 5 bytes" in message
    assert peak < 1 << 20, f"refusing a {request.ByteSize()}-byte request allocated {peak} bytes"


@pytest.mark.parametrize("contents", ["raw", "typed"])
def test_bytes_element_count_is_capped_by_max_bytes_elements(contents: str) -> None:
    elements = [b"x"] * 9
    item = raw_input("IN", "BYTES", [9], bytes_raw(elements))
    if contents == "typed":
        item = typed_input("IN", "BYTES", [9], "bytes_contents", elements)
    with pytest.raises(InvalidArgumentError) as caught:
        codec.decode_request(make_request(item), TEXT, 1 << 20, max_bytes_elements=8)
    assert "'IN'" in caught.value.message and "at most 8 BYTES elements" in caught.value.message
    assert "got 9" in caught.value.message
    decoded = codec.decode_request(make_request(item), TEXT, 1 << 20, max_bytes_elements=9)  # at the limit: fine
    assert decoded.inputs["IN"].size == 9


def test_a_shape_with_more_dimensions_than_numpy_allows_is_refused_without_echoing_it() -> None:
    request = make_request(raw_input("IN", "FP32", [1] * 10_000, f32(1)))
    with pytest.raises(InvalidArgumentError) as caught:
        decode(request, one_tensor_signature("FP32"))
    assert "'IN'" in caught.value.message and "10000 dimensions" in caught.value.message
    assert len(caught.value.message) < 200


@pytest.mark.parametrize("contents", ["raw", "typed"])
def test_bytes_for_a_text_model_must_be_utf8_and_the_element_is_named(contents: str) -> None:
    """Finding 1: checked while decoding, so a bad string never reaches (and fails) a shared batch."""
    elements = [b"ok", "\u00e9t\u00e9".encode(), b"bad \xff\xfe"]
    item = raw_input("IN", "BYTES", [3], bytes_raw(elements))
    if contents == "typed":
        item = typed_input("IN", "BYTES", [3], "bytes_contents", elements)
    with pytest.raises(InvalidArgumentError) as caught:
        codec.decode_request(make_request(item), TEXT, 1 << 20, bytes_as_text=True)
    message = caught.value.message
    assert "'IN'" in message and "element 2" in message and "UTF-8" in message and "byte 4" in message
    # The same bytes are data for a codec that is not asked for text (binary BYTES stay allowed).
    assert codec.decode_request(make_request(item), TEXT, 1 << 20).inputs["IN"].tolist() == elements
    # Valid UTF-8, ASCII or not, passes.
    good = raw_input("IN", "BYTES", [2], bytes_raw(elements[:2]))
    assert codec.decode_request(make_request(good), TEXT, 1 << 20, bytes_as_text=True).inputs["IN"].size == 2


def test_client_strings_in_messages_are_clipped() -> None:
    """Finding 8: a 100k-character name became RESOURCE_EXHAUSTED (the status outgrew its metadata)."""
    long_name = "n" * 100_000
    cases = [
        make_request(raw_input(long_name, "FP32", [2, 3], f32(6))),
        make_request(raw_input("INPUT0", "X" * 100_000, [2, 3], f32(6))),
        make_request(*valid_inputs(), outputs=[long_name]),
    ]
    for request in cases:
        with pytest.raises(InvalidArgumentError) as caught:
            decode(request, BATCHED)
        message = caught.value.message
        assert len(message) < ECHO_LIMIT + 200, message[:300]
        assert "... (100000 characters)" in message


def test_clip_keeps_short_values_whole_and_cuts_long_ones_saying_how_long() -> None:
    assert clip("abc") == "abc"
    assert clip("a" * ECHO_LIMIT) == "a" * ECHO_LIMIT
    assert clip("a" * (ECHO_LIMIT + 1)) == "a" * ECHO_LIMIT + f"... ({ECHO_LIMIT + 1} characters)"
    assert clip_repr("x") == "'x'"
    assert clip_repr(b"y" * 1000) == repr(b"y" * ECHO_LIMIT) + "... (1000 bytes)"
    assert clip_repr(7) == "7"


@pytest.mark.parametrize("text", ["a" * 100_000, "\u00e9" * 100_000, "\x00%" * 50_000])
def test_a_status_message_is_bounded_on_the_wire(text: str) -> None:
    bounded = bounded_message(f"input '{text}': wrong")
    wire = bounded.encode()
    assert len(wire) + 2 * sum(1 for byte in wire if byte < 0x20 or byte > 0x7E or byte == 0x25) <= (
        MAX_STATUS_MESSAGE_BYTES
    )
    assert bounded.startswith("input '") and "message cut from" in bounded
    assert bounded_message("short") == "short"


# --- issue 14 finding 9: unsupported protocol extensions are refused, not ignored ------------------


def with_parameter(target: Any, key: str, kind: str, value: Any) -> None:
    setattr(target.parameters[key], kind, value)


@pytest.mark.parametrize(
    ("where", "key", "kind", "value", "fragments"),
    [
        ("input", "shared_memory_region", "string_param", "region0", ["input 'INPUT0'", "shared-memory"]),
        ("input", "shared_memory_byte_size", "int64_param", 24, ["shared_memory_byte_size", "not supported"]),
        ("input", "shared_memory_offset", "int64_param", 0, ["shared_memory_offset", "not supported"]),
        ("output", "shared_memory_region", "string_param", "out0", ["outputs[0] ('OUTPUT0')", "shared-memory"]),
        ("output", "classification", "int64_param", 3, ["'classification'", "not supported", "got 3"]),
        ("output", "binary_data", "bool_param", False, ["'binary_data'", "expected true", "got False"]),
        ("input", "binary_data", "bool_param", False, ["'binary_data'", "raw_input_contents", "expected true"]),
        ("request", "binary_data_output", "bool_param", False, ["binary_data_output", "expected true"]),
    ],
)
def test_unsupported_extension_parameters_are_refused(
    where: str, key: str, kind: str, value: Any, fragments: list[str]
) -> None:
    request = make_request(*valid_inputs(), outputs=["OUTPUT0"])
    target = {"input": request.inputs[0], "output": request.outputs[0], "request": request}[where]
    with_parameter(target, key, kind, value)
    with pytest.raises(InvalidArgumentError) as caught:
        decode(request, BATCHED)
    missing = [fragment for fragment in fragments if fragment not in caught.value.message]
    assert not missing, f"{caught.value.message!r} lacks {missing}"


def test_extension_parameters_that_ask_for_what_weir_does_are_accepted() -> None:
    """binary_data true is how Weir answers anyway, classification 0 asks for no classification,
    and other tensor parameters stay the model's business."""
    request = make_request(*valid_inputs(), outputs=["OUTPUT0", "OUTPUT1"])
    with_parameter(request.inputs[0], "binary_data", "bool_param", True)
    with_parameter(request.inputs[1], "binary_data_size", "int64_param", 80)
    with_parameter(request.outputs[0], "binary_data", "bool_param", True)
    with_parameter(request.outputs[1], "classification", "int64_param", 0)
    with_parameter(request, "binary_data_output", "bool_param", True)
    decoded = decode(request, BATCHED)
    assert decoded.requested_outputs == ["OUTPUT0", "OUTPUT1"]
    typed = make_request(typed_input("IN", "INT32", [2, 3], "int_contents", range(6)))
    with_parameter(typed.inputs[0], "binary_data", "bool_param", False)  # typed contents: not binary, as it says
    assert decode(typed, one_tensor_signature("INT32")).inputs["IN"].size == 6


@pytest.mark.parametrize("contents", ["raw", "typed"])
def test_an_empty_tensor_whose_other_dimensions_numpy_cannot_describe_is_refused(contents: str) -> None:
    """Found by the codec fuzzer: [0, 2, 2**62] has no elements, and numpy raised ValueError (INTERNAL)."""
    item = raw_input("IN", "BOOL", [0, 2, 2**62], b"") if contents == "raw" else bare_input("IN", "BOOL", [0, 2, 2**62])
    with pytest.raises(InvalidArgumentError) as caught:
        decode(make_request(item), one_tensor_signature("BOOL", dims=[-1, -1, -1]), max_tensor_elements=1000)
    assert "'IN'" in caught.value.message and "non-zero dimensions" in caught.value.message
    empty = raw_input("IN", "BOOL", [0, 2, 500], b"")  # within the limit: an empty tensor is fine
    assert decode(make_request(empty), one_tensor_signature("BOOL", dims=[-1, -1, -1])).inputs["IN"].shape == (
        0,
        2,
        500,
    )
