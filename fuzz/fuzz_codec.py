"""Coverage-guided fuzzing of the codec's decode path from raw protobuf bytes (atheris/libFuzzer).

    make fuzz                      # 60 s; FUZZ_SECONDS=600 make fuzz for longer
    .venv/bin/python fuzz/fuzz_codec.py build/fuzz-corpus fuzz/corpus -max_total_time=60

An input is one selector byte (which model signature, which --max-tensor-elements) followed by a
serialized ModelInferRequest. Bytes that do not parse are the transport's business and are
skipped. A request that parses must decode or raise one of Weir's client errors (never INTERNAL,
never anything else) with a message of bounded length, without raising the process's peak RSS by
more than MAX_GROWTH_BYTES (a 43-byte request once allocated 512 MiB); what decodes must
round-trip through encode_response and decode again. A failure is written to fuzz/crashes/; add it
as an ``@example`` to tests/fuzz/test_codec_fuzz.py once it is understood.
"""

from __future__ import annotations

import resource
import sys

import atheris

with atheris.instrument_imports():
    import numpy as np
    from google.protobuf.message import DecodeError

    from weir import codec, datatypes
    from weir.errors import ErrorKind, WeirError
    from weir.model_config import ModelSignature, TensorSpec
    from weir_proto.inference import messages as pb

MAX_MESSAGE_CHARS = 4096
MAX_GROWTH_BYTES = 256 << 20
MAX_ELEMENTS = (1, 1024, 64 * 1024 * 1024)


def _spec(name: str, datatype: str, dims: tuple[int, ...], optional: bool = False) -> TensorSpec:
    return TensorSpec(name, datatypes.BY_NAME[datatype], dims, optional)


SIGNATURES = (
    # the BYTES model: dims [-1], max_batch_size 0
    ModelSignature((_spec("TEXT", "BYTES", (-1,)),), (_spec("LEN", "INT64", (-1,)),), 0),
    # a batched FP32 model like the demo MLP
    ModelSignature((_spec("INPUT__0", "FP32", (4,)),), (_spec("OUTPUT__0", "FP32", (2,)),), 64),
    # every datatype, batched, one free dimension each (optional inputs named after their datatype)
    ModelSignature(
        tuple(_spec(name, name, (-1,), True) for name in datatypes.NAMES), (_spec("out", "FP32", (-1,)),), 8
    ),
    # every datatype, not batched, two free dimensions each
    ModelSignature(
        tuple(_spec(name, name, (-1, -1), True) for name in datatypes.NAMES), (_spec("out", "FP32", (-1,)),), 0
    ),
)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


BASELINE = _peak_rss()


def _round_trip(decoded: codec.DecodedRequest, signature: ModelSignature) -> None:
    specs = signature.inputs_by_name
    response = codec.encode_response(
        "m", "1", decoded.request_id, [(specs[name], array) for name, array in decoded.inputs.items()]
    )
    echo = pb.ModelInferRequest()
    for tensor in response.outputs:
        echo.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    echo.raw_input_contents.extend(response.raw_output_contents)
    again = codec.decode_request(echo, signature, 1 << 62)
    for name, array in decoded.inputs.items():
        if array.dtype == object:
            assert list(again.inputs[name].reshape(-1)) == [bytes(value) for value in array.reshape(-1)], name
        else:
            np.testing.assert_array_equal(again.inputs[name], array)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    signature = SIGNATURES[selector % len(SIGNATURES)]
    max_elements = MAX_ELEMENTS[(selector >> 4) % len(MAX_ELEMENTS)]
    try:
        request = pb.ModelInferRequest.FromString(body)
    except DecodeError:
        return
    try:
        decoded = codec.decode_request(request, signature, max_elements)
    except WeirError as error:
        if error.kind is ErrorKind.INTERNAL:
            raise AssertionError(f"a client's request answered INTERNAL: {error.message[:300]}") from error
        if len(error.message) > MAX_MESSAGE_CHARS:
            raise AssertionError(f"a {len(error.message)}-character error message") from error
    else:
        _round_trip(decoded, signature)
    grown = _peak_rss() - BASELINE
    if grown > MAX_GROWTH_BYTES:
        raise MemoryError(f"a {len(data)}-byte input raised peak RSS by {grown >> 20} MiB")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
