"""What the fault and abuse probes share: a repository with the demo models and the issue's flat
BYTES model, memory readings of a process from /proc, a memory cap (RLIMIT_AS) set on a running
process, raw gRPC calls, and a closed-loop load that counts every failure."""

from __future__ import annotations

import os
import resource
import shutil
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import build_demo_repository
import grpc
import numpy as np
import torch

from weir_proto.inference import messages as pb
from weir_proto.inference.pool import SERVICE

RPC_TIMEOUT = 30
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SERVICE_PATH = f"/{SERVICE.full_name}"
MiB = 1 << 20
PHASE_ANSWERS = 100  # answers a load must get through each phase of a fault

# The model for finding 2: one BYTES input of dims [-1], max_batch_size 0 (TextStats
# counts characters and upper-cases: its UPPER output is as large as its input).
TEXT_FLAT_CONFIG = """
backend: "pytorch"
max_batch_size: 0
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "STATS" data_type: TYPE_FP32 dims: [ -1, 2 ] }, { name: "UPPER" data_type: TYPE_STRING dims: [ -1 ] } ]
"""


def chaos_repository(template: Path, target: Path) -> Path:
    """The demo repository (mlp_classifier, mlp_export, text_stats) plus text_flat, and scratch (a copy
    of mlp_classifier that hostile RepositoryModelLoad configs are tried on)."""
    shutil.copytree(template, target, dirs_exist_ok=True)
    shutil.copytree(target / "mlp_classifier", target / "scratch", dirs_exist_ok=True)
    config = target / "scratch" / "config.pbtxt"
    config.write_text(config.read_text().replace("mlp_classifier", "scratch"))
    (target / "text_flat" / "1").mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(build_demo_repository.TextStats()), str(target / "text_flat" / "1" / "model.pt"))
    (target / "text_flat" / "config.pbtxt").write_text(TEXT_FLAT_CONFIG)
    return target


def proc_status(pid: int) -> dict[str, int]:
    """VmPeak, VmSize, VmHWM, VmRSS ... of ``pid`` in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            values[key] = int(parts[0]) * 1024
    return values


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM over from the current RSS (writing 5 to clear_refs), so a probe's peak is its own."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cap_address_space(pid: int, limit_bytes: int) -> None:
    """RLIMIT_AS on a running process (prlimit(2)): past it, allocations fail in that process
    instead of the machine running out of memory."""
    resource.prlimit(pid, resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def channel_options(max_bytes: int = 1536 * MiB) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


def _serialize(message: object) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()  # type: ignore[attr-defined]


def unary(channel: grpc.Channel, method: str, response_class):  # type: ignore[no-untyped-def]
    return channel.unary_unary(
        f"{SERVICE_PATH}/{method}", request_serializer=_serialize, response_deserializer=response_class.FromString
    )


def stream(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    return channel.stream_stream(
        f"{SERVICE_PATH}/ModelStreamInfer",
        request_serializer=_serialize,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )


def mlp_request(request_id: str = "", rows: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp_classifier", id=request_id)
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[rows, 256])
    request.raw_input_contents.append(np.full((rows, 256), 0.5, np.float32).tobytes())
    return request


def text_request(model: str, texts: list[bytes], shape: list[int], request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(text)) + text for text in texts))
    return request


def serves(address: str, request: pb.ModelInferRequest | None = None) -> bool:
    """One good request answered OK (a fresh channel, so a stuck connection does not hide the server)."""
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        response = unary(channel, "ModelInfer", pb.ModelInferResponse)(request or mlp_request(), timeout=RPC_TIMEOUT)
    return len(response.outputs) > 0


def wait_until(condition: Callable[[], bool], timeout: float = 60, message: str = "condition") -> None:
    """Poll ``condition`` (exceptions count as not yet) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception as error:  # not ready yet
            last = error
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {message} (last error: {last!r})")


@dataclass
class Load:
    """Closed-loop load: ``clients`` threads, each sending ``make_request()`` and waiting for the
    answer, until stopped. Every failure is kept with its status code."""

    address: str
    make_request: Callable[[], pb.ModelInferRequest] = mlp_request
    clients: int = 4
    timeout: float = RPC_TIMEOUT
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for index in range(self.clients):
            thread = threading.Thread(target=self._run, name=f"load-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 10)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address, options=channel_options()) as channel:
            call = unary(channel, "ModelInfer", pb.ModelInferResponse)
            while not self._stop.is_set():
                try:
                    call(self.make_request(), timeout=self.timeout)
                    with self._lock:
                        self.answered += 1
                except grpc.RpcError as error:
                    with self._lock:
                        self.failures.append(f"{error.code()}: {error.details()}")

    def wait_for(self, answers: int, timeout: float = 60) -> None:
        target = self.answered + answers
        wait_until(lambda: self.answered >= target or bool(self.failures), timeout, f"{answers} more answers")


def free_disk_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def scale_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="scale")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(np.ones((1, 3), np.float32).tobytes())
    return request


def serves_factor(address: str, factor: float) -> bool:
    with grpc.insecure_channel(address) as channel:
        response = unary(channel, "ModelInfer", pb.ModelInferResponse)(scale_request(), timeout=RPC_TIMEOUT)
    return bool(np.allclose(np.frombuffer(response.raw_output_contents[0], "<f4"), factor))
