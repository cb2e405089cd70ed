"""Property-based tests of weir.codec: any valid request of any signature decodes to exactly the
arrays it carries (every datatype, raw and typed contents); responses round-trip through the wire
form; and any request at all, however hostile, either decodes or raises one of Weir's client
errors with a bounded message, using memory in proportion to the bytes it really carries.

Inputs that found bugs are explicit ``@example`` cases (issue 14: a 43-byte BYTES request that
allocated 512 MiB, a 100k-character input name echoed into a status message)."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzz.budget import examples
from tests.fuzz.strategies import hostile_requests, input_shapes, signatures, valid_requests
from weir import codec, datatypes
from weir.errors import ErrorKind, WeirError
from weir.model_config import ModelSignature, TensorSpec
from weir_proto.inference import messages as pb

pytestmark = pytest.mark.timeout(300)

DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024  # weir serve's --max-tensor-elements default
MAX_MESSAGE_CHARS = 4096  # an error message must fit a gRPC status (8 KiB of metadata) with room to spare
MEMORY_PER_WIRE_BYTE = 64  # decode may use this many bytes per byte received (an INT8 typed value: 1 -> 8)
MEMORY_SLACK = 1 << 20


def text_signature(max_batch_size: int = 0, dims: tuple[int, ...] = (-1,)) -> ModelSignature:
    """The shape of the model in the issue's reproduction: one BYTES input, dims [-1]."""
    spec = TensorSpec("TEXT", datatypes.BY_NAME["BYTES"], dims)
    return ModelSignature((spec,), (TensorSpec("LEN", datatypes.BY_NAME["INT64"], dims),), max_batch_size)


def claimed_bytes_request(shape: list[int], raw: bytes, name: str = "TEXT") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="text")
    request.inputs.add(name=name, datatype="BYTES", shape=shape)
    request.raw_input_contents.append(raw)
    return request


# Issue 14 finding 2: shape [67108864] and 5 bytes (one 1-byte element) -> 512 MiB allocated first.
HUGE_CLAIM = claimed_bytes_request([67108864], struct.pack("<I", 1) + b"a")
# Issue 14 finding 8: a 100k-character input name echoed whole into the status message.
LONG_NAME = claimed_bytes_request([1], struct.pack("<I", 1) + b"a", name="n" * 100_000)
# Found by this fuzzer: zero elements but a dimension numpy cannot hold -> numpy's ValueError.
EMPTY_HUGE_SIGNATURE = ModelSignature(
    (TensorSpec("x", datatypes.BY_NAME["BOOL"], (-1, -1, -1)),), (TensorSpec("y", datatypes.BY_NAME["BOOL"], ()),), 0
)
EMPTY_HUGE_RAW = pb.ModelInferRequest(
    inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="BOOL", shape=[0, 2, 2**62])]
)
EMPTY_HUGE_TYPED = pb.ModelInferRequest()
EMPTY_HUGE_TYPED.CopyFrom(EMPTY_HUGE_RAW)
EMPTY_HUGE_RAW.raw_input_contents.append(b"")
# Non-UTF-8 BYTES (finding 1's trigger): the codec carries bytes; it must not fail on them.
NON_UTF8 = claimed_bytes_request([1], struct.pack("<I", 2) + b"\xff\xfe")


def decode_within_bounds(request: pb.ModelInferRequest, signature: ModelSignature, max_elements: int) -> None:
    """decode_request must return or raise a client error (never INTERNAL, never anything else),
    with a bounded message and peak memory bounded by the request's own size."""
    wire_size = request.ByteSize()
    tracemalloc.start()
    try:
        codec.decode_request(request, signature, max_elements)
    except WeirError as error:
        assert error.kind is not ErrorKind.INTERNAL, error.message
        assert len(error.message) <= MAX_MESSAGE_CHARS, f"{len(error.message)}-character message"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= MEMORY_PER_WIRE_BYTE * wire_size + MEMORY_SLACK, (
        f"decoding a {wire_size}-byte request allocated {peak} bytes"
    )


@settings(max_examples=examples(300))
@given(st.data())
def test_every_valid_request_decodes_to_the_arrays_it_carries(data: st.DataObject) -> None:
    signature = data.draw(signatures())
    valid = data.draw(valid_requests(signature))
    decoded = codec.decode_request(valid.request, signature, DEFAULT_MAX_ELEMENTS)
    assert set(decoded.inputs) == set(valid.arrays)
    specs = signature.inputs_by_name
    for name, expected in valid.arrays.items():
        got = decoded.inputs[name]
        assert got.shape == expected.shape
        assert got.dtype == specs[name].datatype.numpy_dtype
        if got.dtype == object:
            assert [bytes(value) for value in got.reshape(-1)] == list(expected.reshape(-1))
        else:
            np.testing.assert_array_equal(got, expected)
    assert decoded.batch_size == valid.rows
    assert decoded.requested_outputs == (
        list(dict.fromkeys(output.name for output in valid.request.outputs))
        if valid.request.outputs
        else signature.output_names
    )


@settings(max_examples=examples(200))
@given(st.data())
def test_responses_round_trip_through_the_wire_and_back_through_decode(data: st.DataObject) -> None:
    signature = data.draw(signatures())
    valid = data.draw(valid_requests(signature))
    specs = [spec for spec in signature.inputs if spec.name in valid.arrays]
    response = codec.encode_response(
        "m", "1", "id", [(spec, valid.arrays[spec.name]) for spec in specs],
        parameters={"p": pb.InferParameter(int64_param=7)},
    )  # fmt: skip
    wire = pb.ModelInferResponse.FromString(response.SerializeToString())
    assert wire == response
    # The outputs, sent back as raw inputs of the same signature, decode to the same arrays.
    echo = pb.ModelInferRequest(model_name="m")
    for tensor in wire.outputs:
        echo.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    echo.raw_input_contents.extend(wire.raw_output_contents)
    decoded = codec.decode_request(echo, signature, DEFAULT_MAX_ELEMENTS)
    for name, expected in valid.arrays.items():
        if expected.dtype == object:
            assert list(decoded.inputs[name].reshape(-1)) == list(expected.reshape(-1))
        else:
            np.testing.assert_array_equal(decoded.inputs[name], expected)


@settings(max_examples=examples(200))
@given(
    model_name=st.text(max_size=20),
    request_id=st.text(max_size=20),
    parameters=st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3),
    values=st.lists(st.binary(max_size=6), min_size=1, max_size=4),
)
def test_caller_fields_appended_to_a_cached_answer_read_as_if_set(
    model_name: str, request_id: str, parameters: dict[str, str], values: list[bytes]
) -> None:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    spec = TensorSpec("OUT", datatypes.BY_NAME["BYTES"], (-1,))
    stored = codec.encode_response("", "3", "", [(spec, array)]).SerializeToString()
    completed = pb.ModelInferResponse.FromString(codec.with_caller_fields(stored, model_name, request_id, parameters))
    expected = codec.encode_response(
        model_name, "3", request_id, [(spec, array)],
        parameters={key: pb.InferParameter(string_param=value) for key, value in parameters.items()},
    )  # fmt: skip
    assert completed == expected


@st.composite
def hostile_cases(draw: st.DrawFn) -> tuple[pb.ModelInferRequest, ModelSignature]:
    signature = draw(signatures())
    return draw(hostile_requests(input_shapes(signature), [])), signature


@settings(max_examples=examples(600))
@given(case=hostile_cases(), max_elements=st.sampled_from([1, 1024, DEFAULT_MAX_ELEMENTS]))
@example(case=(HUGE_CLAIM, text_signature()), max_elements=DEFAULT_MAX_ELEMENTS)
@example(case=(LONG_NAME, text_signature()), max_elements=DEFAULT_MAX_ELEMENTS)
@example(case=(NON_UTF8, text_signature()), max_elements=DEFAULT_MAX_ELEMENTS)
@example(case=(claimed_bytes_request([2**62], struct.pack("<I", 1) + b"a"), text_signature()), max_elements=2**63)
@example(case=(claimed_bytes_request([64, 2**20], b""), text_signature(64)), max_elements=DEFAULT_MAX_ELEMENTS)
@example(case=(EMPTY_HUGE_RAW, EMPTY_HUGE_SIGNATURE), max_elements=1)
@example(case=(EMPTY_HUGE_TYPED, EMPTY_HUGE_SIGNATURE), max_elements=1)
def test_any_request_decodes_or_raises_a_bounded_client_error(
    case: tuple[pb.ModelInferRequest, ModelSignature], max_elements: int
) -> None:
    request, signature = case
    decode_within_bounds(request, signature, max_elements)


@pytest.mark.parametrize(
    ("request_", "signature"),
    [
        pytest.param(HUGE_CLAIM, text_signature(), id="bytes-shape-67108864-with-5-bytes"),
        pytest.param(claimed_bytes_request([2**20, 64], b""), text_signature(0, (-1, -1)), id="bytes-64Mi-empty"),
    ],
)
def test_a_bytes_input_is_checked_against_the_bytes_present_before_allocating(
    request_: pb.ModelInferRequest, signature: ModelSignature
) -> None:
    """Issue 14 finding 2: a 43-byte request must not allocate its claimed 64 Mi elements."""
    tracemalloc.start()
    try:
        with pytest.raises(WeirError) as raised:
            codec.decode_request(request_, signature, DEFAULT_MAX_ELEMENTS)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert raised.value.kind is ErrorKind.INVALID_ARGUMENT
    assert "TEXT" in raised.value.message
    assert peak < MEMORY_SLACK, f"a {request_.ByteSize()}-byte request allocated {peak} bytes"


def test_a_100k_character_input_name_is_not_echoed_whole() -> None:
    """Issue 14 finding 8: the message names the input, truncated."""
    with pytest.raises(WeirError) as raised:
        codec.decode_request(LONG_NAME, text_signature(), DEFAULT_MAX_ELEMENTS)
    assert raised.value.kind is ErrorKind.INVALID_ARGUMENT
    assert "nnnn" in raised.value.message
    assert len(raised.value.message) <= MAX_MESSAGE_CHARS
