"""Where job attempts run. ``LocalExecutor`` starts ``torchrun`` on this machine; a cluster backend
implements the same four methods:

- ``launch(job_id, job_dir, attempt, command, env)`` starts an attempt and returns a handle (here the
  launcher's pid; for Kubernetes, a Job name made from the job id and attempt; for Ray, a submission
  id). It must not block.
- ``exit_code(job_dir, attempt, handle)`` is the attempt's exit status once it has ended, else None.
- ``alive(handle)`` says whether it still runs (after a control plane restart, re-attach or fail).
- ``stop(handle, grace)`` ends it and everything it started (here: SIGTERM to the launcher's whole
  process tree, then SIGKILL after ``grace``; Kubernetes: delete the Job with
  propagationPolicy=Foreground).

A Kubernetes executor would build a PyTorchJob or an indexed Job running the same torchrun command
with ``--nnodes N --rdzv-backend c10d --rdzv-endpoint <service>``, mount the job directory from a
shared volume (checkpoints survive a pod restart), and read the exit code from the Job's status; the
runner above it stays the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from weir_control.training.jobfiles import open_inside, read_inside
from weir_control.training.sandbox import JobSandbox


class Executor(Protocol):
    def launch(self, job_id: str, job_dir: Path, attempt: int, command: list[str], env: dict[str, str]) -> int: ...

    def exit_code(self, job_dir: Path, attempt: int, handle: int) -> int | None: ...

    def alive(self, handle: int) -> bool: ...

    def stop(self, handle: int, grace: float) -> None: ...


def exit_file(job_dir: Path, attempt: int) -> Path:
    return job_dir / f"exit-{attempt}.json"


class LocalExecutor:
    """Attempts as local process trees, logs appended to ``job_dir/job.log``, isolated as ``sandbox``
    says (see ``training.sandbox``)."""

    def __init__(self, sandbox: JobSandbox | None = None) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self.sandbox = sandbox or JobSandbox()

    def launch(self, job_id: str, job_dir: Path, attempt: int, command: list[str], env: dict[str, str]) -> int:
        log = open_inside(job_dir, "job.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        launcher = [sys.executable, "-m", "weir_control.training.launcher", str(exit_file(job_dir, attempt)), "--"]
        argv, cwd, identity = [*launcher, *command], job_dir, dict[str, Any]()
        if self.sandbox.namespaces:  # the sandbox enters the job directory once it is the job user
            argv, cwd = self.sandbox.wrap(job_dir, argv), Path("/")
        elif self.sandbox.isolated:
            identity = {"user": self.sandbox.uid, "group": self.sandbox.gid, "extra_groups": []}
        try:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in the control plane's group: a Ctrl-C there does not reach it
                **identity,
            )
        finally:
            os.close(log)
        self._children[process.pid] = process
        return process.pid

    def exit_code(self, job_dir: Path, attempt: int, handle: int) -> int | None:
        child = self._children.get(handle)
        if child is not None and child.poll() is None:
            return None
        path = exit_file(job_dir, attempt)
        if path.is_file() or path.is_symlink():
            self._children.pop(handle, None)
            return _recorded_exit(job_dir, path.name)
        if child is not None:  # the launcher itself died (killed) before writing the file
            self._children.pop(handle, None)
            return child.returncode if child.returncode is not None else -1
        return None if self.alive(handle) else -1

    def alive(self, handle: int) -> bool:
        child = self._children.get(handle)
        if child is not None and child.poll() is None:
            return True
        # After a restart the launcher is not our child: it, or what it started, may still run. A
        # recorded pid that now belongs to another program (reused) does not count.
        if handle <= 0 or not _is_launcher(handle):
            return False
        return bool(_living([handle, *descendants(handle)]))

    def stop(self, handle: int, grace: float) -> None:
        """SIGTERM to the launcher's whole tree, SIGKILL to what is left after ``grace``. The tree, not
        a process group: torchrun starts each worker in a session of its own."""
        if handle <= 0:
            return
        tree = [handle, *descendants(handle)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            child = self._children.get(handle)
            if child is not None:
                child.poll()  # reap the launcher, so it does not linger as a zombie
            tree = _living(tree + descendants(handle))
            if not tree:
                break
            time.sleep(0.05)
        for pid in _living(tree):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        child = self._children.get(handle)
        if child is not None:
            child.wait(timeout=10)


def _recorded_exit(job_dir: Path, name: str) -> int:
    """The launcher's record of the exit status; -1 when it is not a small JSON file (the job's own
    directory: it may hold anything there)."""
    try:
        return int(json.loads(read_inside(job_dir, name, 4096))["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        for child in children.get(current, []):
            found.append(child)
            frontier.append(child)
    return found


def _is_launcher(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"weir_control.training.launcher" in command


def _living(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (zombies do not count)."""
    living = []
    for pid in dict.fromkeys(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] != "Z":
            living.append(pid)
    return living
