"""Finding 4 and 9 of issue 14: every number and file name of a model config is bounded, files stay
inside the model's directory, versions are ASCII digits, and a RepositoryModelLoad ``config`` that
breaks a bound answers INVALID_ARGUMENT while the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import inprocess_settings, write_torchscript_model
from weir.errors import InvalidArgumentError, ModelConfigError, WeirError
from weir.metrics import Metrics
from weir.model_config import normalize_config, parse_config_text, signature_of
from weir.repository import ModelRepository
from weir.server import WeirServer
from weir.settings import ControlMode
from weir.warmup import warmup_samples
from weir_control.model_config import signature_from_config
from weir_proto.errors import InvalidArgumentError as SharedInvalidArgumentError
from weir_proto.inference import messages as pb
from weir_proto.model_config_limits import (
    MAX_BATCH_SIZE,
    MAX_ELEMENTS,
    MAX_INSTANCES,
    MAX_PRIORITY_LEVELS,
    MAX_QUEUE_DELAY_MICROSECONDS,
    MAX_QUEUE_SIZE,
    MAX_QUEUE_TIMEOUT_MICROSECONDS,
    MAX_VERSIONS,
    MAX_WARMUP_COUNT,
)

BASE = """
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""
WARMUP = 'model_warmup [ {{ name: "w" batch_size: {batch} inputs {{ key: "INPUT__0" value: {{ data_type: TYPE_FP32 dims: [ {dims} ] {source} }} }} }} ]'  # noqa: E501


def refused(text: str) -> str:
    """The validator's message for ``text`` (which it must refuse), checked to agree with the registry's."""
    with pytest.raises(ModelConfigError) as caught:
        normalize_config(parse_config_text(text, "test"), "m")
    with pytest.raises(SharedInvalidArgumentError) as registry:
        signature_from_config(text)
    assert registry.value.message.startswith("config_pbtxt")
    return caught.value.message


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        ("dynamic_batching { priority_levels: 1000000 }", "dynamic_batching.priority_levels", "1000000"),
        ("dynamic_batching { priority_levels: 18446744073709551615 }", "priority_levels", "18446744073709551615"),
        (
            "dynamic_batching { max_queue_delay_microseconds: 18446744073709551615 }",
            "dynamic_batching.max_queue_delay_microseconds",
            "18446744073709551615",
        ),
        (
            "dynamic_batching { default_queue_policy { default_timeout_microseconds: 18446744073709551615 } }",
            "default_queue_policy.default_timeout_microseconds",
            "18446744073709551615",
        ),
        (
            "dynamic_batching { default_queue_policy { max_queue_size: 4294967295 } }",
            "default_queue_policy.max_queue_size",
            "4294967295",
        ),
        (
            "dynamic_batching { priority_levels: 2 priority_queue_policy { key: 2 value: { max_queue_size: 4294967295 } } }",  # noqa: E501
            "priority_queue_policy[2].max_queue_size",
            "4294967295",
        ),
        ("dynamic_batching { preferred_batch_size: [ 9 ] }", "dynamic_batching.preferred_batch_size", "9"),
        ("instance_group [ { count: 100000 kind: KIND_CPU } ]", "instance_group[0].count", "100000"),
        (
            "instance_group [ { count: 40 kind: KIND_CPU }, { count: 40 kind: KIND_CPU } ]",
            "instance_group count (sum over groups)",
            "80",
        ),
        ("version_policy { latest { num_versions: 4294967295 } }", "version_policy.latest.num_versions", "4294967295"),
        ("version_policy { specific { versions: [ -1 ] } }", "version_policy.specific.versions", "-1"),
        (WARMUP.format(batch=2147483647, dims=3, source="zero_data: true"), "model_warmup[0].batch_size", "2147483647"),
        (WARMUP.format(batch=9, dims=3, source="zero_data: true"), "model_warmup[0].batch_size", "9"),
        (
            WARMUP.format(batch=1, dims=3, source="zero_data: true").replace(
                'name: "w"', 'name: "w" count: 4294967295'
            ),
            "model_warmup[0].count",
            "4294967295",
        ),
    ],
)
def test_each_number_is_bounded_and_the_message_names_field_bound_and_value(extra: str, field: str, value: str) -> None:
    message = refused(BASE + extra)
    assert field in message and value in message and "Weir's limit" in message


def test_the_bounds_in_the_messages_are_the_documented_constants() -> None:
    assert f"0..{MAX_PRIORITY_LEVELS}" in refused(BASE + "dynamic_batching { priority_levels: 65 }")
    assert str(MAX_QUEUE_DELAY_MICROSECONDS) in refused(
        BASE + f"dynamic_batching {{ max_queue_delay_microseconds: {MAX_QUEUE_DELAY_MICROSECONDS + 1} }}"
    )
    assert str(MAX_QUEUE_TIMEOUT_MICROSECONDS) in refused(
        BASE + f"dynamic_batching {{ default_queue_policy {{ default_timeout_microseconds: {2**40} }} }}"
    )
    assert str(MAX_QUEUE_SIZE) in refused(
        BASE + "dynamic_batching { default_queue_policy { max_queue_size: 2000000 } }"
    )
    assert str(MAX_BATCH_SIZE) in refused(BASE.replace("max_batch_size: 8", f"max_batch_size: {MAX_BATCH_SIZE + 1}"))
    assert str(MAX_INSTANCES) in refused(BASE + "instance_group [ { count: 65 kind: KIND_CPU } ]")
    assert str(MAX_VERSIONS) in refused(BASE + "version_policy { latest { num_versions: 65 } }")
    assert str(MAX_WARMUP_COUNT) in refused(
        BASE + WARMUP.format(batch=1, dims=3, source="zero_data: true").replace('name: "w"', 'name: "w" count: 101')
    )
    # at the bounds: accepted
    accepted = (
        BASE.replace("max_batch_size: 8", f"max_batch_size: {MAX_BATCH_SIZE}")
        + f"dynamic_batching {{ priority_levels: {MAX_PRIORITY_LEVELS} "
        f"max_queue_delay_microseconds: {MAX_QUEUE_DELAY_MICROSECONDS} }} "
        + f"instance_group [ {{ count: {MAX_INSTANCES} kind: KIND_CPU }} ]"
    )
    normalize_config(parse_config_text(accepted, "test"), "m")
    signature_from_config(accepted)


@pytest.mark.parametrize(
    "dims",
    [f"{2**62}", f"{MAX_ELEMENTS + 1}", "65536, 65536", ", ".join(["2"] * 17), "0", "-2"],
)
def test_dims_are_bounded_per_value_rank_and_product(dims: str) -> None:
    message = refused(BASE.replace("dims: [ 3 ] } ]\noutput", f"dims: [ {dims} ] }} ]\noutput"))
    assert "input[0].dims" in message


def test_a_warmup_sample_is_bounded_by_max_batch_size_and_elements() -> None:
    """A warm-up batch of 2^31-1 or dims of 2^62 answered UNKNOWN with numpy's text."""
    assert "max(1, max_batch_size)" in refused(BASE + WARMUP.format(batch=100, dims=3, source="zero_data: true"))
    big = BASE.replace("dims: [ 3 ] } ]\noutput", "dims: [ -1 ] } ]\noutput") + WARMUP.format(
        batch=8, dims=2**62, source="zero_data: true"
    )
    assert "model_warmup[0].inputs['INPUT__0'].dims" in refused(big)
    unbatched = BASE.replace("max_batch_size: 8", "max_batch_size: 0") + WARMUP.format(
        batch=2, dims=3, source="zero_data: true"
    )
    assert "max(1, max_batch_size)" in refused(unbatched)


@pytest.mark.parametrize("path", ["/etc/hostname", "../../../../etc/hostname", "a/../../config.pbtxt", "x\\..\\y"])
def test_warmup_files_named_outside_the_model_directory_are_refused(path: str) -> None:
    message = refused(BASE + WARMUP.format(batch=1, dims=3, source=f"input_data_file: {json.dumps(path)}"))
    assert "input_data_file" in message and "relative path inside the model's directory" in message


@pytest.mark.parametrize("name", ["/etc/model.pt", "../other/1/model.pt", "..", "sub/model.pt", "a" * 300])
def test_default_model_filename_is_a_plain_file_name(name: str) -> None:
    message = refused(BASE + f"default_model_filename: {json.dumps(name)}")
    assert "default_model_filename" in message


def test_a_warmup_file_symlinked_out_of_the_model_directory_is_refused_when_read(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    (model_dir / "warmup").mkdir(parents=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(3, np.float32).tobytes())
    (model_dir / "warmup" / "sample").symlink_to(secret)
    (model_dir / "warmup" / "long").write_bytes(b"\0" * 1000)
    (model_dir / "warmup" / "good").write_bytes(np.arange(3, dtype=np.float32).tobytes())
    config = normalize_config(
        parse_config_text(BASE + WARMUP.format(batch=2, dims=3, source='input_data_file: "sample"'), "t"), "m"
    )
    with pytest.raises(ModelConfigError) as caught:
        warmup_samples(config, signature_of(config), model_dir)
    assert "resolves outside" in caught.value.message
    (model_dir / "warmup" / "loop_a").symlink_to(model_dir / "warmup" / "loop_b")
    (model_dir / "warmup" / "loop_b").symlink_to(model_dir / "warmup" / "loop_a")
    config.model_warmup[0].inputs["INPUT__0"].input_data_file = "loop_a"
    with pytest.raises(ModelConfigError) as loop:
        warmup_samples(config, signature_of(config), model_dir)
    assert "cannot resolve" in loop.value.message
    config.model_warmup[0].inputs["INPUT__0"].input_data_file = "long"
    with pytest.raises(ModelConfigError) as too_long:
        warmup_samples(config, signature_of(config), model_dir)
    assert "expected 12 bytes" in too_long.value.message
    config.model_warmup[0].inputs["INPUT__0"].input_data_file = "good"
    [(inputs, batch)] = warmup_samples(config, signature_of(config), model_dir)
    assert batch == 2 and inputs["INPUT__0"].tolist() == [[0.0, 1.0, 2.0]] * 2


@settings(max_examples=200, deadline=None)
@given(
    max_batch_size=st.integers(-(2**31), 2**31 - 1),
    dim=st.integers(-(2**63), 2**63 - 1),
    levels=st.integers(0, 2**64 - 1),
    delay=st.integers(0, 2**64 - 1),
    count=st.integers(-(2**31), 2**31 - 1),
    warmup_batch=st.integers(0, 2**32 - 1),
)
def test_any_numbers_are_either_accepted_within_bounds_or_refused_with_a_config_error(
    max_batch_size: int, dim: int, levels: int, delay: int, count: int, warmup_batch: int
) -> None:
    config = pb.ModelConfig(max_batch_size=max_batch_size)
    config.input.add(name="x", data_type=pb.DataType.TYPE_FP32, dims=[dim])
    config.output.add(name="y", data_type=pb.DataType.TYPE_FP32, dims=[1])
    config.dynamic_batching.priority_levels = levels
    config.dynamic_batching.max_queue_delay_microseconds = delay
    config.instance_group.add(count=count, kind=pb.ModelInstanceGroup.KIND_CPU)
    warmup = config.model_warmup.add(name="w", batch_size=warmup_batch)
    warmup.inputs["x"].data_type = pb.DataType.TYPE_FP32
    warmup.inputs["x"].dims.append(max(1, dim))
    warmup.inputs["x"].zero_data = True
    try:
        normalized = normalize_config(config, "m")
    except ModelConfigError:
        return
    assert 0 <= normalized.max_batch_size <= MAX_BATCH_SIZE
    assert normalized.dynamic_batching.priority_levels <= MAX_PRIORITY_LEVELS
    assert normalized.dynamic_batching.max_queue_delay_microseconds <= MAX_QUEUE_DELAY_MICROSECONDS
    assert normalized.model_warmup[0].batch_size <= max(1, normalized.max_batch_size)


# --- versions and RepositoryModelLoad, through the repository and over gRPC -----------------------


class Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest_asyncio.fixture
async def repository(tmp_path: Path) -> AsyncIterator[ModelRepository]:
    write_torchscript_model(tmp_path, "scale", Scale(), BASE)
    with ThreadPoolExecutor(2) as executor:
        repository = ModelRepository(tmp_path, executor, Metrics.create(CollectorRegistry()))
        await repository.load("scale")
        yield repository
        await repository.aclose()


@pytest.mark.parametrize("version", [" 1", "+1", "1\n", "\u0661", "\U0001d7cf", "1_0", "-1", "1.0", "9" * 5000])
async def test_versions_are_ascii_digits_only(repository: ModelRepository, version: str) -> None:
    """Finding 9: " 1", "+1", "1\\n", Arabic-Indic and mathematical digits resolved to version 1, "1_0" to 10."""
    with pytest.raises(InvalidArgumentError) as caught:
        repository.resolve("scale", version)
    assert "model_version" in caught.value.message and len(caught.value.message) < 300
    assert repository.resolve("scale", "1").version == 1


async def test_a_bad_config_override_is_invalid_argument_and_changes_nothing(repository: ModelRepository) -> None:
    override = parse_config_text(BASE + "dynamic_batching { priority_levels: 1000000 }", "test")
    with pytest.raises(WeirError) as caught:
        await repository.load("scale", override)
    assert caught.value.kind.value == "invalid_argument"
    assert "parameters['config']" in caught.value.message and "priority_levels" in caught.value.message
    assert repository.all_ready() and repository.resolve("scale", "").version == 1


@pytest_asyncio.fixture
async def explicit_server(tmp_path: Path) -> AsyncIterator[WeirServer]:
    repository_dir = tmp_path / "repository"
    write_torchscript_model(repository_dir, "scale", Scale(), BASE)
    outside = tmp_path / "outside"
    write_torchscript_model(outside, "other", Scale(), BASE)
    server = WeirServer(
        inprocess_settings(repository_dir, model_control_mode=ControlMode.EXPLICIT, load_model=("scale",))
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_seconds=1)


HOSTILE_OVERRIDES: dict[str, dict[str, Any]] = {
    "priority_levels": {"dynamic_batching": {"priority_levels": "18446744073709551615"}},
    "max_queue_delay_microseconds": {"dynamic_batching": {"max_queue_delay_microseconds": "18446744073709551615"}},
    "default_model_filename": {"default_model_filename": "/etc/passwd"},
    "dims": {"input": [{"name": "INPUT__0", "data_type": "TYPE_FP32", "dims": [str(2**62)]}]},
    "input_data_file": {
        "model_warmup": [
            {
                "name": "w",
                "batch_size": 1,
                "inputs": {"INPUT__0": {"data_type": "TYPE_FP32", "dims": ["3"], "input_data_file": "/etc/hostname"}},
            }
        ]
    },
    "batch_size": {
        "model_warmup": [
            {
                "name": "w",
                "batch_size": 2147483647,
                "inputs": {"INPUT__0": {"data_type": "TYPE_FP32", "dims": ["3"], "zero_data": True}},
            }
        ]
    },
}


async def test_repository_model_load_refuses_out_of_bounds_configs_and_keeps_serving(
    explicit_server: WeirServer,
) -> None:
    base = json_format.MessageToDict(parse_config_text(BASE, "base"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{explicit_server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for field, change in HOSTILE_OVERRIDES.items():
            config = {**base, **change}
            request = service_pb2.RepositoryModelLoadRequest(model_name="scale")
            request.parameters["config"].string_param = json.dumps(config)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.RepositoryModelLoad(request, timeout=60)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, caught.value.details())
            assert field in (caught.value.details() or ""), field
            ready = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10)
            assert ready.ready, field
            infer = service_pb2.ModelInferRequest(model_name="scale")
            tensor = infer.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 3])
            tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
            answer = await stub.ModelInfer(infer, timeout=30)
            assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [2.0, 4.0, 6.0]
        bad_version = service_pb2.ModelInferRequest(model_name="scale", model_version="\u0661")
        bad_version.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
        with pytest.raises(grpc.aio.AioRpcError) as version_error:
            await stub.ModelInfer(bad_version, timeout=30)
        assert version_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model_version" in (version_error.value.details() or "")
