"""Property-based tests of the model-config validator (weir.model_config): any text and any
ModelConfig, however hostile its numbers, is either accepted or refused with ModelConfigError (never
numpy's errors, OverflowError or MemoryError), in bounded time (the test's timeout); what it accepts
has a signature and warm-up samples that can be built; the numbers issue 14 found unbounded are
refused."""

from __future__ import annotations

import contextlib
import math
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzz.budget import examples
from weir.errors import ErrorKind, ModelConfigError, WeirError
from weir.model_config import normalize_config, parse_config_text, signature_of, unsupported_fields
from weir.warmup import warmup_samples
from weir_proto.inference import messages as pb

pytestmark = pytest.mark.timeout(300)

MODEL = "m"
INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)
WARMUP_ELEMENTS_BUILT = 1 << 16  # warm-up samples are built only for accepted configs this small


def numbers(bounds: tuple[int, int], small: tuple[int, int] = (-2, 8)) -> st.SearchStrategy[int]:
    """Mostly small values, often the ends of the field's range, sometimes anything in it."""
    low, high = bounds
    edges = sorted({value for value in (low, high, 0, 1, 2**31 - 1, 2**31, 2**62) if low <= value <= high})
    return st.one_of(
        st.integers(max(low, small[0]), min(high, small[1])), st.sampled_from(edges), st.integers(low, high)
    )


data_types = st.one_of(st.sampled_from(list(pb.DataType.values())), st.just(pb.DataType.TYPE_INVALID))
tensor_names = st.one_of(st.sampled_from(["x", "y", "z"]), st.text(max_size=6))
paths = st.sampled_from(["model.pt", "model.pt2", "/etc/hostname", "../../etc/hostname", "a/../../b", "", "x\x00y"])


@st.composite
def configs(draw: st.DrawFn) -> pb.ModelConfig:
    config = pb.ModelConfig(
        name=draw(st.sampled_from(["", MODEL, "other"])),
        backend=draw(st.sampled_from(["", "pytorch", "torch", "onnxruntime"])),
        platform=draw(st.sampled_from(["", "pytorch_libtorch", "torch_export", "tensorrt_plan"])),
        max_batch_size=draw(numbers(INT32)),
    )
    if draw(st.booleans()):
        config.default_model_filename = draw(paths)
    for tensors in (config.input, config.output):
        for _ in range(draw(st.integers(0, 3))):
            tensor = tensors.add(
                name=draw(tensor_names), data_type=draw(data_types), dims=draw(st.lists(numbers(INT64), max_size=4))
            )
            if tensors is config.input:
                tensor.optional = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        config.instance_group.add(count=draw(numbers(INT32)), kind=draw(st.sampled_from([0, 1, 2, 3])))
    if draw(st.booleans()):
        batching = config.dynamic_batching
        batching.preferred_batch_size.extend(draw(st.lists(numbers(INT32), max_size=3)))
        batching.max_queue_delay_microseconds = draw(numbers(UINT64, (0, 10_000)))
        batching.priority_levels = draw(numbers(UINT64))
        batching.default_priority_level = draw(numbers(UINT64))
    for _ in range(draw(st.integers(0, 2))):
        warmup = config.model_warmup.add(
            name=draw(st.text(max_size=4)), batch_size=draw(numbers(UINT32)), count=draw(numbers(UINT32))
        )
        for name in draw(st.lists(tensor_names, max_size=2)):
            sample = warmup.inputs[name]
            sample.data_type = draw(data_types)
            sample.dims.extend(draw(st.lists(numbers(INT64), max_size=4)))
            source = draw(st.sampled_from(["zero_data", "random_data", "input_data_file"]))
            if source == "input_data_file":
                sample.input_data_file = draw(paths)
            else:
                setattr(sample, source, True)
    policy = draw(st.sampled_from(["none", "latest", "all", "specific"]))
    if policy == "latest":
        config.version_policy.latest.num_versions = draw(numbers(UINT32))
    elif policy == "all":
        config.version_policy.all.SetInParent()
    elif policy == "specific":
        config.version_policy.specific.versions.extend(draw(st.lists(numbers(INT64), max_size=3)))
    for key in draw(st.lists(st.sampled_from(["weir_precision", "weir_compile", "other"]), max_size=2)):
        config.parameters[key].string_value = draw(st.text(max_size=8))
    if draw(st.booleans()):
        config.response_cache.enable = True
    return config


def valid_base() -> pb.ModelConfig:
    return parse_config_text(
        """
        max_batch_size: 8
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
        """,
        "test",
    )


def variant(text: str) -> pb.ModelConfig:
    """The valid base config with ``text`` merged in (text format)."""
    config = valid_base()
    config.MergeFrom(parse_config_text(text, "test"))
    return config


# The numbers issue 14 found unbounded (finding 4): each must be refused by the validator.
UNBOUNDED = {
    "priority_levels 2^64-1": "dynamic_batching { priority_levels: 18446744073709551615 }",
    "max_queue_delay 2^64-1": "dynamic_batching { max_queue_delay_microseconds: 18446744073709551615 }",
    "input dims [2^62]": 'input [ { name: "big" data_type: TYPE_FP32 dims: [ 4611686018427387904 ] optional: true } ]',
    "output dims [2^62]": 'output [ { name: "big" data_type: TYPE_FP32 dims: [ 4611686018427387904 ] } ]',
    "warm-up batch 2^31-1": (
        'model_warmup [ { name: "w" batch_size: 2147483647 inputs { key: "x" value: '
        "{ data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]"
    ),
    "warm-up batch above max_batch_size": (
        'model_warmup [ { name: "w" batch_size: 9 inputs { key: "x" value: '
        "{ data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]"
    ),
}


def check(config: pb.ModelConfig, tmp: Path) -> None:
    """normalize_config accepts or raises ModelConfigError; what it accepts builds a signature and,
    when small, its warm-up samples, raising nothing but Weir's errors."""
    try:
        normalized = normalize_config(config, MODEL)
    except ModelConfigError as error:
        assert error.kind is not ErrorKind.INTERNAL
        return
    signature = signature_of(normalized)
    unsupported_fields(normalized)
    batch = max([1, *(warmup.batch_size for warmup in normalized.model_warmup)])
    shapes = [list(spec.dims) for spec in signature.inputs] + [
        list(sample.dims) for warmup in normalized.model_warmup for sample in warmup.inputs.values()
    ]
    elements = sum(batch * math.prod(max(dim, 1) for dim in shape) for shape in shapes)
    count = sum(max(1, warmup.count) for warmup in normalized.model_warmup)
    if elements <= WARMUP_ELEMENTS_BUILT and count <= 1000:
        try:
            warmup_samples(normalized, signature, tmp)
        except WeirError as error:
            assert error.kind is not ErrorKind.INTERNAL


@settings(max_examples=examples(500))
@given(config=configs())
@example(config=variant(UNBOUNDED["priority_levels 2^64-1"]))
@example(config=variant(UNBOUNDED["input dims [2^62]"]))
@example(config=variant(UNBOUNDED["warm-up batch 2^31-1"]))
def test_any_config_is_accepted_or_refused_with_a_config_error(config: pb.ModelConfig, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        check(config, tmp_path_factory.getbasetemp())
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 << 20, f"validating a {config.ByteSize()}-byte config allocated {peak} bytes"


@pytest.mark.parametrize("case", list(UNBOUNDED))
def test_unbounded_numbers_from_issue_14_are_refused(case: str) -> None:
    with pytest.raises(ModelConfigError) as raised:
        normalize_config(variant(UNBOUNDED[case]), MODEL)
    assert raised.value.kind is ErrorKind.INVALID_ARGUMENT


# Text: config.pbtxt vocabulary in any order, numbers of any size, unbalanced brackets, junk.
tokens = st.one_of(
    st.sampled_from(
        [
            "name:",
            "max_batch_size:",
            "input",
            "output",
            "dims:",
            "data_type:",
            "TYPE_FP32",
            "TYPE_STRING",
            "[",
            "]",
            "{",
            "}",
            ",",
            "dynamic_batching",
            "priority_levels:",
            "model_warmup",
            "batch_size:",
            "inputs",
            "key:",
            "value:",
            "zero_data: true",
            "instance_group",
            "count:",
            '"x"',
            "'y'",
            "#",
            "\n",
            "<",
            ">",
            "-",
        ]
    ),
    st.integers(-(2**80), 2**80).map(str),
    st.floats().map(str),
    st.text(max_size=6),
)


@settings(max_examples=examples(500))
@given(text=st.lists(tokens, max_size=40).map(" ".join))
@example(text="max_batch_size: 99999999999999999999999999")
@example(text="input [ { dims: [ 1e400 ] } ]")
@example(text="{" * 5000)
@example(text="dynamic_batching { priority_levels: 18446744073709551615 }")
def test_any_text_parses_or_is_refused_with_a_config_error(text: str) -> None:
    try:
        config = parse_config_text(text, "fuzz")
    except ModelConfigError as error:
        assert "fuzz" in error.message
        return
    with contextlib.suppress(ModelConfigError):
        normalize_config(config, MODEL)
