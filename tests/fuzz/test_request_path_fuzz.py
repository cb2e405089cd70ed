"""Property-based tests of the request path over gRPC, against one in-process server (its own event
loop on a background thread, demo models plus a flat BYTES model and a batched BYTES model):
generated ModelInferRequests (any names, versions, datatypes, shapes, raw bytes, parameters), on
ModelInfer and on one ModelStreamInfer stream, and undecodable bodies, never answer UNKNOWN or
INTERNAL (nor hang), and the server stays healthy. The issue's reproductions are explicit cases."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import build_demo_repository
import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import inprocess_settings
from tests.fuzz.budget import examples
from tests.fuzz.strategies import InputShape, hostile_requests
from weir.server import WeirServer
from weir.settings import ControlMode
from weir_proto.inference import messages as pb
from weir_proto.inference.pool import SERVICE

pytestmark = pytest.mark.timeout(600)

RPC_TIMEOUT = 30
MAX_MESSAGE_CHARS = 4096
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
SERVICE_PATH = f"/{SERVICE.full_name}"
# What the repository's models expect (ModelMetadata's shapes).
EXPECTED = [
    InputShape("INPUT__0", "FP32", (-1, 256)),
    InputShape("features", "FP32", (-1, 256)),
    InputShape("TEXT", "BYTES", (-1, 1)),
    InputShape("TEXT", "BYTES", (-1,)),
]
MODELS = ["mlp_classifier", "mlp_export", "text_stats", "text_flat", "text_batched"]

# The text model for finding 2: one BYTES input of dims [-1], max_batch_size 0.
TEXT_FLAT_CONFIG = """
backend: "pytorch"
max_batch_size: 0
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "STATS" data_type: TYPE_FP32 dims: [ -1, 2 ] }, { name: "UPPER" data_type: TYPE_STRING dims: [ -1 ] } ]
"""
# Finding 1: a batched BYTES model whose queue delay gathers concurrent requests into one batch.
TEXT_BATCHED_CONFIG = """
backend: "pytorch"
max_batch_size: 64
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "STATS" data_type: TYPE_FP32 dims: [ 2 ] }, { name: "UPPER" data_type: TYPE_STRING dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 200000 }
"""


class BackgroundServer:
    """A WeirServer on its own event loop in a daemon thread, for synchronous gRPC clients."""

    def __init__(self, repository: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.thread.start()
        self.server: WeirServer = self._call(self._start(repository), 180)

    async def _start(self, repository: Path) -> WeirServer:
        server = WeirServer(
            inprocess_settings(repository, model_control_mode=ControlMode.EXPLICIT, load_model=("*",), metrics_port=-1)
        )
        await server.start()
        return server

    def _call(self, coroutine, timeout: float):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self._call(self.server.stop(grace_seconds=1), 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(demo_repository_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    repository = tmp_path_factory.mktemp("fuzz-repository")
    shutil.copytree(demo_repository_template, repository, dirs_exist_ok=True)
    for name, config in (("text_flat", TEXT_FLAT_CONFIG), ("text_batched", TEXT_BATCHED_CONFIG)):
        (repository / name / "1").mkdir(parents=True)
        torch.jit.save(torch.jit.script(build_demo_repository.TextStats()), str(repository / name / "1" / "model.pt"))
        (repository / name / "config.pbtxt").write_text(config)
    # "scratch" is what hostile RepositoryModelLoad configs are tried on, so no other model changes.
    shutil.copytree(repository / "mlp_classifier", repository / "scratch")
    (repository / "scratch" / "config.pbtxt").write_text(
        (repository / "scratch" / "config.pbtxt").read_text().replace("mlp_classifier", "scratch")
    )
    running = BackgroundServer(repository)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{server.server.grpc_port}", options=options) as opened:
        yield opened


def unary(channel: grpc.Channel, method: str, response_class):  # type: ignore[no-untyped-def]
    return channel.unary_unary(
        f"{SERVICE_PATH}/{method}",
        request_serializer=lambda message: message if isinstance(message, bytes) else message.SerializeToString(),
        response_deserializer=response_class.FromString,
    )


def infer(channel: grpc.Channel, request: pb.ModelInferRequest | bytes) -> pb.ModelInferResponse:
    return unary(channel, "ModelInfer", pb.ModelInferResponse)(request, timeout=RPC_TIMEOUT)


def stream(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    return channel.stream_stream(
        f"{SERVICE_PATH}/ModelStreamInfer",
        request_serializer=lambda message: message if isinstance(message, bytes) else message.SerializeToString(),
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )


def assert_client_error(error: grpc.RpcError) -> None:
    assert error.code() not in NEVER, f"{error.code()}: {error.details()}"
    assert len(error.details() or "") <= MAX_MESSAGE_CHARS, f"{len(error.details())}-character status message"


def good_request(request_id: str = "good") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp_classifier", id=request_id)
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(np.ones((1, 256), np.float32).tobytes())
    return request


def text_request(model: str, texts: list[bytes], shape: list[int], request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(text)) + text for text in texts))
    return request


def assert_healthy(channel: grpc.Channel) -> None:
    assert unary(channel, "ServerLive", pb.ServerLiveResponse)(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT).live
    response = infer(channel, good_request())
    assert response.outputs[0].shape == [1, 10]


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


HUGE_CLAIM = text_request("text_flat", [b"a"], [67108864])  # 43 bytes on the wire, 64 Mi elements claimed
LONG_NAME = text_request("text_flat", [b"a"], [1])
LONG_NAME.inputs[0].name = "n" * 100_000


@settings(max_examples=examples(300))
@given(request=hostile_requests(EXPECTED, MODELS))
@example(request=HUGE_CLAIM)
@example(request=LONG_NAME)
@example(request=text_request("text_stats", [b"\xff\xfe"], [1, 1]))
@example(request=text_request("text_flat", [b"\xc3\x28", b"ok"], [2]))
def test_generated_requests_never_answer_unknown_or_internal(
    channel: grpc.Channel, request: pb.ModelInferRequest
) -> None:
    try:
        infer(channel, request)
    except grpc.RpcError as error:
        assert_client_error(error)


@settings(max_examples=examples(40))
@given(requests=st.lists(hostile_requests(EXPECTED, MODELS), min_size=1, max_size=6))
@example(requests=[HUGE_CLAIM, good_request("after")])
def test_a_stream_answers_every_generated_request_in_band_and_stays_open(
    channel: grpc.Channel, requests: list[pb.ModelInferRequest]
) -> None:
    answers = list(stream(channel)(iter(requests), timeout=RPC_TIMEOUT))
    assert len(answers) == len(requests)
    for answer in answers:
        assert "internal error" not in answer.error_message, answer.error_message
        assert len(answer.error_message) <= MAX_MESSAGE_CHARS


@settings(max_examples=examples(200))
@given(body=st.binary(max_size=256))
@example(body=b"\xff\xff\xff\xff")  # issue 14 finding 5: answered UNKNOWN with grpcio's DecodeError text
@example(body=b"\x0a\x05\xff\xfe\xfd\xfc\xfb")  # model_name with invalid UTF-8
@example(body=b"\x2a\xff\xff\xff\xff\x0f")  # an input claiming 4 GiB
def test_undecodable_bodies_answer_invalid_argument_not_unknown(channel: grpc.Channel, body: bytes) -> None:
    try:
        infer(channel, body)
    except grpc.RpcError as error:
        assert_client_error(error)


def test_one_bad_frame_does_not_end_a_stream(channel: grpc.Channel) -> None:
    """Issue 14 finding 5: an undecodable frame is answered in-band; the next request is served."""
    answers = list(stream(channel)(iter([b"\xff\xff\xff\xff", good_request("after-bad-frame")]), timeout=RPC_TIMEOUT))
    assert any(answer.infer_response.id == "after-bad-frame" and not answer.error_message for answer in answers), [
        (answer.infer_response.id, answer.error_message) for answer in answers
    ]
    assert_healthy(channel)


@pytest.mark.parametrize("version", [" 1", "+1", "1\n", "١", "𝟏", "1_0", "1 ", "٠١", "1.0", "-1"])  # noqa: RUF001
def test_versions_other_than_ascii_digits_are_not_resolved(channel: grpc.Channel, version: str) -> None:
    """Issue 14 finding 9: " 1", "+1", "1\\n", Arabic-Indic and mathematical digits resolved to 1, "1_0" to 10."""
    request = good_request()
    request.model_version = version
    with pytest.raises(grpc.RpcError) as raised:
        infer(channel, request)
    assert raised.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), raised.value
    ready = unary(channel, "ModelReady", pb.ModelReadyResponse)(
        pb.ModelReadyRequest(name="mlp_classifier", version=version), timeout=RPC_TIMEOUT
    )
    assert not ready.ready


@settings(max_examples=examples(100))
@given(version=st.text(max_size=4))
def test_any_version_text_resolves_only_as_ascii_digits(channel: grpc.Channel, version: str) -> None:
    request = good_request()
    request.model_version = version
    canonical = version == "" or (version.isascii() and version.isdigit() and int(version) == 1)
    try:
        infer(channel, request)
    except grpc.RpcError as error:
        assert_client_error(error)
        assert not canonical, f"version {version!r}: {error.details()}"
    else:
        assert canonical, f"version {version!r} was served"


def test_a_100k_character_input_name_answers_invalid_argument(channel: grpc.Channel) -> None:
    """Issue 14 finding 8: it answered RESOURCE_EXHAUSTED (the whole name echoed into the status)."""
    with pytest.raises(grpc.RpcError) as raised:
        infer(channel, LONG_NAME)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()[:200]
    assert len(raised.value.details()) <= MAX_MESSAGE_CHARS


def test_a_43_byte_request_claiming_64mi_bytes_elements_allocates_nothing_like_it(channel: grpc.Channel) -> None:
    """Issue 14 finding 2: four concurrent ones added 2 GiB RSS and stalled other traffic."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts over from the current RSS
    before = peak_rss_bytes()
    calls = [
        unary(channel, "ModelInfer", pb.ModelInferResponse).future(HUGE_CLAIM, timeout=RPC_TIMEOUT) for _ in range(4)
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as raised:
            call.result()
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    grown = peak_rss_bytes() - before
    assert grown < 256 << 20, f"peak RSS grew by {grown >> 20} MiB"
    assert_healthy(channel)


def test_one_non_utf8_request_does_not_fail_its_batch(channel: grpc.Channel) -> None:
    """Issue 14 finding 1: a non-UTF-8 string failed every request batched with it (the batcher is
    work-conserving, so the bad request goes in the middle of a burst, where requests queue)."""
    call = unary(channel, "ModelInfer", pb.ModelInferResponse)

    def send(texts: list[bytes], request_id: str):  # type: ignore[no-untyped-def]
        return call.future(text_request("text_batched", texts, [1, 1], request_id), timeout=RPC_TIMEOUT)

    good = {f"good-{index}": send([f"word {index}".encode()], f"good-{index}") for index in range(20)}
    bad = send([b"\xff\xfe"], "bad")
    good.update({f"good-{index}": send([f"word {index}".encode()], f"good-{index}") for index in range(20, 40)})
    with pytest.raises(grpc.RpcError) as raised:
        bad.result()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    failures = []
    for request_id, future in good.items():
        try:
            response = future.result()
        except grpc.RpcError as error:
            failures.append(f"{request_id}: {error.code()} {error.details()}")
            continue
        stats = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 2)
        assert stats.tolist() == [[len(f"word {request_id.split('-')[1]}"), 2.0]]
    assert failures == []


def hostile_config(change: str, tmp: Path) -> str:
    """scratch's config as JSON (RepositoryModelLoad's `config` parameter) with ``change`` applied."""
    config = pb.ModelConfig(name="scratch", backend="pytorch", max_batch_size=64)
    config.input.add(name="INPUT__0", data_type=pb.DataType.TYPE_FP32, dims=[256])
    config.output.add(name="OUTPUT__0", data_type=pb.DataType.TYPE_FP32, dims=[10])
    if change == "dims 2^62":
        config.input[0].dims[:] = [2**62]
    elif change == "warm-up batch 2^31-1" or change == "warm-up file outside":
        warmup = config.model_warmup.add(name="w", batch_size=2**31 - 1 if change == "warm-up batch 2^31-1" else 1)
        sample = warmup.inputs["INPUT__0"]
        sample.data_type = pb.DataType.TYPE_FP32
        sample.dims[:] = [256]
        if change == "warm-up file outside":
            outside = tmp / "outside.bin"
            outside.write_bytes(np.zeros(256, np.float32).tobytes())
            sample.input_data_file = str(outside)
        else:
            sample.zero_data = True
    elif change == "queue delay 2^64-1":
        config.dynamic_batching.max_queue_delay_microseconds = 2**64 - 1
    elif change == "model file outside":
        outside = tmp / "outside" / "model.pt"
        outside.parent.mkdir(exist_ok=True)
        torch.jit.save(torch.jit.script(build_demo_repository.MLPClassifier()), str(outside))
        config.default_model_filename = str(outside)
    elif change == "model file ../":
        config.default_model_filename = "../../mlp_classifier/1/model.pt"
    return json_format.MessageToJson(config)


@pytest.mark.parametrize(
    "change",
    [
        "dims 2^62",
        "warm-up batch 2^31-1",
        "warm-up file outside",
        "queue delay 2^64-1",
        "model file outside",
        "model file ../",
    ],
)
def test_hostile_load_configs_are_refused_with_a_client_error(
    channel: grpc.Channel, change: str, tmp_path: Path
) -> None:
    """Issue 14 finding 4 (the cheap cases; the memory-hungry ones run under a memory cap in tests/chaos)."""
    request = pb.RepositoryModelLoadRequest(model_name="scratch")
    request.parameters["config"].string_param = hostile_config(change, tmp_path)
    with pytest.raises(grpc.RpcError) as raised:
        unary(channel, "RepositoryModelLoad", pb.RepositoryModelLoadResponse)(request, timeout=120)
    assert_client_error(raised.value)
    assert raised.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert_healthy(channel)


def test_the_server_is_healthy_after_all_of_the_above(channel: grpc.Channel) -> None:
    assert_healthy(channel)
    index = unary(channel, "RepositoryIndex", pb.RepositoryIndexResponse)(pb.RepositoryIndexRequest(), timeout=30)
    ready = {model.name for model in index.models if model.state == "READY"}
    assert {"mlp_classifier", "mlp_export", "text_stats", "text_flat", "text_batched"} <= ready, json.dumps(
        sorted(ready)
    )
