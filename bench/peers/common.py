"""What every peer shares: where its venv is, how its server process is started and stopped, and the
V2 gRPC readiness probe. Runs in Weir's venv; imports no peer package and no torch.

A peer module (peer_<name>.py) defines ``PEER = Peer(...)`` and is also the server script that runs in the
peer's own venv (``python bench/peers/peer_<name>.py --port P --model M``), so the runner side and the server
side of a peer live in one file. Module names carry the ``peer_`` prefix so that, run as a script from this
folder, ``peer_mlserver.py`` does not shadow the real ``mlserver`` package.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PEERS_DIR = ROOT / ".peers"
LOOPBACK = "127.0.0.1"
MODEL = "mlp_classifier"
INPUT, OUTPUT, FEATURES, CLASSES = "INPUT__0", "OUTPUT__0", 256, 10
NAMES = ("floor", "mlserver", "pytriton", "kserve", "ray")


def free_port() -> int:
    """A currently free TCP port on loopback (the usual small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def build_model(out: Path) -> Path:
    """Build the demo repository into ``out`` and return mlp_classifier's TorchScript file."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import build_demo_repository
    finally:
        sys.path.remove(str(ROOT / "examples"))
    build_demo_repository.build(out)
    return out / MODEL / "1" / "model.pt"


def check_input():  # -> numpy.ndarray, [1, 256] FP32; the same everywhere (floor's canned output uses it)
    import numpy as np

    return np.random.default_rng(0).standard_normal((1, FEATURES), dtype=np.float32)


@dataclass
class Handle:
    peer: Peer
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    command: list[str]
    netns_pid: int | None = None  # Ray: clients must enter this process's network namespace
    netns_id: str | None = None  # readlink /proc/<netns_pid>/ns/net once inside; stop() kills all of it
    started_s: float = 0.0

    @property
    def url(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def client_prefix(self) -> list[str]:
        """Prepend to a client command so it reaches the server (nsenter for a namespaced peer)."""
        if self.netns_pid is None:
            return []
        return ["nsenter", "-t", str(self.netns_pid), "-n", "-U", "--preserve-credentials"]


@dataclass
class Peer:
    name: str
    script: Path
    venv: str | None  # .peers/<venv>; None = Weir's own interpreter
    stop_signal: int = signal.SIGTERM
    ready_timeout_s: float = 180.0
    env: dict[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()
    netns: bool = False  # run inside `unshare -rn` (loopback only) because the server binds all interfaces
    env_hook: Callable[[dict[str, str]], None] | None = None
    signal_group: bool = True  # stop_signal to the whole process group (False: to the leader only)

    @property
    def python(self) -> Path:
        return Path(sys.executable) if self.venv is None else PEERS_DIR / self.venv / "bin" / "python"

    def available(self) -> str | None:
        """None when installed, else why not."""
        if not self.python.exists():
            return f"{self.python} missing: run `.venv/bin/python bench/peers/setup.py {self.venv}`"
        if self.venv is not None and not (PEERS_DIR / self.venv / "weir-peer.json").exists():
            return f".peers/{self.venv} incomplete: rerun `.venv/bin/python bench/peers/setup.py {self.venv}`"
        return None

    def command(self, port: int, model_path: Path) -> list[str]:
        return [str(self.python), str(self.script), "--port", str(port), "--model", str(model_path), *self.extra_args]

    def start(
        self,
        port: int | None = None,
        model_path: Path | None = None,
        cpus: set[int] | None = None,
        log_dir: Path | None = None,
        wait: bool = True,
    ) -> Handle:
        """Start the server in its own process group (so stop() reaches every child) and wait until it
        answers ServerReady and ModelReady(mlp_classifier) over V2 gRPC."""
        problem = self.available()
        if problem:
            raise RuntimeError(f"{self.name}: {problem}")
        port = port or free_port()
        if model_path is None:
            model_path = build_model(Path(tempfile.mkdtemp(prefix="weir-peer-model-")))
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"weir-peer-{self.name}-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{self.name}.log"
        command = self.command(port, model_path)
        if self.netns:
            inner = "ip link set lo up && exec " + shlex.join(command)
            command = ["unshare", "-rn", "sh", "-c", inner]
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        if self.env_hook:
            self.env_hook(env)

        def preexec() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        log_file = log_path.open("wb")
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
            env=env,
            start_new_session=True,
            preexec_fn=preexec if cpus else None,
        )
        log_file.close()
        handle = Handle(self, process, port, log_path, command, netns_pid=process.pid if self.netns else None)
        began = time.monotonic()
        if wait:
            try:
                wait_ready(handle, self.ready_timeout_s)
                if self.netns:
                    handle.netns_id = os.readlink(f"/proc/{process.pid}/ns/net")
            except BaseException:
                self.stop(handle)
                raise
        handle.started_s = time.monotonic() - began
        return handle

    def stop(self, handle: Handle, timeout: float = 30.0) -> int | None:
        """Signal the whole process group, wait; SIGKILL the group if it lingers. Returns the exit status."""
        process = handle.process
        if handle.netns_id is None and handle.netns_pid is not None and process.poll() is None:
            try:
                namespace = os.readlink(f"/proc/{process.pid}/ns/net")
                if namespace != os.readlink("/proc/self/ns/net"):
                    handle.netns_id = namespace
            except OSError:
                pass
        try:
            if self.signal_group:
                os.killpg(process.pid, self.stop_signal)
            else:
                process.send_signal(self.stop_signal)
        except ProcessLookupError:
            pass
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        # children (workers, tritonserver, raylets) may outlive the leader: give them a moment, then kill
        deadline = time.monotonic() + (5.0 if status is not None else 0.0)
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if status is None:
                process.wait(timeout=10)
        if handle.netns_id is not None:  # Ray's daemons start their own sessions: kill what is left in the netns
            _kill_namespace(handle.netns_id)
        return status


def _namespace_pids(namespace: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == namespace:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _kill_namespace(namespace: str, grace: float = 10.0) -> None:
    if namespace == os.readlink("/proc/self/ns/net"):
        return  # never our own namespace
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = _namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _namespace_pids(namespace) and time.monotonic() < deadline:
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


PROBE = """
import sys, time, tritonclient.grpc as g
url, model, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
last = None
while time.monotonic() < deadline:
    try:
        c = g.InferenceServerClient(url=url)
        if c.is_server_ready(client_timeout=2) and c.is_model_ready(model, client_timeout=2):
            print("ready"); sys.exit(0)
        last = "not ready"
    except Exception as e:
        last = repr(e)
    time.sleep(0.25)
print(last); sys.exit(1)
"""


def probe_ready(handle: Handle, seconds: float) -> tuple[bool, str]:
    """ServerReady + ModelReady over V2 gRPC, in a subprocess (so it can enter the peer's netns)."""
    command = [*handle.client_prefix(), sys.executable, "-c", PROBE, handle.url, MODEL, str(seconds)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def wait_ready(handle: Handle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(
                f"{handle.peer.name} exited with status {handle.process.returncode} before it was ready:\n"
                f"{shlex.join(handle.command)}\n{handle.log_tail()}"
            )
        ok, last = probe_ready(handle, min(5.0, max(0.5, deadline - time.monotonic())))
        if ok:
            return
    raise RuntimeError(
        f"{handle.peer.name} not ready after {timeout:.0f}s ({last}):\n"
        f"{shlex.join(handle.command)}\n{handle.log_tail()}"
    )


def load(name: str) -> Peer:
    if name not in NAMES:
        raise KeyError(f"unknown peer {name!r}; choose from {', '.join(NAMES)}")
    sys.path.insert(0, str(HERE)) if str(HERE) not in sys.path else None
    return importlib.import_module(f"peer_{name}").PEER


def start(name: str, port: int | None = None, **kwargs) -> Handle:
    return load(name).start(port, **kwargs)


def stop(handle: Handle) -> int | None:
    return handle.peer.stop(handle)
