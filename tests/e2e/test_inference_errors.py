"""End to end: bad requests and bad repositories against a real `weir serve` subprocess.

Every bad input must get its documented gRPC status code and a message that names the field or
input, what was expected and what was received, and the server must keep serving afterwards
(each test ends with a good request). Malformed requests are built with the raw protobuf stubs
that ship with tritonclient, since Triton's client refuses to send most of them.

Two servers are shared by the module: ``server`` (explicit control mode, every model loaded)
over the demo models plus an FP16 model, a slow single-instance model, a model whose
config.pbtxt does not parse and a pickled nn.Module; and ``restricted_server`` (control mode
none, a small --max-tensor-elements) over the demo models alone.
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
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import WeirProcess, serving, write_torchscript_model

pytestmark = pytest.mark.timeout(120)

RPC_TIMEOUT = 30
MAX_TENSOR_ELEMENTS = 1024  # restricted_server's --max-tensor-elements
# How long the slow model's blocking request computes in the deadline test: calibrated once, so it must
# stay well above the 0.2 s deadline even if the calibration ran during a load spike (at 1 s it did not).
SLOW_TARGET_SECONDS = 3.0


# --- test models ----------------------------------------------------------------------------------


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Slow(nn.Module):
    """N[0] rounds of a 256x256 matmul: compute time the test chooses per request."""

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        a = torch.full([256, 256], 0.001)
        acc = torch.zeros([256, 256])
        for _ in range(int(n[0])):
            acc = torch.tanh(acc @ a + a)
        return acc.sum().reshape([1])


class PickleTrap(nn.Module):
    """Unpickling this object calls ``open(marker, "w")``: the marker file appears if and only if
    someone unpickles it. ``open`` is a builtin, so the trap fires in any process, even one that
    cannot import this test module."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.linear = nn.Linear(4, 4)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


FP16_CONFIG = """\
name: "fp16_double"
backend: "pytorch"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP16 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP16 dims: [ 4 ] } ]
"""

SLOW_CONFIG = """\
name: "slow"
backend: "pytorch"
max_batch_size: 0
input [ { name: "N" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

BROKEN_CONFIG = """\
name: "broken_config"
backend: "pytorch"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] }
this is not text format
"""

PICKLED_CONFIG = """\
name: "pickled_model"
backend: "pytorch"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="module")
def pickle_marker(workdir: Path) -> Path:
    return workdir / "unpickled-marker"


@pytest.fixture(scope="module")
def repository(demo_repository_template: Path, workdir: Path, pickle_marker: Path) -> Path:
    target = workdir / "repository"
    shutil.copytree(demo_repository_template, target)
    write_torchscript_model(target, "fp16_double", Double(), FP16_CONFIG)
    write_torchscript_model(target, "slow", Slow(), SLOW_CONFIG)
    write_torchscript_model(target, "broken_config", Double(), BROKEN_CONFIG)
    (target / "pickled_model" / "1").mkdir(parents=True)
    torch.save(PickleTrap(str(pickle_marker)), str(target / "pickled_model" / "1" / "model.pt"))
    (target / "pickled_model" / "config.pbtxt").write_text(PICKLED_CONFIG)
    return target


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[WeirProcess]:
    with serving(repository, "--model-control-mode", "explicit", "--load-model", "*") as running:
        yield running


@pytest.fixture(scope="module")
def restricted_server(demo_repository_template: Path, workdir: Path) -> Iterator[WeirProcess]:
    target = workdir / "restricted-repository"
    shutil.copytree(demo_repository_template, target)
    with serving(target, "--model-control-mode", "none", "--max-tensor-elements", str(MAX_TENSOR_ELEMENTS)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: WeirProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def restricted_stub(restricted_server: WeirProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(restricted_server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def client(server: WeirProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.grpc_url) as triton:
        yield triton


# --- helpers ----------------------------------------------------------------------------------------


def mlp_request(
    shape: list[int] | None = None, model: str = "mlp_classifier", version: str = "", datatype: str = "FP32"
) -> service_pb2.ModelInferRequest:
    """A raw-contents request for mlp_classifier: correct unless a parameter says otherwise."""
    shape = shape if shape is not None else [2, 256]
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="INPUT__0", datatype=datatype, shape=shape)
    elements = int(np.prod([max(dim, 0) for dim in shape]))
    request.raw_input_contents.append(np.zeros(elements, dtype=np.float32).tobytes())
    return request


def call_error(method: grpc.UnaryUnaryMultiCallable, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=RPC_TIMEOUT)
    return caught.value


def assert_error(error: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    details = error.details() or ""
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"


def assert_still_serving(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(mlp_request([1, 256]), timeout=RPC_TIMEOUT)
    assert [(o.name, list(o.shape)) for o in response.outputs] == [("OUTPUT__0", [1, 10])]
    assert len(response.raw_output_contents[0]) == 10 * 4


def model_stats(stub: service_pb2_grpc.GRPCInferenceServiceStub, name: str) -> service_pb2.ModelStatistics:
    response = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=name), timeout=RPC_TIMEOUT)
    assert len(response.model_stats) == 1
    return response.model_stats[0]


def slow_request(iterations: int) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="slow")
    request.inputs.add(name="N", datatype="INT64", shape=[1])
    request.raw_input_contents.append(np.array([iterations], dtype="<i8").tobytes())
    return request


def pending_requests(server: WeirProcess, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=RPC_TIMEOUT) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "weir_inference_pending_request_count" and sample.labels.get("model") == model:
                return sample.value
    return 0.0


# --- model and version resolution ---------------------------------------------------------------------


def test_unknown_model_is_not_found(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(stub.ModelInfer, mlp_request(model="no_such_model"))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "model_name", "no_such_model")
    error = call_error(stub.ModelMetadata, service_pb2.ModelMetadataRequest(name="no_such_model"))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "no_such_model")
    assert_still_serving(stub)


def test_unknown_version_is_not_found(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(stub.ModelInfer, mlp_request(version="7"))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "model_version", "mlp_classifier", "7", "[1]")
    assert_still_serving(stub)


def test_non_integer_version_is_invalid(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(stub.ModelInfer, mlp_request(version="latest"))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "model_version", "expected a version number", "'latest'")
    assert_still_serving(stub)


# --- request validation -------------------------------------------------------------------------------


def test_wrong_datatype(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="mlp_classifier")
    request.inputs.add(name="INPUT__0", datatype="FP64", shape=[1, 256])
    request.raw_input_contents.append(np.zeros(256, dtype=np.float64).tobytes())
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", "datatype", "expected FP32", "FP64")
    assert_still_serving(stub)


def test_wrong_shape(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(stub.ModelInfer, mlp_request([2, 255]))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", "shape", "[-1, 256]", "[2, 255]")
    error = call_error(stub.ModelInfer, mlp_request([2, 16, 16]))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", "[-1, 256]", "[2, 16, 16]")
    assert_still_serving(stub)


def test_negative_dimension(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(stub.ModelInfer, mlp_request([-1, 256]))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", "non-negative", "[-1, 256]")
    assert_still_serving(stub)


def test_batch_over_max_batch_size(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(stub.ModelInfer, mlp_request([65, 256]))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", "max_batch_size", "64", "65")
    error = call_error(stub.ModelInfer, mlp_request([0, 256]))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", "max_batch_size", "got 0")
    assert_still_serving(stub)


def test_wrong_raw_byte_count(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = mlp_request([2, 256])
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", "raw_input_contents", "2048", "2044")
    assert_still_serving(stub)


def test_raw_entry_count_must_match_inputs(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = mlp_request([1, 256])
    request.raw_input_contents.append(b"\x00" * 1024)
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents", "(1)", "got 2")
    assert_still_serving(stub)


def test_mixed_raw_and_typed_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = mlp_request([1, 256])
    request.inputs[0].contents.fp32_contents.extend([0.0] * 256)
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", "contents", "raw_input_contents")
    assert_still_serving(stub)


def test_wrong_typed_value_count(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="mlp_classifier")
    tensor = request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 256])
    tensor.contents.fp32_contents.extend([0.0] * 255)
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", "fp32_contents", "256", "255")
    assert_still_serving(stub)


def test_unknown_input(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = mlp_request([1, 256])
    request.inputs[0].name = "INPUT__9"
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].name", "['INPUT__0']", "'INPUT__9'")
    assert_still_serving(stub)


def test_missing_input(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(stub.ModelInfer, service_pb2.ModelInferRequest(model_name="mlp_classifier"))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "inputs", "['INPUT__0']", "missing")
    assert_still_serving(stub)


def test_unknown_requested_output(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = mlp_request([1, 256])
    request.outputs.add(name="OUTPUT__0")
    request.outputs.add(name="PROBABILITIES")
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "outputs[1].name", "['OUTPUT__0']", "'PROBABILITIES'")
    assert_still_serving(stub)


def test_duplicate_input(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = mlp_request([1, 256])
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(request.raw_input_contents[0])
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "inputs[1].name", "'INPUT__0'", "more than once")
    assert_still_serving(stub)


def test_malformed_raw_bytes_tensor(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="text_stats")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(struct.pack("<I", 100) + b"abc")  # declares 100 bytes, carries 3
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "'TEXT'", "raw_input_contents", "100 bytes", "3 remain")
    request.raw_input_contents[0] = struct.pack("<I", 3) + b"abc" + b"left over"
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "'TEXT'", "1 BYTES elements", "9 bytes left over")
    assert_still_serving(stub)


def test_undecodable_text_for_a_string_model(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="text_stats")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"\xff\xfe")
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "'TEXT'", "UTF-8", "undecodable")
    assert_still_serving(stub)


def test_fp16_sent_typed_is_refused(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="fp16_double")
    tensor = request.inputs.add(name="X", datatype="FP16", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "'X'", "FP16", "raw_input_contents", "typed contents")
    # The same values sent raw are fine.
    good = service_pb2.ModelInferRequest(model_name="fp16_double")
    good.inputs.add(name="X", datatype="FP16", shape=[1, 4])
    good.raw_input_contents.append(np.array([1, 2, 3, 4], dtype="<f2").tobytes())
    response = stub.ModelInfer(good, timeout=RPC_TIMEOUT)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], dtype="<f2"), [2, 4, 6, 8])
    assert_still_serving(stub)


def test_element_count_over_max_tensor_elements(
    restricted_stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    error = call_error(restricted_stub.ModelInfer, mlp_request([8, 256]))  # 2048 > 1024 elements
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT__0", f"at most {MAX_TENSOR_ELEMENTS} elements", "2048")
    # At the limit is fine.
    response = restricted_stub.ModelInfer(mlp_request([4, 256]), timeout=RPC_TIMEOUT)
    assert list(response.outputs[0].shape) == [4, 10]
    assert_still_serving(restricted_stub)


# --- model control ------------------------------------------------------------------------------------


def test_load_and_unload_refused_in_mode_none(restricted_stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(
        restricted_stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name="text_stats")
    )
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "load", "explicit", "'none'")
    error = call_error(
        restricted_stub.RepositoryModelUnload, service_pb2.RepositoryModelUnloadRequest(model_name="text_stats")
    )
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "unload", "explicit", "'none'")
    ready = restricted_stub.ModelReady(service_pb2.ModelReadyRequest(name="text_stats"), timeout=RPC_TIMEOUT)
    assert ready.ready
    assert_still_serving(restricted_stub)


def test_load_of_missing_model_directory_is_not_found(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name="no_such_dir"))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "model_name", "'no_such_dir'")
    error = call_error(stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name="../repository"))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "model_name", "'../repository'")
    assert_still_serving(stub)


def test_bad_repository_requests(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = call_error(stub.RepositoryModelUnload, service_pb2.RepositoryModelUnloadRequest(model_name="nope"))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "model_name", "'nope'", "not loaded")

    request = service_pb2.RepositoryModelLoadRequest(model_name="text_stats")
    request.parameters["reload_now"].bool_param = True
    error = call_error(stub.RepositoryModelLoad, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "parameters", "'config'", "'reload_now'")

    request = service_pb2.RepositoryModelLoadRequest(model_name="text_stats")
    request.parameters["config"].string_param = "{not json"
    error = call_error(stub.RepositoryModelLoad, request)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "parameters['config']", "JSON ModelConfig")

    error = call_error(stub.ModelStatistics, service_pb2.ModelStatisticsRequest(version="1"))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "version", "expected empty", "name is empty")

    ready = stub.ModelReady(service_pb2.ModelReadyRequest(name="text_stats"), timeout=RPC_TIMEOUT)
    assert ready.ready
    assert_still_serving(stub)


def test_infer_on_unloaded_model_is_unavailable(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    request = service_pb2.ModelInferRequest(model_name="text_stats")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hi")
    client.unload_model("text_stats", client_timeout=RPC_TIMEOUT)
    try:
        assert not client.is_model_ready("text_stats", client_timeout=RPC_TIMEOUT)
        error = call_error(stub.ModelInfer, request)
        assert_error(error, grpc.StatusCode.UNAVAILABLE, "text_stats", "not ready", "unloaded")
        assert_still_serving(stub)
    finally:
        client.load_model("text_stats", client_timeout=RPC_TIMEOUT)
    assert stub.ModelInfer(request, timeout=RPC_TIMEOUT).outputs


# --- bad repository contents -------------------------------------------------------------------------


def test_invalid_config_leaves_the_other_models_serving(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=RPC_TIMEOUT)
    entries = [model for model in index.models if model.name == "broken_config"]
    assert len(entries) == 1, index
    assert entries[0].state == "UNAVAILABLE"
    assert "config.pbtxt" in entries[0].reason and "cannot parse" in entries[0].reason
    ready_only = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=RPC_TIMEOUT)
    assert "broken_config" not in {model.name for model in ready_only.models}
    assert {"mlp_classifier", "mlp_export", "text_stats"} <= {model.name for model in ready_only.models}

    ready = stub.ModelReady(service_pb2.ModelReadyRequest(name="broken_config"), timeout=RPC_TIMEOUT)
    assert not ready.ready
    request = service_pb2.ModelInferRequest(model_name="broken_config")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([0.0] * 4)
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.UNAVAILABLE, "broken_config", "not ready", "cannot parse")
    assert_still_serving(stub)


def test_pickled_module_is_refused_without_unpickling(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, server: WeirProcess, pickle_marker: Path, tmp_path: Path
) -> None:
    # The trap works: unpickling a copy (pointing at another marker) does create its marker.
    control_marker = tmp_path / "control-marker"
    control_file = tmp_path / "control.pt"
    torch.save(PickleTrap(str(control_marker)), str(control_file))
    torch.load(str(control_file), weights_only=False).close()
    assert control_marker.exists()

    # Refused at start: the log names the reason, the model is not ready and does not answer.
    refusals = [
        record
        for record in server.log_records()
        if record.get("model") == "pickled_model" and record.get("msg") == "model version failed to load"
    ]
    assert len(refusals) == 1, server.log_lines[-20:]
    assert "pickle" in str(refusals[0]["reason"]) and "model.pt" in str(refusals[0]["reason"])
    assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="pickled_model"), timeout=RPC_TIMEOUT).ready
    request = service_pb2.ModelInferRequest(model_name="pickled_model")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([0.0] * 4)
    error = call_error(stub.ModelInfer, request)
    assert_error(error, grpc.StatusCode.UNAVAILABLE, "pickled_model", "not ready")

    # Refused again when loaded by RPC, with the reason in the status message.
    error = call_error(stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name="pickled_model"))
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "pickled_model", "version 1", "pickle")

    assert not pickle_marker.exists(), "the server unpickled the model file"
    assert_still_serving(stub)


def test_failed_version_is_unavailable_in_repository_index(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=RPC_TIMEOUT)
    entries = [(m.version, m.state, m.reason) for m in index.models if m.name == "pickled_model"]
    assert len(entries) == 1, index
    version, state, reason = entries[0]
    assert (version, state) == ("1", "UNAVAILABLE")
    assert "pickle" in reason and "model.pt" in reason


# --- deadlines ----------------------------------------------------------------------------------------


def test_deadline_expiring_while_waiting_for_the_instance(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, server: WeirProcess
) -> None:
    # Calibrate the slow model on this machine so that the blocking request computes ~1 s.
    probe_iterations, probe_seconds = 25, 0.0
    while probe_seconds < 0.2 and probe_iterations < 1_000_000:
        probe_iterations *= 4
        started = time.monotonic()
        stub.ModelInfer(slow_request(probe_iterations), timeout=RPC_TIMEOUT)
        probe_seconds = time.monotonic() - started
    iterations = max(1, int(probe_iterations * SLOW_TARGET_SECONDS / probe_seconds))

    before = model_stats(stub, "slow")
    outcome: dict[str, object] = {}

    def blocking() -> None:
        try:
            outcome["response"] = stub.ModelInfer(slow_request(iterations), timeout=RPC_TIMEOUT)
        except grpc.RpcError as error:  # reported by the main thread's assertions
            outcome["error"] = error

    worker = threading.Thread(target=blocking)
    worker.start()
    try:
        # Wait (bounded) until the slow request is in the server and holds the only instance.
        deadline = time.monotonic() + 10
        while pending_requests(server, "slow") < 1:
            assert time.monotonic() < deadline, "the slow request never reached the server"
            time.sleep(0.01)
        waited = time.monotonic()
        error = call_error_with_timeout(stub, slow_request(0), 0.2)
        elapsed = time.monotonic() - waited
    finally:
        worker.join(timeout=RPC_TIMEOUT)
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert elapsed < SLOW_TARGET_SECONDS, "the deadline did not cut the wait short"

    after = model_stats(stub, "slow")
    assert after.execution_count - before.execution_count == 1  # only the blocking request computed
    assert after.inference_count - before.inference_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1

    # The instance is free again and the server keeps serving.
    response = stub.ModelInfer(slow_request(0), timeout=RPC_TIMEOUT)
    assert list(response.outputs[0].shape) == [1]
    assert model_stats(stub, "slow").execution_count == after.execution_count + 1
    assert_still_serving(stub)


def call_error_with_timeout(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, request: service_pb2.ModelInferRequest, timeout: float
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=timeout)
    return caught.value
