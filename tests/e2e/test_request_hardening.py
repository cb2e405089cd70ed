"""End to end: what a hostile client sends on the request path (issue 14, findings 1, 2, 8 and 9).

- One request with a non-UTF-8 string among many valid ones on a batched BYTES model: the valid ones
  all succeed and the bad one alone gets INVALID_ARGUMENT naming the input (``WeirServer`` in this
  process, real gRPC, Triton's asyncio client, a gate that lines the requests up in one queue).
- A 43-byte request claiming 64 Mi BYTES elements, sent to a real ``weir serve`` whose address space
  is capped (``prlimit``) a few hundred MiB above its own size: it must be refused with
  INVALID_ARGUMENT, not allocated (which the cap would turn into a failure instead of a 512 MiB
  RSS jump).
- A 100k-character input name answers INVALID_ARGUMENT with the name clipped, not
  RESOURCE_EXHAUSTED; unsupported protocol extensions (classification, shared memory, non-binary
  outputs) are refused, not ignored.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from torch import nn
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from tests.conftest import WeirProcess, inprocess_settings, serving, write_torchscript_model
from weir.enrichment import MAX_ENTITY_KEY_CHARS, Enricher, EnrichmentSpec
from weir.errors import InvalidArgumentError
from weir.server import WeirServer
from weir.settings import ControlMode
from weir_proto.feature_definitions import parse_definitions
from weir_proto.online_store import SqliteOnlineStore

pytestmark = pytest.mark.timeout(120)

RPC_TIMEOUT = 30.0
WAIT_TIMEOUT = 15.0
GATE_TIMEOUT = 30.0
VALID_REQUESTS = 30
ADDRESS_SPACE_HEADROOM = 384 * 1024 * 1024  # less than the 512 MiB the claimed elements would take
CLAIMED_ELEMENTS = 64 * 1024 * 1024  # the reproduction's shape; also --max-tensor-elements' default


class Lengths(nn.Module):
    """Each text's length in characters: a BYTES model (TorchScript takes the texts as List[str])."""

    def forward(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([len(text) for text in texts], dtype=torch.int64).reshape(-1, 1)


class FlatLengths(nn.Module):
    def forward(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([len(text) for text in texts], dtype=torch.int64)


BATCHED_CONFIG = """
name: "lengths"
backend: "pytorch"
max_batch_size: 64
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "LEN" data_type: TYPE_INT64 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { }
"""

# The reproduction's model: one BYTES input of any length, no batching.
UNBATCHED_CONFIG = """
name: "claims"
backend: "pytorch"
max_batch_size: 0
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "LEN" data_type: TYPE_INT64 dims: [ -1 ] } ]
"""


# --- finding 1: one bad request among many valid ones on a batched BYTES model ---------------------


class Gate:
    """Holds every execution of a model until the test opens it, recording each batch's texts."""

    def __init__(self, server: WeirServer, model: str) -> None:
        backend = server.repository.resolve(model, "").backend
        original = backend.infer
        self._opened = threading.Event()
        self._lock = threading.Lock()
        self.batches: list[list[bytes]] = []

        def gated(inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
            with self._lock:
                self.batches.append(list(inputs["TEXT"].reshape(-1)))
            if not self._opened.wait(GATE_TIMEOUT):
                raise RuntimeError("test gate was never opened")
            return original(inputs, output_names)

        backend.infer = gated  # type: ignore[method-assign]

    @property
    def arrived(self) -> int:
        with self._lock:
            return len(self.batches)

    def open(self) -> None:
        self._opened.set()


@asynccontextmanager
async def batched_server(repository: Path) -> AsyncIterator[tuple[WeirServer, InferenceServerClient]]:
    server = WeirServer(inprocess_settings(repository))
    await server.start()
    client = InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(grace_seconds=1)


async def eventually(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)


async def infer_text(client: InferenceServerClient, text: bytes) -> np.ndarray:
    tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text]], dtype=object))
    result = await client.infer("lengths", [tensor], client_timeout=RPC_TIMEOUT)
    return result.as_numpy("LEN")


async def test_one_non_utf8_request_fails_alone_among_concurrent_valid_ones(tmp_path: Path) -> None:
    write_torchscript_model(tmp_path, "lengths", Lengths(), BATCHED_CONFIG)
    bad_text = b"caf\xe9 latin-1"  # not UTF-8
    async with batched_server(tmp_path) as (server, client):
        gate = Gate(server, "lengths")
        first = asyncio.create_task(infer_text(client, b"x" * 40))  # holds the only instance
        await eventually(lambda: gate.arrived == 1, "the first request to reach the model")

        texts = [("t" * index).encode() for index in range(1, VALID_REQUESTS + 1)]
        valid = [asyncio.create_task(infer_text(client, text)) for text in texts[: VALID_REQUESTS // 2]]
        bad = asyncio.create_task(infer_text(client, bad_text))  # sent mid-burst, among the others
        valid += [asyncio.create_task(infer_text(client, text)) for text in texts[VALID_REQUESTS // 2 :]]

        def queue_depth() -> float:
            return server.registry.get_sample_value("weir_queue_depth", {"model": "lengths", "version": "1"}) or 0.0

        await eventually(lambda: queue_depth() >= VALID_REQUESTS, "every valid request queued behind the first")
        gate.open()
        results = await asyncio.gather(first, *valid, bad, return_exceptions=True)

    *answers, refusal = results
    for text, answer in zip([b"x" * 40, *texts], answers, strict=True):
        assert not isinstance(answer, BaseException), f"a valid request failed: {answer}"
        assert answer.tolist() == [[len(text)]]
    assert isinstance(refusal, InferenceServerException), refusal
    assert refusal.status() == "StatusCode.INVALID_ARGUMENT", refusal
    assert "'TEXT'" in refusal.message() and "UTF-8" in refusal.message(), refusal.message()
    # The bad text never reached the model, and the valid ones really shared executions.
    assert all(bad_text not in batch for batch in gate.batches)
    assert max(len(batch) for batch in gate.batches) > 1, gate.batches


# --- a real `weir serve` with its address space capped ---------------------------------------------


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeirProcess]:
    """`weir serve` over the reproduction's model, its address space capped a little above what it
    uses once warm: an allocation of the size the hostile claim asks for fails instead of growing."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    repository = tmp_path_factory.mktemp("hardening")
    write_torchscript_model(repository, "claims", FlatLengths(), UNBATCHED_CONFIG)
    with serving(repository) as running:
        with grpc.insecure_channel(running.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert list(stub.ModelInfer(claim_request([3], texts=[b"a", b"bc", b"def"])).outputs[0].shape) == [3]
        size = vm_bytes(running, "VmSize")
        cap = size + ADDRESS_SPACE_HEADROOM
        subprocess.run(["prlimit", "--pid", str(running.process.pid), f"--as={cap}:"], check=True)
        yield running
    shutil.rmtree(repository, ignore_errors=True)


@pytest.fixture
def stub(capped_server: WeirProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(capped_server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def vm_bytes(process: WeirProcess, field: str) -> int:
    with open(f"/proc/{process.process.pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{process.process.pid}/status")


def claim_request(shape: list[int], texts: list[bytes], name: str = "TEXT") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="claims")
    request.inputs.add(name=name, datatype="BYTES", shape=shape)
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(text)) + text for text in texts))
    return request


def assert_still_serving(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(claim_request([2], texts=[b"hello", b"ab"]), timeout=RPC_TIMEOUT)
    assert np.frombuffer(response.raw_output_contents[0], dtype="<i8").tolist() == [5, 2]


def test_a_43_byte_request_claiming_64mi_bytes_elements_is_refused_without_allocating_them(
    capped_server: WeirProcess, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    """Finding 2: four at once took +2 GiB RSS and stalled other traffic for 5 s. Under the cap an
    allocation of the claim fails (INTERNAL) instead; refused before allocating, it answers
    INVALID_ARGUMENT and the resident size barely moves."""
    hostile = claim_request([CLAIMED_ELEMENTS], texts=[b"a"])
    assert hostile.ByteSize() < 64
    peak_before = vm_bytes(capped_server, "VmHWM")
    calls = [stub.ModelInfer.future(hostile, timeout=RPC_TIMEOUT) for _ in range(4)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call.result()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "'TEXT'" in (caught.value.details() or "") and str(CLAIMED_ELEMENTS) in (caught.value.details() or "")
    assert_still_serving(stub)
    grown = vm_bytes(capped_server, "VmHWM") - peak_before
    assert grown < 64 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.0f} MiB"


def test_a_100k_character_input_name_answers_invalid_argument_with_the_name_clipped(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """Finding 8: the whole name went into the status, which outgrew its metadata: RESOURCE_EXHAUSTED."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(claim_request([1], texts=[b"a"], name="n" * 100_000), timeout=RPC_TIMEOUT)
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (caught.value.code(), details[:200])
    assert "inputs[0].name" in details and "nnnn" in details and "(100000 characters)" in details
    assert len(details) < 1000
    assert_still_serving(stub)


def test_a_100k_character_model_name_answers_not_found_with_the_name_clipped(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = claim_request([1], texts=[b"a"])
    request.model_name = "m" * 100_000
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=RPC_TIMEOUT)
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (caught.value.code(), details[:200])
    assert "model_name" in details and "(100000 characters)" in details and len(details) < 1000
    assert_still_serving(stub)


def test_a_request_for_classification_is_refused_not_ignored(capped_server: WeirProcess) -> None:
    """Finding 9: tritonclient's class_count asks for labels instead of the tensor."""
    tensor = grpcclient.InferInput("TEXT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"abc"], dtype=object))
    with grpcclient.InferenceServerClient(capped_server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("claims", [tensor], outputs=[grpcclient.InferRequestedOutput("LEN", class_count=2)])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'classification'" in caught.value.message() and "not supported" in caught.value.message()
        # The same request without class_count is answered, by the same client.
        result = client.infer("claims", [tensor], outputs=[grpcclient.InferRequestedOutput("LEN")])
        assert result.as_numpy("LEN").tolist() == [3]


def test_shared_memory_tensors_are_refused_not_ignored(capped_server: WeirProcess) -> None:
    """Finding 9: an input said to lie in a shared-memory region was refused as carrying no values,
    as if the client had forgotten the data; the message now says what is unsupported."""
    tensor = grpcclient.InferInput("TEXT", [1], "BYTES")
    tensor.set_shared_memory("region0", 8)
    with (
        grpcclient.InferenceServerClient(capped_server.grpc_url) as client,
        pytest.raises(InferenceServerException) as caught,
    ):
        client.infer("claims", [tensor])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'TEXT'" in caught.value.message() and "shared-memory" in caught.value.message()


def test_outputs_asked_as_typed_contents_are_refused(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = claim_request([1], texts=[b"abc"])
    request.outputs.add(name="LEN").parameters["binary_data"].bool_param = False
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'binary_data'" in (caught.value.details() or "")
    request.outputs[0].parameters["binary_data"].bool_param = True  # what Weir does anyway: answered
    assert np.frombuffer(stub.ModelInfer(request, timeout=RPC_TIMEOUT).raw_output_contents[0], "<i8").tolist() == [3]


# --- enrichment: an entity key is an id, not a buffer -----------------------------------------------


async def test_an_entity_key_longer_than_an_id_is_refused_before_the_store_or_the_cache(tmp_path: Path) -> None:
    """The enricher caches up to 100,000 keys: unbounded keys let one client pin gigabytes."""
    definitions = parse_definitions(
        {
            "entity": [{"name": "user"}],
            "feature_view": [
                {"name": "stats", "entities": ["user"], "source": "x", "features": [{"name": "v", "dtype": "FLOAT32"}]}
            ],
            "feature_service": [{"name": "svc", "features": ["stats:v"]}],
        },
        "test",
    )
    store = SqliteOnlineStore(tmp_path / "online.db")
    store.write("stats", [("u" * MAX_ENTITY_KEY_CHARS, time.time(), {"v": 1.5})])
    enricher = Enricher(definitions, store, "SQLite")
    spec = EnrichmentSpec("svc", "features", "user_id", None)
    try:
        request = service_pb2.ModelInferRequest(model_name="m")
        request.parameters["user_id"].string_param = "u" * 100_000
        with pytest.raises(InvalidArgumentError) as caught:
            await enricher.enrich(request, spec)
        assert "parameters['user_id']" in caught.value.message and "(100000 characters)" in caught.value.message
        request.parameters["user_id"].string_param = "u" * MAX_ENTITY_KEY_CHARS  # at the limit: enriched
        await enricher.enrich(request, spec)
        # A request with typed contents gets typed features (they once went in as a nested list: INTERNAL).
        assert list(request.inputs[0].contents.fp32_contents) == [1.5]
    finally:
        await enricher.aclose()


def test_every_rpc_naming_a_100k_character_model_answers_not_found_clipped(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """Finding 8 beyond ModelInfer: metadata, config and statistics quote the name they looked up."""
    name = "m" * 100_000
    calls = {
        "ModelMetadata": lambda: stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=name), timeout=RPC_TIMEOUT),
        "ModelConfig": lambda: stub.ModelConfig(service_pb2.ModelConfigRequest(name=name), timeout=RPC_TIMEOUT),
        "ModelReady": lambda: stub.ModelReady(service_pb2.ModelReadyRequest(name=name), timeout=RPC_TIMEOUT),
        "ModelStatistics": lambda: stub.ModelStatistics(
            service_pb2.ModelStatisticsRequest(name=name), timeout=RPC_TIMEOUT
        ),
    }
    for method, call in calls.items():
        try:
            answer = call()
        except grpc.RpcError as error:
            details = error.details() or ""
            assert error.code() == grpc.StatusCode.NOT_FOUND, (method, error.code(), details[:200])
            assert "(100000 characters)" in details and len(details) < 1000, (method, details[:300])
        else:
            assert method == "ModelReady" and not answer.ready, (method, answer)
    assert_still_serving(stub)


async def test_load_and_unload_of_a_100k_character_name_answer_not_found_and_keep_nothing(tmp_path: Path) -> None:
    """In explicit control mode a 100k-character name answered UNKNOWN (the file name is too long to
    look up), and each unload of an invented name kept a lock for it."""
    repository = tmp_path / "repository"
    write_torchscript_model(repository, "claims", FlatLengths(), UNBATCHED_CONFIG)
    server = WeirServer(inprocess_settings(repository, model_control_mode=ControlMode.EXPLICIT, load_model=("*",)))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for index in range(50):
                name = f"{index:03d}" + "m" * 100_000
                for call in (
                    stub.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name=name)),
                    stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name=name)),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call
                    details = caught.value.details() or ""
                    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (caught.value.code(), details[:200])
                    assert "(100003 characters)" in details and len(details) < 1000
            assert len(server.repository._locks) <= 1  # only the real model's
            ready = await stub.ModelReady(service_pb2.ModelReadyRequest(name="claims"))
            assert ready.ready
    finally:
        await server.stop(0)
