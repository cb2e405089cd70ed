"""End to end: every inference RPC of a real `weir serve` subprocess, through the real gRPC stack,
with Triton's own client (tritonclient.grpc), raw protobuf stubs, the standard health and
reflection clients, and Prometheus over HTTP.

One server is shared by the module (explicit control mode, every model loaded): the demo models
plus small test models written here (FP16, INT64/BOOL, a non-batched FP32 sum for large messages).
Tests that count (statistics, metrics) compare before/after, so they do not depend on test order.
"""

from __future__ import annotations

import shutil
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from tests.conftest import WeirProcess, serving, write_torchscript_model

pytestmark = pytest.mark.timeout(120)

RPC_TIMEOUT = 30  # seconds; every call carries a deadline so a hung server fails the test, not the run
SERVICE_NAME = "inference.GRPCInferenceService"
LARGE_ELEMENTS = 16 * 1024 * 1024  # 64 MiB of FP32: far above gRPC's 4 MiB default
LARGE_MESSAGE_LIMIT = 128 * 1024 * 1024


# --- test models ----------------------------------------------------------------------------------


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class TypedMix(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a * 2 + 1, torch.logical_not(b)


class SumAll(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=0, keepdim=True)


FP16_CONFIG = """\
name: "fp16_double"
backend: "pytorch"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP16 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP16 dims: [ 4 ] } ]
"""

TYPED_MIX_CONFIG = """\
name: "typed_mix"
backend: "pytorch"
max_batch_size: 4
input [
  { name: "A" data_type: TYPE_INT64 dims: [ 3 ] },
  { name: "B" data_type: TYPE_BOOL dims: [ 3 ] }
]
output [
  { name: "A_OUT" data_type: TYPE_INT64 dims: [ 3 ] },
  { name: "B_OUT" data_type: TYPE_BOOL dims: [ 3 ] }
]
"""

IDENTITY_SUM_CONFIG = """\
name: "identity_sum"
backend: "pytorch"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "SUM" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(demo_repository_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("rpcs") / "repository"
    shutil.copytree(demo_repository_template, target)
    write_torchscript_model(target, "fp16_double", Double(), FP16_CONFIG)
    write_torchscript_model(target, "typed_mix", TypedMix(), TYPED_MIX_CONFIG)
    write_torchscript_model(target, "identity_sum", SumAll(), IDENTITY_SUM_CONFIG)
    return target


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[WeirProcess]:
    with serving(repository, "--model-control-mode", "explicit", "--load-model", "*") as running:
        yield running


@pytest.fixture(scope="module")
def client(server: WeirProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.grpc_url) as triton:
        yield triton


@pytest.fixture(scope="module")
def channel(server: WeirProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_url) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference_mlp(repository: Path) -> torch.jit.ScriptModule:
    return torch.jit.load(str(repository / "mlp_classifier" / "1" / "model.pt")).eval()


def features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)


def mlp_input(array: np.ndarray, name: str = "INPUT__0") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def text_input(texts: list[str]) -> grpcclient.InferInput:
    array = np.array([[text.encode("utf-8")] for text in texts], dtype=object)
    tensor = grpcclient.InferInput("TEXT", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


# --- server health and metadata -------------------------------------------------------------------


def test_server_live_ready_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live(client_timeout=RPC_TIMEOUT)
    assert client.is_server_ready(client_timeout=RPC_TIMEOUT)
    metadata = client.get_server_metadata(client_timeout=RPC_TIMEOUT)
    assert metadata.name == "weir"
    assert metadata.version
    assert {"model_repository", "model_configuration", "statistics", "binary_tensor_data", "parameters"} <= set(
        metadata.extensions
    )


def test_models_ready(client: grpcclient.InferenceServerClient) -> None:
    for name in ("mlp_classifier", "mlp_export", "text_stats", "fp16_double", "typed_mix", "identity_sum"):
        assert client.is_model_ready(name, client_timeout=RPC_TIMEOUT), name
    assert client.is_model_ready("mlp_classifier", "1", client_timeout=RPC_TIMEOUT)
    assert not client.is_model_ready("mlp_classifier", "2", client_timeout=RPC_TIMEOUT)
    assert not client.is_model_ready("no_such_model", client_timeout=RPC_TIMEOUT)


def test_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    mlp = client.get_model_metadata("mlp_classifier", client_timeout=RPC_TIMEOUT)
    assert mlp.name == "mlp_classifier"
    assert list(mlp.versions) == ["1"]
    assert mlp.platform == "pytorch_libtorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in mlp.inputs] == [("INPUT__0", "FP32", [-1, 256])]
    assert [(t.name, t.datatype, list(t.shape)) for t in mlp.outputs] == [("OUTPUT__0", "FP32", [-1, 10])]

    text = client.get_model_metadata("text_stats", "1", client_timeout=RPC_TIMEOUT)
    assert [(t.name, t.datatype, list(t.shape)) for t in text.inputs] == [("TEXT", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in text.outputs] == [
        ("STATS", "FP32", [-1, 2]),
        ("UPPER", "BYTES", [-1, 1]),
    ]

    # A model that does not batch reports its shapes as configured, without a batch dimension.
    unbatched = client.get_model_metadata("identity_sum", client_timeout=RPC_TIMEOUT)
    assert [(t.name, t.datatype, list(t.shape)) for t in unbatched.inputs] == [("X", "FP32", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in unbatched.outputs] == [("SUM", "FP32", [1])]

    as_json = client.get_model_metadata("fp16_double", as_json=True, client_timeout=RPC_TIMEOUT)
    assert as_json["inputs"] == [{"name": "X", "datatype": "FP16", "shape": ["-1", "4"]}]


def test_model_config_decodes(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("mlp_classifier", client_timeout=RPC_TIMEOUT).config
    assert config.name == "mlp_classifier"
    assert config.max_batch_size == 64
    assert config.backend == "pytorch"
    assert config.platform == "pytorch_libtorch"
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("INPUT__0", model_config_pb2.TYPE_FP32, [256])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("OUTPUT__0", model_config_pb2.TYPE_FP32, [10])
    ]
    assert sum(group.count for group in config.instance_group) == 1
    assert all(group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU for group in config.instance_group)

    text = client.get_model_config("text_stats", as_json=True, client_timeout=RPC_TIMEOUT)["config"]
    assert text["backend"] == "pytorch"
    assert text["max_batch_size"] == 16
    assert [i["data_type"] for i in text["input"]] == ["TYPE_STRING"]
    # Auto-completed like Triton: one instance group when the config has none.
    assert [int(group["count"]) for group in text["instance_group"]] == [1]


# --- inference --------------------------------------------------------------------------------------


def test_raw_infer_matches_torchscript(
    client: grpcclient.InferenceServerClient, reference_mlp: torch.jit.ScriptModule
) -> None:
    batch = features(5, seed=1)
    result = client.infer("mlp_classifier", [mlp_input(batch)], client_timeout=RPC_TIMEOUT)
    served = result.as_numpy("OUTPUT__0")
    with torch.inference_mode():
        expected = reference_mlp(torch.from_numpy(batch)).numpy()
    assert served.dtype == np.float32
    assert served.shape == (5, 10)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.model_name == "mlp_classifier"
    assert response.model_version == "1"


def test_raw_infer_matches_torch_export(client: grpcclient.InferenceServerClient, repository: Path) -> None:
    program = torch.export.load(str(repository / "mlp_export" / "1" / "model.pt2")).module()
    batch = features(3, seed=2)
    result = client.infer("mlp_export", [mlp_input(batch, "features")], client_timeout=RPC_TIMEOUT)
    with torch.inference_mode():
        expected = program(torch.from_numpy(batch)).numpy()
    served = result.as_numpy("logits")
    assert served.shape == (3, 10)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)


def test_typed_fp32_contents_with_raw_protobuf(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, reference_mlp: torch.jit.ScriptModule
) -> None:
    batch = features(2, seed=3)
    request = service_pb2.ModelInferRequest(model_name="mlp_classifier", id="typed-fp32")
    tensor = request.inputs.add(name="INPUT__0", datatype="FP32", shape=[2, 256])
    tensor.contents.fp32_contents.extend(batch.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=RPC_TIMEOUT)
    assert response.id == "typed-fp32"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("OUTPUT__0", "FP32", [2, 10])]
    served = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    with torch.inference_mode():
        expected = reference_mlp(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)


def test_typed_bytes_contents_with_raw_protobuf(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, repository: Path
) -> None:
    texts = [b"hello world", b"a b c", "\u00e9t\u00e9 ok".encode()]
    request = service_pb2.ModelInferRequest(model_name="text_stats")
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[3, 1])
    tensor.contents.bytes_contents.extend(texts)
    response = stub.ModelInfer(request, timeout=RPC_TIMEOUT)
    by_name = {output.name: index for index, output in enumerate(response.outputs)}
    stats = np.frombuffer(response.raw_output_contents[by_name["STATS"]], dtype="<f4").reshape(3, 2)
    assert list(response.outputs[by_name["UPPER"]].shape) == [3, 1]
    upper = decode_bytes_tensor(response.raw_output_contents[by_name["UPPER"]])
    np.testing.assert_array_equal(stats[:2], [[11, 2], [5, 3]])
    assert upper[:2] == [b"HELLO WORLD", b"A B C"]
    # Non-ASCII text: whatever the TorchScript model itself makes of it (its str is byte-based), the
    # server must hand back exactly that.
    model = torch.jit.load(str(repository / "text_stats" / "1" / "model.pt"))
    expected_stats, expected_upper = model([text.decode() for text in texts])
    np.testing.assert_array_equal(stats, expected_stats.numpy())
    assert upper == [text.encode() for text in expected_upper]


def test_typed_int64_and_bool_contents_with_raw_protobuf(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    a = np.array([[1, -2, 2**40], [0, 7, -(2**40)]], dtype=np.int64)
    b = np.array([[True, False, True], [False, False, True]])
    request = service_pb2.ModelInferRequest(model_name="typed_mix")
    a_tensor = request.inputs.add(name="A", datatype="INT64", shape=[2, 3])
    a_tensor.contents.int64_contents.extend(a.reshape(-1).tolist())
    b_tensor = request.inputs.add(name="B", datatype="BOOL", shape=[2, 3])
    b_tensor.contents.bool_contents.extend(b.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=RPC_TIMEOUT)
    by_name = {output.name: index for index, output in enumerate(response.outputs)}
    assert response.outputs[by_name["A_OUT"]].datatype == "INT64"
    assert response.outputs[by_name["B_OUT"]].datatype == "BOOL"
    a_out = np.frombuffer(response.raw_output_contents[by_name["A_OUT"]], dtype="<i8").reshape(2, 3)
    b_out = np.frombuffer(response.raw_output_contents[by_name["B_OUT"]], dtype=np.bool_).reshape(2, 3)
    np.testing.assert_array_equal(a_out, a * 2 + 1)
    np.testing.assert_array_equal(b_out, ~b)


def test_bytes_infer_through_tritonclient(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("text_stats", [text_input(["one two three", "Weir", ""])], client_timeout=RPC_TIMEOUT)
    np.testing.assert_array_equal(result.as_numpy("STATS"), [[13, 3], [4, 1], [0, 0]])
    upper = result.as_numpy("UPPER")
    assert upper.shape == (3, 1)
    assert upper.reshape(-1).tolist() == [b"ONE TWO THREE", b"WEIR", b""]


def test_fp16_raw_infer(client: grpcclient.InferenceServerClient) -> None:
    x = np.array([[0.5, -1.25, 3.0, 1024.0], [0.0, 0.1, -0.2, 7.5]], dtype=np.float16)
    tensor = grpcclient.InferInput("X", list(x.shape), "FP16")
    tensor.set_data_from_numpy(x)
    result = client.infer("fp16_double", [tensor], client_timeout=RPC_TIMEOUT)
    y = result.as_numpy("Y")
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, x * np.float16(2))
    assert result.get_output("Y").datatype == "FP16"


def test_request_id_is_echoed(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(
        "mlp_classifier", [mlp_input(features(1))], request_id="req-\u00e9-42", client_timeout=RPC_TIMEOUT
    )
    assert result.get_response().id == "req-\u00e9-42"


def test_requested_output_selection(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(
        "text_stats",
        [text_input(["select me"])],
        outputs=[grpcclient.InferRequestedOutput("UPPER")],
        client_timeout=RPC_TIMEOUT,
    )
    assert [output.name for output in result.get_response().outputs] == ["UPPER"]
    assert result.as_numpy("STATS") is None
    assert result.as_numpy("UPPER").reshape(-1).tolist() == [b"SELECT ME"]


def test_request_parameters_are_accepted(
    client: grpcclient.InferenceServerClient, reference_mlp: torch.jit.ScriptModule
) -> None:
    batch = features(1, seed=4)
    result = client.infer(
        "mlp_classifier",
        [mlp_input(batch)],
        parameters={"custom_string": "value", "custom_int": 7, "custom_bool": True},
        client_timeout=RPC_TIMEOUT,
    )
    with torch.inference_mode():
        expected = reference_mlp(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected, rtol=1e-5, atol=1e-6)


def test_stream_infer_with_an_in_band_error(
    client: grpcclient.InferenceServerClient, reference_mlp: torch.jit.ScriptModule
) -> None:
    results: dict[str, np.ndarray] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def callback(result: grpcclient.InferResult | None, error: Exception | None) -> None:
        with lock:
            if error is not None:
                errors.append(str(error))
            else:
                assert result is not None
                results[result.get_response().id] = result.as_numpy("OUTPUT__0")

    batches = {f"good-{index}": features(index + 1, seed=10 + index) for index in range(3)}
    bad = grpcclient.InferInput("INPUT__0", [1, 255], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 255), dtype=np.float32))
    client.start_stream(callback=callback, stream_timeout=RPC_TIMEOUT)
    try:
        client.async_stream_infer("mlp_classifier", [mlp_input(batches["good-0"])], request_id="good-0")
        client.async_stream_infer("mlp_classifier", [bad], request_id="bad")
        client.async_stream_infer("mlp_classifier", [mlp_input(batches["good-1"])], request_id="good-1")
        client.async_stream_infer("mlp_classifier", [mlp_input(batches["good-2"])], request_id="good-2")
    finally:
        client.stop_stream()  # waits until the server has answered every request and closed the stream

    assert sorted(results) == sorted(batches)
    for request_id, batch in batches.items():
        with torch.inference_mode():
            expected = reference_mlp(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(results[request_id], expected, rtol=1e-5, atol=1e-6)
    assert len(errors) == 1
    assert "INPUT__0" in errors[0] and "[-1, 256]" in errors[0] and "[1, 255]" in errors[0]


def test_stream_error_echoes_request_id_with_raw_protobuf(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    good = service_pb2.ModelInferRequest(model_name="text_stats", id="s-good")
    tensor = good.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(b"stream me")
    unknown_model = service_pb2.ModelInferRequest(model_name="no_such_model", id="s-unknown")
    bad_type = service_pb2.ModelInferRequest(model_name="text_stats", id="s-bad-type")
    bad_type.inputs.add(name="TEXT", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(1.0)

    responses = list(stub.ModelStreamInfer(iter([unknown_model, good, bad_type]), timeout=RPC_TIMEOUT))
    by_id = {response.infer_response.id: response for response in responses}
    assert sorted(by_id) == ["s-bad-type", "s-good", "s-unknown"]
    assert by_id["s-good"].error_message == ""
    assert decode_bytes_tensor(by_id["s-good"].infer_response.raw_output_contents[1]) == [b"STREAM ME"]
    assert "no_such_model" in by_id["s-unknown"].error_message
    assert "TEXT" in by_id["s-bad-type"].error_message and "BYTES" in by_id["s-bad-type"].error_message
    assert by_id["s-bad-type"].infer_response.model_name == "text_stats"


# --- statistics, repository, metrics -----------------------------------------------------------------


def _stats(client: grpcclient.InferenceServerClient, name: str) -> service_pb2.ModelStatistics:
    response = client.get_inference_statistics(name, client_timeout=RPC_TIMEOUT)
    assert [(stats.name, stats.version) for stats in response.model_stats] == [(name, "1")]
    return response.model_stats[0]


def test_inference_statistics_count_requests_rows_and_batches(client: grpcclient.InferenceServerClient) -> None:
    before = _stats(client, "mlp_classifier")
    for rows in (1, 4, 4):
        client.infer("mlp_classifier", [mlp_input(features(rows))], client_timeout=RPC_TIMEOUT)
    after = _stats(client, "mlp_classifier")

    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_count - before.inference_count == 9  # rows, not requests
    assert after.execution_count - before.execution_count == 3
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.compute_infer.count - before.inference_stats.compute_infer.count == 3
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    assert after.last_inference >= before.last_inference > 0

    def per_batch(stats: service_pb2.ModelStatistics) -> dict[int, int]:
        return {entry.batch_size: entry.compute_infer.count for entry in stats.batch_stats}

    counts_before, counts_after = per_batch(before), per_batch(after)
    assert counts_after[4] - counts_before.get(4, 0) == 2
    assert counts_after[1] - counts_before.get(1, 0) == 1

    everything = client.get_inference_statistics(client_timeout=RPC_TIMEOUT)
    assert {"mlp_classifier", "mlp_export", "text_stats"} <= {stats.name for stats in everything.model_stats}


def test_repository_index_shows_ready_models(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index(client_timeout=RPC_TIMEOUT)
    states = {(model.name, model.version): model.state for model in index.models}
    for name in ("mlp_classifier", "mlp_export", "text_stats", "fp16_double", "typed_mix", "identity_sum"):
        assert states[(name, "1")] == "READY", states


def test_repository_rpcs_refuse_a_repository_name_this_server_does_not_have(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    calls = [
        (stub.RepositoryIndex, service_pb2.RepositoryIndexRequest(repository_name="elsewhere")),
        (stub.RepositoryModelUnload, service_pb2.RepositoryModelUnloadRequest(repository_name="elsewhere",
                                                                              model_name="text_stats")),
        (stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(repository_name="elsewhere",
                                                                          model_name="text_stats")),
    ]  # fmt: skip
    for method, request in calls:
        with pytest.raises(grpc.RpcError) as caught:
            method(request, timeout=RPC_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "repository_name: expected '' (this server has one unnamed repository), got 'elsewhere'" in (
            caught.value.details() or ""
        )
    assert client.is_model_ready("text_stats", client_timeout=RPC_TIMEOUT)
    index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(repository_name=""), timeout=RPC_TIMEOUT)
    assert "text_stats" in {model.name for model in index.models}


def test_unload_refuses_parameters_it_does_not_support(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    for key, value in (("force", "bool_param"), ("unload_dependents", "string_param")):
        request = service_pb2.RepositoryModelUnloadRequest(model_name="text_stats")
        setattr(request.parameters[key], value, True if value == "bool_param" else "yes")
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelUnload(request, timeout=RPC_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameters" in (caught.value.details() or "")
    ready = stub.ModelReady(service_pb2.ModelReadyRequest(name="text_stats"), timeout=RPC_TIMEOUT)
    assert ready.ready


def test_unload_and_load_in_explicit_mode(client: grpcclient.InferenceServerClient) -> None:
    client.unload_model("text_stats", client_timeout=RPC_TIMEOUT)
    try:
        assert not client.is_model_ready("text_stats", client_timeout=RPC_TIMEOUT)
        index = client.get_model_repository_index(client_timeout=RPC_TIMEOUT)
        entries = [model for model in index.models if model.name == "text_stats"]
        assert [(model.state, model.reason) for model in entries] == [("UNAVAILABLE", "unloaded")]
        # The others keep serving.
        assert client.is_model_ready("mlp_classifier", client_timeout=RPC_TIMEOUT)
    finally:
        client.load_model("text_stats", client_timeout=RPC_TIMEOUT)
    assert client.is_model_ready("text_stats", client_timeout=RPC_TIMEOUT)
    index = client.get_model_repository_index(client_timeout=RPC_TIMEOUT)
    assert [(m.version, m.state) for m in index.models if m.name == "text_stats"] == [("1", "READY")]
    result = client.infer("text_stats", [text_input(["back again"])], client_timeout=RPC_TIMEOUT)
    assert result.as_numpy("UPPER").reshape(-1).tolist() == [b"BACK AGAIN"]
    assert client.is_server_ready(client_timeout=RPC_TIMEOUT)


def test_prometheus_metrics(client: grpcclient.InferenceServerClient, server: WeirProcess) -> None:
    client.infer("mlp_classifier", [mlp_input(features(2))], client_timeout=RPC_TIMEOUT)
    assert server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=RPC_TIMEOUT) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    success = [
        s for s in samples if s.name == "weir_inference_request_success_total" and s.labels["model"] == "mlp_classifier"
    ]
    assert len(success) == 1 and success[0].labels["version"] == "1" and success[0].value >= 1
    stage_counts = {
        s.labels["stage"]: s.value
        for s in samples
        if s.name == "weir_inference_stage_duration_seconds_count" and s.labels["model"] == "mlp_classifier"
    }
    assert set(stage_counts) == {"decode", "queue", "infer", "encode"}
    assert all(count >= 1 for count in stage_counts.values())
    assert any(s.name == "weir_inference_stage_duration_seconds_bucket" and s.labels["le"] == "+Inf" for s in samples)


# --- standard gRPC services -------------------------------------------------------------------------


def test_standard_health_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection(channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    listed, files = list(reflection.ServerReflectionInfo(iter(requests), timeout=RPC_TIMEOUT))

    services = {service.name for service in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services

    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(blob)
        for blob in files.file_descriptor_response.file_descriptor_proto
    ]
    # The returned files (the service's file and what it imports) describe the service completely:
    # load them into an empty pool, dependencies first.
    pool = descriptor_pool.DescriptorPool()
    pending = {proto.name: proto for proto in protos}
    while pending:
        addable = [p for p in pending.values() if all(dep not in pending for dep in p.dependency)]
        assert addable, f"reflection returned a file whose imports are missing: {sorted(pending)}"
        for proto in addable:
            pool.Add(proto)
            del pending[proto.name]
    service = pool.FindServiceByName(SERVICE_NAME)
    methods = {method.name for method in service.methods}
    assert {"ServerLive", "ModelInfer", "ModelStreamInfer", "RepositoryModelLoad"} <= methods
    assert service.methods_by_name["ModelInfer"].input_type.full_name == "inference.ModelInferRequest"


# --- message size and deadlines ----------------------------------------------------------------------


def test_large_request_with_raised_message_limits(server: WeirProcess) -> None:
    data = np.random.default_rng(5).random(LARGE_ELEMENTS, dtype=np.float32)
    channel_args = [
        ("grpc.max_send_message_length", LARGE_MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", LARGE_MESSAGE_LIMIT),
    ]
    with grpcclient.InferenceServerClient(server.grpc_url, channel_args=channel_args) as big_client:
        tensor = grpcclient.InferInput("X", [LARGE_ELEMENTS], "FP32")
        tensor.set_data_from_numpy(data)
        result = big_client.infer("identity_sum", [tensor], client_timeout=60)
    total = result.as_numpy("SUM")
    assert total.shape == (1,)
    np.testing.assert_allclose(total[0], data.sum(dtype=np.float64), rtol=1e-4)


def test_client_deadline_on_a_normal_request(client: grpcclient.InferenceServerClient) -> None:
    started = time.monotonic()
    result = client.infer("mlp_classifier", [mlp_input(features(1))], client_timeout=10)
    assert result.as_numpy("OUTPUT__0").shape == (1, 10)
    assert time.monotonic() - started < 10
