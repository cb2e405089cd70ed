"""Shared pieces of the bench scripts: build the demo repository, run `weir serve` as a subprocess on
loopback, stop it with SIGTERM and check its exit status, and describe the machine.

Kept free of torch and tritonclient imports so each script can check its own prerequisites first.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weir.loadtest.report import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LOOPBACK = "127.0.0.1"
MODEL = "mlp_classifier"


def build_demo_repository(out: Path) -> Path:
    """Build the demo repository (examples/build_demo_repository.py) into ``out``."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import build_demo_repository
    finally:
        sys.path.remove(str(ROOT / "examples"))
    build_demo_repository.build(out)
    return out


def weir_command() -> list[str]:
    """`weir serve` from the same environment as this interpreter (the console script if present)."""
    script = Path(sys.executable).parent / "weir"
    return [str(script)] if script.exists() else [sys.executable, "-m", "weir.cli"]


@dataclass
class WeirServer:
    """A running `weir serve` subprocess; its stderr is drained by a thread so it never blocks."""

    process: subprocess.Popen[str]
    command: list[str]
    grpc_port: int
    log_lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def log_tail(self, count: int = 20) -> str:
        return "\n".join(self.log_lines[-count:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout`` seconds, and return the exit status (kills on timeout)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise RuntimeError(f"weir serve did not exit within {timeout:.0f}s of SIGTERM; killed it") from None


def start_weir(
    repository: Path, *extra_args: str, timeout: float = 90.0, models: tuple[str, ...] = (MODEL,)
) -> WeirServer:
    """Start `weir serve` on a free loopback port, serving only ``models`` (explicit control mode), and
    wait for its "server started" JSON log line, which carries the chosen gRPC port."""
    command = [
        *weir_command(), "serve",
        "--model-repository", str(repository),
        "--listen-address", LOOPBACK,
        "--grpc-port", "0",
        "--metrics-port", "-1",
        "--model-control-mode", "explicit",
        *[argument for model in models for argument in ("--load-model", model)],
        "--log-format", "json",
        *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    started = threading.Event()
    ports: dict[str, int] = {}

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if not started.is_set() and '"server started"' in line:
                try:
                    record = json.loads(line)
                    ports["grpc"] = int(record["grpc_port"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
                started.set()

    threading.Thread(target=pump, name="weir-stderr", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not started.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            tail = "\n".join(lines[-40:])
            raise RuntimeError(
                f"weir serve did not start (exit status {process.returncode}):\n{shlex.join(command)}\n{tail}"
            )
    return WeirServer(process, command, ports["grpc"], lines)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "tritonclient": _version("tritonclient"),
        "grpcio": _version("grpcio"),
        "weir": _version("weir"),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    return info


def command_line() -> str:
    """The exact command line this process was started with."""
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
