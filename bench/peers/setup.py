"""Create or update the peers' virtual environments under .peers/<name>/ (git-ignored).

    .venv/bin/python bench/peers/setup.py [mlserver pytriton kserve ray] [--force] [--jobs N]

Each peer gets its own venv made from the base interpreter of the running Python (3.11). torch==2.13.0 is
installed FIRST (this machine's pip config finds the local CPU wheel), and every later install runs with a
constraints file pinning it, so no peer can pull a multi-GB CUDA torch. Idempotent: a venv whose stamp
file (.peers/<name>/weir-peer.json) records the same requirements and a successful import check is left
alone. Prints every command it runs; exits non-zero naming the peer and the failing command on failure.

The bare grpc.aio floor peer ("floor") needs no venv: it runs in Weir's own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / ".peers"
TORCH = "torch==2.13.0"

# name -> (pinned requirements installed after torch, import check run in the venv)
PEERS: dict[str, tuple[list[str], str]] = {
    # uvloop 0.23 crash-loops MLServer's parallel workers; 0.21.0 is the last one that works with 1.7.1.
    "mlserver": (["mlserver==1.7.1", "uvloop==0.21.0"], "import mlserver, uvloop, torch; print(mlserver.__version__)"),
    # nvidia-pytriton bundles tritonserver; it downgrades numpy, hence its own venv.
    "pytriton": (["nvidia-pytriton==0.7.0"], "import pytriton, torch, numpy; print(numpy.__version__)"),
    "kserve": (
        ["kserve==0.21.0"],
        "import kserve, torch; print(kserve.__version__ if hasattr(kserve,'__version__') else '')",
    ),
    # tritonclient brings the V2 protos (grpc_service_pb2_grpc) that Ray Serve's gRPC proxy needs.
    "ray": (
        ["ray[serve]==2.60.0", "tritonclient[grpc]==2.41.0"],
        "import ray, ray.serve, torch, tritonclient.grpc; print(ray.__version__)",
    ),
}


def venv_dir(name: str) -> Path:
    return PEERS_DIR / name


def venv_python(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def log(name: str, message: str) -> None:
    print(f"[setup {name}] {message}", flush=True)


def run(name: str, command: list[str], logfile: Path) -> None:
    log(name, "$ " + shlex.join(command))
    with logfile.open("a") as out:
        out.write(f"\n$ {shlex.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(
            f"command failed (exit {result.returncode}): {shlex.join(command)}\n{tail}\n(full log: {logfile})"
        )


def disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for filename in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, filename)).st_size
    return total


def setup_peer(name: str, force: bool) -> dict[str, object]:
    requirements, check = PEERS[name]
    directory = venv_dir(name)
    stamp = directory / "weir-peer.json"
    wanted = {"torch": TORCH, "requirements": requirements, "python": sys.version.split()[0]}
    if not force and stamp.exists():
        try:
            recorded = json.loads(stamp.read_text())
        except json.JSONDecodeError:
            recorded = {}
        if {k: recorded.get(k) for k in wanted} == wanted and venv_python(name).exists():
            log(name, f"up to date ({directory}); --force to rebuild")
            return recorded
    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    logfile = directory / "setup.log"
    logfile.write_text("")
    stamp.unlink(missing_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    if not venv_python(name).exists():
        run(name, [base, "-m", "venv", str(directory)], logfile)
    python = str(venv_python(name))
    constraints = directory / "constraints.txt"
    constraints.write_text(f"{TORCH}\n")
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    run(name, [*pip, TORCH], logfile)  # first: the local CPU build
    run(name, [*pip, "-c", str(constraints), *requirements], logfile)
    run(name, [python, "-c", check], logfile)
    frozen = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    (directory / "freeze.txt").write_text(frozen)
    if "torch==2.13.0" not in frozen:
        raise RuntimeError(f"torch is not 2.13.0 in {directory}: see {directory / 'freeze.txt'}")
    seconds = time.monotonic() - started
    size = disk_usage(directory)
    record = {
        **wanted,
        "setup_seconds": round(seconds, 1),
        "disk_bytes": size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    stamp.write_text(json.dumps(record, indent=2) + "\n")
    log(name, f"done in {seconds:.0f} s, {size / 2**20:.0f} MiB")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peers", nargs="*", help=f"default: all ({' '.join(PEERS)})")
    parser.add_argument("--force", action="store_true", help="reinstall even if the stamp says up to date")
    parser.add_argument("--jobs", type=int, default=2, help="venvs built in parallel (default 2)")
    args = parser.parse_args(argv)
    names = args.peers or list(PEERS)
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if sys.version_info[:2] != (3, 11):
        print(f"setup.py: expected Python 3.11 (Weir's venv), got {sys.version.split()[0]}", file=sys.stderr)
        return 2
    failures: dict[str, str] = {}

    def one(name: str) -> None:
        try:
            setup_peer(name, args.force)
        except Exception as error:  # reported below, per peer
            failures[name] = str(error)
            log(name, f"FAILED: {error}")

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, names))
    if failures:
        print(f"setup.py: failed for {', '.join(failures)} (logs in .peers/<name>/setup.log)", file=sys.stderr)
        return 1
    print(f"setup.py: ready: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
