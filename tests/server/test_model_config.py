"""weir.model_config: parsing Triton config.pbtxt text, reporting the fields Weir does not act on,
normalizing, the model signature, version selection and output shape checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weir import datatypes
from weir.errors import InternalError, ModelConfigError
from weir.model_config import (
    SUPPORTED_FIELDS,
    ModelSignature,
    TensorSpec,
    conform_outputs,
    load_config_file,
    normalize_config,
    parse_config_text,
    select_versions,
    signature_of,
    unsupported_fields,
)
from weir_proto.inference import messages as pb

# A config as one would write it for Triton's PyTorch backend, using fields Weir acts on and
# several it does not.
TRITON_CONFIG = """
name: "resnet"
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  }
]
instance_group [
  {
    count: 2
    kind: KIND_GPU
    gpus: [ 0, 1 ]
    rate_limiter { priority: 1 }
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
}
optimization {
  cuda { graphs: true }
  execution_accelerators {
    gpu_execution_accelerator: [ { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } } ]
  }
}
version_policy: { latest: { num_versions: 2 } }
parameters: { key: "INFERENCE_MODE" value: { string_value: "true" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 1
    inputs { key: "INPUT__0" value { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true } }
  }
]
default_model_filename: "model.pt"
metric_tags { key: "team" value: "vision" }
"""

# Every field Weir acts on, and nothing else.
ONLY_SUPPORTED_CONFIG = """
name: "m"
platform: "pytorch_libtorch"
backend: "pytorch"
version_policy { specific { versions: [ 1, 3 ] } }
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] optional: true } ]
output [ { name: "y" data_type: TYPE_STRING dims: [ 2 ] } ]
instance_group [ { name: "g" count: 3 kind: KIND_GPU gpus: [ 0 ] } ]
default_model_filename: "weights.pt2"
parameters { key: "k" value { string_value: "v" } }
model_warmup [
  { name: "w" batch_size: 2 count: 3 inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } } }
]
"""

MINIMAL_CONFIG = """
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


def warmup_of(*inputs: str) -> str:
    """A model_warmup block with one sample feeding ``inputs`` ('NAME: FIELDS' each)."""
    pairs = [item.split(": ", 1) for item in inputs]
    entries = ", ".join(f'{{ key: "{name}" value: {{ {fields} zero_data: true }} }}' for name, fields in pairs)
    return f'model_warmup [ {{ name: "w" batch_size: 1 inputs [ {entries} ] }} ]'


def parse(text: str) -> pb.ModelConfig:
    return parse_config_text(text, "test config.pbtxt")


# --- parsing and unsupported fields ----------------------------------------------------------


def test_triton_config_parses_with_every_field() -> None:
    config = parse(TRITON_CONFIG)

    assert (config.name, config.platform, config.max_batch_size) == ("resnet", "pytorch_libtorch", 8)
    assert [(tensor.name, list(tensor.dims)) for tensor in config.input] == [("INPUT__0", [3, 224, 224])]
    assert config.input[0].data_type == pb.DataType.Value("TYPE_FP32")
    assert config.output[0].label_filename == "labels.txt"
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.optimization.cuda.graphs is True
    assert config.version_policy.latest.num_versions == 2
    assert config.parameters["INFERENCE_MODE"].string_value == "true"
    assert config.model_warmup[0].inputs["INPUT__0"].zero_data is True


def test_unsupported_fields_of_a_triton_config_are_exactly_the_ones_weir_ignores() -> None:
    assert unsupported_fields(parse(TRITON_CONFIG)) == [
        "input.format",
        "instance_group.rate_limiter.priority",
        "metric_tags",
        "optimization.cuda.graphs",
        "optimization.execution_accelerators.gpu_execution_accelerator.name",
        "optimization.execution_accelerators.gpu_execution_accelerator.parameters",
        "output.label_filename",
    ]


def test_no_supported_field_is_ever_reported() -> None:
    for text in (TRITON_CONFIG, ONLY_SUPPORTED_CONFIG):
        for path in unsupported_fields(parse(text)):
            covering = [field for field in SUPPORTED_FIELDS if path == field or path.startswith(field + ".")]
            assert not covering, f"{path} is reported although {covering} is supported"


def test_config_using_only_supported_fields_reports_nothing() -> None:
    config = parse(ONLY_SUPPORTED_CONFIG)
    assert config.model_warmup[0].count == 3  # the text really set the fields
    assert unsupported_fields(config) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("sequence_batching {}", ["sequence_batching"], id="empty-sequence"),
        pytest.param("dynamic_batching {}", [], id="empty-dynamic-is-supported"),
        pytest.param(
            "ensemble_scheduling { step [ { model_name: 'a' } ] }",
            ["ensemble_scheduling.step.model_name"],
            id="ensemble",
        ),
        pytest.param(
            "sequence_batching { max_sequence_idle_microseconds: 5000000 oldest { max_candidate_sequences: 4 } "
            "control_input [ { name: 'START' control [ { int32_false_true: [ 0, 1 ] } ] } ] }",
            [
                "sequence_batching.control_input.control.int32_false_true",
                "sequence_batching.control_input.name",
                "sequence_batching.max_sequence_idle_microseconds",
                "sequence_batching.oldest.max_candidate_sequences",
            ],
            id="sequence",
        ),
        pytest.param(
            "optimization { input_pinned_memory {} priority: PRIORITY_MAX }",
            ["optimization.input_pinned_memory", "optimization.priority"],
            id="optimization",
        ),
        pytest.param(
            "response_cache { enable: true }\nbatch_input [ { target_name: 't' } ]",
            ["batch_input.target_name"],
            id="response-cache-is-supported-batch-input-is-not",
        ),
        pytest.param(
            "input [ { name: 'x' reshape {} is_shape_tensor: true } ]",
            ["input.is_shape_tensor", "input.reshape"],
            id="input",
        ),
        pytest.param("cc_model_filenames { key: 'a' value: 'b' }", ["cc_model_filenames"], id="map"),
        pytest.param(
            "instance_group [ { count: 1 profile: [ 'p' ] passive: true } ]",
            ["instance_group.passive", "instance_group.profile"],
            id="instance-group",
        ),
    ],
)
def test_unsupported_fields_names_each_ignored_path(text: str, expected: list[str]) -> None:
    assert unsupported_fields(parse(text)) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('name: "x"\nmax_batch_size: eight\n', "eight"),
        ('name: "x"\nbatching_mode: 3\n', "batching_mode"),
        ('input [ { name: "a" ', "}"),
        ("dynamic_batching {}\nsequence_batching {}", "oneof"),
    ],
    ids=["bad-integer", "unknown-field", "unterminated", "two-schedulers"],
)
def test_syntax_error_raises_model_config_error_naming_the_file(text: str, fragment: str) -> None:
    with pytest.raises(ModelConfigError) as caught:
        parse_config_text(text, "models/m/config.pbtxt")
    assert caught.value.message.startswith("models/m/config.pbtxt: ")
    assert fragment in caught.value.message


def test_load_config_file_names_the_path_when_missing_or_malformed(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    with pytest.raises(ModelConfigError, match=r"config\.pbtxt is missing") as caught:
        load_config_file(path)
    assert str(path) in caught.value.message

    path.write_text("max_batch_size: -", encoding="utf-8")
    with pytest.raises(ModelConfigError) as caught:
        load_config_file(path)
    assert str(path) in caught.value.message

    path.write_text(MINIMAL_CONFIG, encoding="utf-8")
    assert load_config_file(path).input[0].name == "INPUT__0"


# --- normalize_config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param(MINIMAL_CONFIG + 'name: "other"', ["field name", "'resnet'", "'other'"], id="name-mismatch"),
        pytest.param(
            MINIMAL_CONFIG + 'backend: "onnxruntime"',
            ["field backend", "'pytorch'", "'torch'", "'weir_torch'", "'onnxruntime'"],
            id="bad-backend",
        ),
        pytest.param(
            MINIMAL_CONFIG + 'platform: "tensorrt_plan"',
            ["field platform", "'pytorch_libtorch'", "'torch_export'", "'tensorrt_plan'"],
            id="bad-platform",
        ),
        pytest.param(
            MINIMAL_CONFIG.replace("max_batch_size: 4", "max_batch_size: -1"),
            ["field max_batch_size", "0 or more", "got -1"],
            id="negative-max-batch-size",
        ),
        pytest.param(
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]',
            ["field input", "at least one input", "got none"],
            id="no-inputs",
        ),
        pytest.param(
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]',
            ["field output", "at least one output", "got none"],
            id="no-outputs",
        ),
        pytest.param(
            MINIMAL_CONFIG + 'input [ { name: "INPUT__0" data_type: TYPE_INT32 dims: [ 1 ] } ]',
            ["field input[1].name", "unique name", "'INPUT__0' twice"],
            id="duplicate-input",
        ),
        pytest.param(
            MINIMAL_CONFIG + 'output [ { name: "OUTPUT__0" data_type: TYPE_INT32 dims: [ 1 ] } ]',
            ["field output[1].name", "unique name", "'OUTPUT__0' twice"],
            id="duplicate-output",
        ),
        pytest.param(
            MINIMAL_CONFIG + "input [ { data_type: TYPE_INT32 dims: [ 1 ] } ]",
            ["field input[1].name", "non-empty name", "got ''"],
            id="empty-name",
        ),
        pytest.param(
            MINIMAL_CONFIG + 'input [ { name: "z" data_type: TYPE_INVALID dims: [ 1 ] } ]',
            ["field input[1].data_type", "TYPE_BOOL", "got TYPE_INVALID"],
            id="type-invalid",
        ),
        pytest.param(
            MINIMAL_CONFIG + 'output [ { name: "z" dims: [ 1 ] } ]',
            ["field output[1].data_type", "got TYPE_INVALID"],
            id="type-missing",
        ),
        pytest.param(
            MINIMAL_CONFIG.replace("dims: [ 3 ] } ]\noutput", "dims: [ 3, 0 ] } ]\noutput"),
            ["field input[0].dims", "-1 or a positive size", "[3, 0]"],
            id="zero-dim",
        ),
        pytest.param(
            MINIMAL_CONFIG + 'output [ { name: "z" data_type: TYPE_FP32 dims: [ -2 ] } ]',
            ["field output[1].dims", "-1 or a positive size", "[-2]"],
            id="dim-below-minus-one",
        ),
        pytest.param(
            MINIMAL_CONFIG + "instance_group [ { count: 1 }, { count: -1 } ]",
            ["field instance_group[1].count", "1 or more", "got -1"],
            id="negative-instance-count",
        ),
        pytest.param(
            MINIMAL_CONFIG + warmup_of("INPUT__0: dims: [ 3 ]"),
            ["field model_warmup[0].inputs['INPUT__0'].data_type", "expected TYPE_FP32", "got TYPE_INVALID"],
            id="warmup-datatype-missing",
        ),
        pytest.param(
            MINIMAL_CONFIG + warmup_of("nope: data_type: TYPE_FP32 dims: [ 3 ]"),
            ["field model_warmup[0].inputs", "missing ['INPUT__0']"],
            id="warmup-input-missing",
        ),
        pytest.param(
            MINIMAL_CONFIG
            + warmup_of("INPUT__0: data_type: TYPE_FP32 dims: [ 3 ]", "nope: data_type: TYPE_FP32 dims: [ 3 ]"),
            ["field model_warmup[0].inputs", "unknown input 'nope'"],
            id="warmup-unknown-input",
        ),
        pytest.param(
            MINIMAL_CONFIG + warmup_of("INPUT__0: data_type: TYPE_FP32 dims: [ 4 ]"),
            ["field model_warmup[0].inputs['INPUT__0'].dims", "fitting [3]", "got [4]"],
            id="warmup-dims-mismatch",
        ),
    ],
)
def test_normalize_config_refuses_a_bad_config_naming_the_field(text: str, fragments: list[str]) -> None:
    with pytest.raises(ModelConfigError) as caught:
        normalize_config(parse(text), "resnet")

    message = caught.value.message
    assert message.startswith("model 'resnet' config.pbtxt: ")
    missing = [fragment for fragment in fragments if fragment not in message]
    assert not missing, f"{message!r} lacks {missing}"


def test_normalize_config_fills_triton_defaults_and_leaves_the_input_unchanged() -> None:
    config = parse(MINIMAL_CONFIG)

    normalized = normalize_config(config, "resnet")

    assert normalized.name == "resnet"
    assert (normalized.backend, normalized.platform) == ("pytorch", "pytorch_libtorch")
    assert [(group.count, group.kind) for group in normalized.instance_group] == [(1, pb.ModelInstanceGroup.KIND_CPU)]
    assert normalized.version_policy.WhichOneof("policy_choice") == "latest"
    assert normalized.version_policy.latest.num_versions == 1
    assert config == parse(MINIMAL_CONFIG)  # a copy was returned, the argument is untouched


@pytest.mark.parametrize(
    ("settings", "backend", "platform"),
    [
        ('name: "resnet" backend: "pytorch"', "pytorch", "pytorch_libtorch"),
        ('backend: "torch"', "pytorch", "pytorch_libtorch"),
        ('backend: "weir_torch"', "pytorch", "pytorch_libtorch"),
        ('platform: "torch_export"', "pytorch", "torch_export"),
        ('platform: "pytorch_libtorch" backend: "pytorch"', "pytorch", "pytorch_libtorch"),
    ],
)
def test_normalize_config_accepts_every_torch_backend_and_platform_name(
    settings: str, backend: str, platform: str
) -> None:
    normalized = normalize_config(parse(MINIMAL_CONFIG + settings), "resnet")
    assert (normalized.backend, normalized.platform) == (backend, platform)


def test_normalize_config_keeps_instance_groups_and_version_policy_it_is_given() -> None:
    text = MINIMAL_CONFIG + (
        "instance_group [ { kind: KIND_GPU gpus: [ 1 ] }, { count: 3 kind: KIND_CPU } ]\nversion_policy { all {} }"
    )

    normalized = normalize_config(parse(text), "resnet")

    groups = [(group.count, group.kind, list(group.gpus)) for group in normalized.instance_group]
    assert groups == [(1, pb.ModelInstanceGroup.KIND_GPU, [1]), (3, pb.ModelInstanceGroup.KIND_CPU, [])]
    assert normalized.version_policy.WhichOneof("policy_choice") == "all"


def test_normalize_config_accepts_the_triton_config() -> None:
    normalized = normalize_config(parse(TRITON_CONFIG), "resnet")
    assert normalized.version_policy.latest.num_versions == 2
    assert [(group.count, list(group.gpus)) for group in normalized.instance_group] == [(2, [0, 1])]


# --- signature -------------------------------------------------------------------------------


def test_signature_of_a_batching_model_prefixes_the_batch_dimension() -> None:
    signature = signature_of(normalize_config(parse(TRITON_CONFIG), "resnet"))

    assert signature.batched and signature.max_batch_size == 8
    (image,) = signature.inputs
    (scores,) = signature.outputs
    assert image == TensorSpec("INPUT__0", datatypes.BY_NAME["FP32"], (3, 224, 224), optional=False)
    assert scores == TensorSpec("OUTPUT__0", datatypes.BY_NAME["FP32"], (1000,), optional=False)
    assert signature.full_shape(image) == [-1, 3, 224, 224]
    assert signature.full_shape(scores) == [-1, 1000]


def test_signature_of_a_model_without_batching_keeps_shapes_as_written() -> None:
    text = """
    input [ { name: "text" data_type: TYPE_STRING dims: [ -1 ] },
            { name: "mask" data_type: TYPE_BOOL dims: [ 2, -1 ] optional: true } ]
    output [ { name: "ids" data_type: TYPE_INT64 dims: [ 4 ] }, { name: "half" data_type: TYPE_BF16 dims: [ 1 ] } ]
    """
    signature = signature_of(normalize_config(parse(text), "tokenizer"))

    assert not signature.batched and signature.max_batch_size == 0
    assert [(spec.name, spec.datatype.name, spec.optional) for spec in signature.inputs] == [
        ("text", "BYTES", False),
        ("mask", "BOOL", True),
    ]
    assert [spec.datatype.name for spec in signature.outputs] == ["INT64", "BF16"]
    assert [signature.full_shape(spec) for spec in signature.inputs] == [[-1], [2, -1]]
    assert set(signature.inputs_by_name) == {"text", "mask"}
    assert signature.outputs_by_name["ids"].dims == (4,)


# --- select_versions -------------------------------------------------------------------------

AVAILABLE = [3, 1, 10, 2, 3]


def policy(text: str) -> pb.ModelVersionPolicy:
    return parse(f"version_policy {{ {text} }}").version_policy if text else pb.ModelVersionPolicy()


@pytest.mark.parametrize(
    ("policy_text", "expected"),
    [
        ("", [10]),
        ("latest {}", [10]),
        ("latest { num_versions: 1 }", [10]),
        ("latest { num_versions: 2 }", [3, 10]),
        ("latest { num_versions: 9 }", [1, 2, 3, 10]),
        ("all {}", [1, 2, 3, 10]),
        ("specific { versions: [ 10, 2 ] }", [2, 10]),
    ],
    ids=["no-policy", "latest-empty", "latest-1", "latest-2", "latest-more-than-there-are", "all", "specific"],
)
def test_select_versions_follows_the_policy(policy_text: str, expected: list[int]) -> None:
    assert select_versions(policy(policy_text), AVAILABLE) == (expected, [])


def test_select_versions_reports_a_specific_version_without_a_directory() -> None:
    selected, problems = select_versions(policy("specific { versions: [ 7, 2, 5 ] }"), AVAILABLE)

    assert selected == [2]
    assert len(problems) == 2
    assert "version 5" in problems[0] and "version 7" in problems[1]
    assert all("no directory" in problem for problem in problems)


@pytest.mark.parametrize("policy_text", ["", "all {}", "latest { num_versions: 3 }"])
def test_select_versions_of_an_empty_repository_is_empty(policy_text: str) -> None:
    assert select_versions(policy(policy_text), []) == ([], [])


# --- conform_outputs -------------------------------------------------------------------------


def output_signature(datatype: str, dims: tuple[int, ...], max_batch_size: int) -> ModelSignature:
    input_spec = TensorSpec("x", datatypes.BY_NAME["FP32"], (1,))
    return ModelSignature((input_spec,), (TensorSpec("y", datatypes.BY_NAME[datatype], dims),), max_batch_size)


@pytest.mark.parametrize(
    ("dims", "max_batch_size", "batch_size", "shape"),
    [
        ((3,), 4, 2, (2, 3)),
        ((-1, 5), 4, 1, (1, 7, 5)),
        ((2, -1), 0, 9, (2, 6)),
        ((), 8, 3, (3,)),
    ],
)
def test_conform_outputs_accepts_shapes_matching_the_config(
    dims: tuple[int, ...], max_batch_size: int, batch_size: int, shape: tuple[int, ...]
) -> None:
    array = np.zeros(shape, dtype=np.float32)
    outputs = conform_outputs(output_signature("FP32", dims, max_batch_size), {"y": array}, batch_size)
    assert outputs["y"] is array


@pytest.mark.parametrize(
    ("dims", "max_batch_size", "batch_size", "shape", "expected"),
    [
        ((3,), 4, 2, (3, 3), [2, 3]),  # wrong batch size
        ((3,), 4, 2, (2, 4), [2, 3]),  # wrong fixed dim
        ((3,), 4, 2, (2, 3, 1), [2, 3]),  # extra dim
        ((3,), 4, 2, (6,), [2, 3]),  # flat, not BYTES
        ((2, -1), 0, 1, (1, 2, 5), [2, -1]),  # batch dim on a model that does not batch
    ],
)
def test_conform_outputs_reports_a_model_config_mismatch(
    dims: tuple[int, ...], max_batch_size: int, batch_size: int, shape: tuple[int, ...], expected: list[int]
) -> None:
    with pytest.raises(InternalError) as caught:
        conform_outputs(output_signature("FP32", dims, max_batch_size), {"y": np.zeros(shape)}, batch_size)

    message = caught.value.message
    assert "output 'y'" in message
    assert f"declares shape {expected}" in message and f"returned {list(shape)}" in message


@pytest.mark.parametrize(
    ("dims", "max_batch_size", "batch_size", "elements", "shape"),
    [
        ((3,), 4, 2, 6, (2, 3)),
        ((-1,), 4, 2, 8, (2, 4)),
        ((2, 2), 0, 1, 4, (2, 2)),
        ((2, -1, 3), 0, 1, 12, (2, 2, 3)),
    ],
)
def test_conform_outputs_gives_flat_bytes_output_its_configured_shape(
    dims: tuple[int, ...], max_batch_size: int, batch_size: int, elements: int, shape: tuple[int, ...]
) -> None:
    flat = np.array([f"s{i}".encode() for i in range(elements)], dtype=object)
    outputs = {"y": flat}

    result = conform_outputs(output_signature("BYTES", dims, max_batch_size), outputs, batch_size)

    assert result["y"].shape == shape
    assert result["y"].reshape(-1).tolist() == flat.tolist()
    assert outputs["y"].shape == shape  # the dict it was given now holds the reshaped array


def test_conform_outputs_reports_flat_bytes_that_cannot_take_the_configured_shape() -> None:
    flat = np.array([b"a", b"b", b"c", b"d", b"e"], dtype=object)

    with pytest.raises(InternalError) as caught:
        conform_outputs(output_signature("BYTES", (3,), 4), {"y": flat}, 2)

    assert "declares shape [2, 3]" in caught.value.message and "returned [5]" in caught.value.message
