"""The data plane's gRPC transport against a hostile or careless client, on a real `weir serve`
subprocess: undecodable bodies, compression bombs, streams whose client never reads, and SIGTERM
while a computation runs far longer than the grace period.

Memory is measured on the server process itself (/proc/PID/status: VmHWM is the peak resident set
since start, VmRSS the current one), so a regression fails here instead of exhausting the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from tests.conftest import WeirProcess, serving, start_weir, write_torchscript_model
from tests.e2e.test_lifecycle import slow_inputs, wait_until, write_slow_version

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024
RPC_TIMEOUT = 60
SERVICE = "/inference.GRPCInferenceService"
MESSAGE_LIMIT = 16 * MiB  # --max-message-bytes of the module's server: a bomb needs to be only a few times that
STREAM_BACKLOG = 8 * MiB  # --stream-backlog-bytes of the module's server
ANSWER_ELEMENTS = MiB // 4  # FP32 elements of one 1 MiB tensor

ECHO_CONFIG = """\
name: "echo"
backend: "pytorch"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""


class Echo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0


def status_field(pid: int, name: str) -> int:
    """A /proc/PID/status memory field, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{name} not in /proc/{pid}/status")


def metric(server: WeirProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=RPC_TIMEOUT) as reply:
        text = reply.read().decode()
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]
    return sum(values)


def echo_request(request_id: str, elements: int = ANSWER_ELEMENTS, fill: float = 1.0) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="echo", id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=[1, elements])
    request.raw_input_contents.append(np.full(elements, fill, np.float32).tobytes())
    return request


@pytest.fixture(scope="module")
def server(demo_repository_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeirProcess]:
    repository = tmp_path_factory.mktemp("transport") / "repository"
    shutil.copytree(demo_repository_template, repository)
    write_torchscript_model(repository, "echo", Echo(), ECHO_CONFIG)
    with serving(
        repository, "--max-message-bytes", str(MESSAGE_LIMIT), "--stream-backlog-bytes", str(STREAM_BACKLOG)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: WeirProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(server.grpc_url, options=options) as opened:
        yield opened


# --- undecodable bodies -----------------------------------------------------------------------------


def test_undecodable_bodies_answer_invalid_argument_with_one_log_line_per_interval(
    server: WeirProcess, channel: grpc.Channel
) -> None:
    raw_infer = channel.unary_unary(f"{SERVICE}/ModelInfer")  # bytes go out as they are
    lines_before = len(server.log_lines)
    garbage = [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x1f\x8bnot gzip at all"]
    for attempt in range(30):
        with pytest.raises(grpc.RpcError) as caught:
            raw_infer(garbage[attempt % len(garbage)], timeout=RPC_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "request body: expected" in (caught.value.details() or "")
    # The server still serves, and said so in the log a few times at most, never with a traceback.
    answer = service_pb2.ModelInferResponse.FromString(
        raw_infer(echo_request("fine", elements=4).SerializeToString(), timeout=RPC_TIMEOUT)
    )
    assert answer.id == "fine"
    new_lines = server.log_lines[lines_before:]
    assert not any("Traceback" in line or '"exception"' in line for line in new_lines)
    refused = [
        record for record in server.log_records()[-len(new_lines) :] if record.get("msg") == "request bodies refused"
    ]
    assert 1 <= len(refused) < 10
    assert metric(server, "weir_request_refused_total") >= 30


def test_a_bad_frame_in_a_stream_is_answered_in_band_and_the_stream_goes_on(channel: grpc.Channel) -> None:
    raw_stream = channel.stream_stream(
        f"{SERVICE}/ModelStreamInfer", response_deserializer=service_pb2.ModelStreamInferResponse.FromString
    )
    frames = [
        echo_request("before", elements=4).SerializeToString(),
        b"\xff\xfe garbage",
        echo_request("after", elements=4).SerializeToString(),
    ]
    answers = list(raw_stream(iter(frames), timeout=RPC_TIMEOUT))
    assert len(answers) == 3
    errors = [answer.error_message for answer in answers if answer.error_message]
    assert len(errors) == 1 and "expected a serialized inference.ModelInferRequest" in errors[0]
    assert sorted(answer.infer_response.id for answer in answers if not answer.error_message) == ["after", "before"]


# --- compression ------------------------------------------------------------------------------------


def test_compressed_requests_are_served(server: WeirProcess) -> None:
    data = np.arange(1000, dtype=np.float32).reshape(1, 1000)
    with triton.InferenceServerClient(server.grpc_url) as client:
        for algorithm in ("gzip", "deflate"):
            tensor = triton.InferInput("X", [1, 1000], "FP32")
            tensor.set_data_from_numpy(data)
            result = client.infer("echo", [tensor], compression_algorithm=algorithm, client_timeout=RPC_TIMEOUT)
            np.testing.assert_array_equal(result.as_numpy("Y"), data)


def test_a_compression_bomb_is_refused_without_inflating_it(server: WeirProcess, channel: grpc.Channel) -> None:
    inflated = 16 * MESSAGE_LIMIT  # 256 MiB of zeros: gzip makes ~256 KiB of it
    bomb = echo_request("bomb", elements=inflated // 4, fill=0.0)
    stub_call = channel.unary_unary(
        f"{SERVICE}/ModelInfer",
        request_serializer=service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=service_pb2.ModelInferResponse.FromString,
    )
    peak_before = status_field(server.process.pid, "VmHWM")
    with pytest.raises(grpc.RpcError) as caught:
        stub_call(bomb, compression=grpc.Compression.Gzip, timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert f"expected at most {MESSAGE_LIMIT} bytes once decompressed" in (caught.value.details() or "")
    growth = status_field(server.process.pid, "VmHWM") - peak_before
    assert growth < 4 * MESSAGE_LIMIT, f"the server's peak memory grew by {growth / MiB:.0f} MiB"


# --- stream backpressure ------------------------------------------------------------------------------


def test_a_stream_whose_client_does_not_read_stops_being_read_and_resumes(server: WeirProcess) -> None:
    requests = 300  # 300 MiB of answers if the server kept computing them

    async def scenario() -> None:
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(server.grpc_url, options=options) as channel:
            stream = channel.stream_stream(
                f"{SERVICE}/ModelStreamInfer",
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
            )
            call = stream(timeout=RPC_TIMEOUT * 4)
            await call.write(echo_request("warm-up"))  # one round trip, so the baseline includes a stream's buffers
            assert not (await call.read()).error_message
            rss_before = status_field(server.process.pid, "VmRSS")
            written = 0

            async def write_all() -> None:
                nonlocal written
                for index in range(requests):
                    await call.write(echo_request(f"r{index}"))
                    written += 1
                await call.done_writing()

            writer = asyncio.create_task(write_all())
            while metric(server, "weir_stream_backpressure_paused") < 1:
                assert not writer.done(), f"all {written} requests were read although no answer was"
                await asyncio.sleep(0.05)
            held = status_field(server.process.pid, "VmRSS") - rss_before
            assert not writer.done()
            assert held < 96 * MiB, f"the server holds {held / MiB:.0f} MiB for a stream nobody reads"
            # The client reads at last: every answer arrives and the writes complete.
            ids = []
            while len(ids) < requests:
                answer = await call.read()
                assert answer is not grpc.aio.EOF and not answer.error_message
                ids.append(answer.infer_response.id)
            await writer
            assert await call.read() is grpc.aio.EOF
            assert sorted(ids) == sorted(f"r{index}" for index in range(requests))

    asyncio.run(scenario())
    assert metric(server, "weir_stream_backpressure_paused") == 0


# --- memory after large requests ------------------------------------------------------------------------


def test_memory_of_large_requests_is_given_back(server: WeirProcess, channel: grpc.Channel) -> None:
    infer = channel.unary_unary(f"{SERVICE}/ModelInfer")
    body = echo_request("large", elements=3 * MiB).SerializeToString()  # 12 MiB in, 12 MiB out
    resident_before = status_field(server.process.pid, "VmRSS")
    trims_before = metric(server, "weir_memory_trims_total")
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            list(pool.map(lambda _: infer(body, timeout=RPC_TIMEOUT), range(8)))
    resident_after_requests = status_field(server.process.pid, "VmRSS")
    wait_until(lambda: metric(server, "weir_memory_trims_total") > trims_before)
    # the trim that counts comes a quiet delay after the last request: give resident memory the time to drop
    with contextlib.suppress(AssertionError):
        wait_until(lambda: status_field(server.process.pid, "VmRSS") - resident_before < 48 * MiB, timeout=15)
    resident = status_field(server.process.pid, "VmRSS")
    assert resident - resident_before < 48 * MiB, (
        f"resident memory: {resident_before / MiB:.0f} MiB before, {resident_after_requests / MiB:.0f} MiB after "
        f"24 requests of 12 MiB, {resident / MiB:.0f} MiB after the trim"
    )


# --- shutdown -----------------------------------------------------------------------------------------


def test_shutdown_is_bounded_by_the_grace_period_and_refuses_new_calls_unavailable(tmp_path: Path) -> None:
    grace = 3.0
    write_slow_version(tmp_path, 1, factor=2.0)
    server = start_weir(tmp_path, "--shutdown-grace-seconds", str(grace))
    try:
        client = triton.InferenceServerClient(server.grpc_url)
        started = time.perf_counter()
        client.infer("slow", slow_inputs(1.0, 200))
        per_iteration = max(time.perf_counter() - started, 1e-3) / 200
        iterations = int(120 / per_iteration)  # about two minutes of compute: far beyond the grace period
        outcome: dict[str, object] = {}

        def in_flight() -> None:
            try:
                client.infer("slow", slow_inputs(1.0, iterations), client_timeout=600)
                outcome["status"] = "OK"
            except InferenceServerException as error:
                outcome["status"] = error.status()
                outcome["message"] = error.message()

        import threading

        caller = threading.Thread(target=in_flight)
        caller.start()
        wait_until(lambda: metric(server, "weir_inference_pending_request_count") >= 1)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: any(r.get("msg") == "stop requested: draining in-flight requests" for r in server.log_records())
        )
        latecomer = triton.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException) as refused:
            latecomer.infer("slow", slow_inputs(1.0, 1), client_timeout=RPC_TIMEOUT)
        assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
        assert "shutting down" in (refused.value.message() or "")

        assert server.process.wait(timeout=grace + 30) == 0
        exited_after = time.monotonic() - signalled
        caller.join(timeout=30)
        assert outcome.get("status") == "StatusCode.UNAVAILABLE", outcome
        assert exited_after < grace + 15, f"exit took {exited_after:.1f} s with a grace period of {grace} s"
        messages = [record.get("msg") for record in server.log_records()]
        assert "exiting with computations still running" in messages
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)
