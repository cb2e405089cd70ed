"""Training jobs run user code: it must be able to read nothing of the control plane (its environment,
files, database, artifacts, tokens, other jobs). How, from strongest to weakest:

1. **Namespaces** (the control plane runs as root and ``unshare`` works): each attempt starts under
   ``unshare --mount --pid --fork --mount-proc`` in this module's ``main`` (as root, inside the new
   namespaces, for a moment): the control plane's state (state directory, database, artifact
   directory, tokens file, the jobs directory) is covered by empty tmpfs mounts, every directory on the
   way to what the job needs (its own directory, the Python installation and Weir) that the job user
   could not traverse is covered too, and only what the job needs is bound back at its own path. It
   then drops to the job user (no supplementary groups, no new privileges) and executes the launcher.
   The job sees its own processes only (its own /proc) and of the file system only what any user may
   read plus its own directory.
2. **Job user only** (root, no namespaces, and the job user can reach Python and the jobs directory):
   the attempt runs as the job user. File modes protect the control plane's files; jobs share that
   user, so they could read each other's directories.
3. **Nothing** (the control plane is not root, or the job user cannot reach what it needs): jobs run as
   the control plane's user. Said loudly at start. Their environment is still only their own, and the
   control plane is non-dumpable, so its /proc/PID/environ and memory stay closed to them; its files
   are not.

In every case the job's environment is an allow-list (see ``JobRunner._environment``), never the
control plane's. In a cluster the same holds by running each job in its own pod or Ray worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weir_proto.errors import InvalidArgumentError

log = logging.getLogger(__name__)

DEFAULT_JOB_USER = "weir-job"
NOBODY = 65534
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mark_non_dumpable() -> bool:
    """Make this process non-dumpable: processes of the same user can no longer read its
    /proc/PID/environ, mem or maps, nor ptrace it. True when it took."""
    try:
        return _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class JobSandbox:
    """How attempts are started (see the module's docstring). ``uid`` None: as the control plane's user."""

    user: str = ""
    uid: int | None = None
    gid: int | None = None
    namespaces: bool = False
    unshare: str = ""
    hidden: tuple[str, ...] = ()  # the control plane's state: covered in the job's view
    needed: tuple[str, ...] = field(default=())  # what every job reads (Python, Weir): made reachable

    @property
    def isolated(self) -> bool:
        return self.uid is not None

    def wrap(self, job_dir: Path, command: list[str]) -> list[str]:
        """The command line that starts ``command`` (the launcher) inside the namespaces."""
        spec = {"uid": self.uid, "gid": self.gid, "job_dir": str(job_dir), "hidden": self.hidden, "needed": self.needed}
        return [
            self.unshare, "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
            sys.executable, "-I", "-m", "weir_control.training.sandbox", json.dumps(spec), "--", *command,
        ]  # fmt: skip


def _job_user(name: str) -> tuple[str, int, int]:
    """(name, uid, gid) of the job user; the default one is created when missing (a system user
    without home or shell), else nobody."""
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_name, entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    if name == DEFAULT_JOB_USER and shutil.which("useradd"):
        created = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if created.returncode == 0:
            entry = pwd.getpwnam(name)
            log.info("created the training job user", extra={"user": name, "uid": entry.pw_uid})
            return entry.pw_name, entry.pw_uid, entry.pw_gid
        log.warning("could not create the training job user; jobs run as nobody", extra={"error": created.stderr})
        return "nobody", NOBODY, NOBODY
    if name == DEFAULT_JOB_USER:
        return "nobody", NOBODY, NOBODY
    raise InvalidArgumentError(f"job_user: expected an existing OS user, got {name!r} (no such user)")


def traversable(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` (no other groups) may search the directory ``path``."""
    try:
        info = path.stat()
    except OSError:
        return False
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def blocking_ancestor(path: Path, uid: int, gid: int) -> Path | None:
    """The topmost directory above (or at) ``path`` that the user could not search, if any."""
    for ancestor in [*reversed(path.parents), path]:
        if ancestor.is_dir() and not traversable(ancestor, uid, gid):
            return ancestor
    return None


def python_paths() -> list[str]:
    """What a job's Python needs to read: the installation, the virtual environment, sys.path, and the
    directories Weir's own packages come from (an editable install)."""
    import weir_control
    import weir_proto

    paths = {sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(entry for entry in sys.path if entry and os.path.isdir(entry))
    for package in (weir_control, weir_proto):
        paths.add(str(Path(package.__file__ or "").resolve().parents[1]))
    return sorted(os.path.realpath(path) for path in paths)


def _can_unshare(unshare: str) -> bool:
    try:
        probe = subprocess.run(
            [unshare, "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
            capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _reaches(uid: int, gid: int, jobs_dir: Path) -> str:
    """'' when the job user can run Weir's launcher and reach the jobs directory, else what fails."""
    if blocking_ancestor(jobs_dir.parent, uid, gid) is not None:
        return f"it cannot reach the jobs directory {jobs_dir} (a directory above it is closed to it)"
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-c", "import weir_control.training.launcher"],
            user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except OSError as error:
        return f"it cannot run {sys.executable}: {error}"
    if probe.returncode != 0:
        return f"it cannot run Weir with {sys.executable}: {probe.stderr.strip()[-300:]}"
    return ""


def prepare(job_user: str, jobs_dir: Path, hidden: list[Path], readable: list[Path]) -> JobSandbox:
    """Decide how this control plane starts jobs (blocking: probes with subprocesses), and make it
    non-dumpable first whatever is decided."""
    if not mark_non_dumpable():
        log.warning("could not mark the control plane non-dumpable (prctl): jobs of its user may read its memory")
    if os.geteuid() != 0:
        log.warning(
            "training jobs are NOT isolated: the control plane does not run as root, so jobs run as its own "
            "user and can read its files (state directory, database, artifacts, tokens file); run it as root "
            "(jobs then run as --job-user in their own namespaces) or run jobs on a cluster executor"
        )
        return JobSandbox()
    user, uid, gid = _job_user(job_user or DEFAULT_JOB_USER)
    if uid == 0:
        raise InvalidArgumentError(f"job_user: expected an unprivileged user, got {user!r} (uid 0)")
    unshare = shutil.which("unshare") or ""
    hidden_paths = tuple(sorted({str(path.resolve()) for path in [jobs_dir, *hidden] if path is not None}))
    if unshare and _can_unshare(unshare):
        log.info("training jobs run isolated", extra={"user": user, "uid": uid, "namespaces": "mount,pid"})
        # readable paths may appear later (the feature root): each attempt binds those that exist by then
        needed = sorted({*python_paths(), *(str(path.resolve()) for path in readable)})
        return JobSandbox(user, uid, gid, True, unshare, hidden_paths, tuple(needed))
    problem = _reaches(uid, gid, jobs_dir)
    if problem:
        log.warning(
            "training jobs are NOT isolated: namespaces are not available (unshare failed) and the job user "
            f"{user!r} cannot be used: {problem}; jobs run as the control plane's user and can read its files"
        )
        return JobSandbox()
    log.warning(
        "training jobs run as a separate user but without namespaces (unshare failed): they can see other "
        "processes and each other's job directories",
        extra={"user": user, "uid": uid},
    )
    return JobSandbox(user, uid, gid)


# --- inside the namespaces (python -I -m weir_control.training.sandbox SPEC -- COMMAND...) -----------


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    result = _libc().mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode() if data else None
    )
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {source} on {target}: {os.strerror(error)}")


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def enter(spec: dict[str, Any], command: list[str]) -> None:
    """Cover the control plane's state, make what the job needs reachable, drop to the job user and
    execute ``command``; never returns."""
    uid, gid, job_dir = int(spec["uid"]), int(spec["gid"]), str(spec["job_dir"])
    os.umask(0o022)
    # opened now (the covers below hide their paths); a directory the job user could not enter itself
    # is left out: bound back it would only shadow what it needs further down (Python under /root)
    keep = [path for path in spec["needed"] if traversable(Path(path), uid, gid)] + [job_dir]
    handles = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in keep if os.path.isdir(path)}
    for hidden in spec["hidden"]:
        if os.path.isdir(hidden) and not os.path.islink(hidden):
            _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        elif os.path.isfile(hidden):
            _mount("/dev/null", hidden, None, MS_BIND, None)
    covers: list[str] = []
    for path in sorted(handles, key=lambda item: item.count("/")):
        blocked = blocking_ancestor(Path(path), uid, gid)
        if blocked is not None and not _under(str(blocked), covers):
            _mount("tmpfs", str(blocked), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
            covers.append(str(blocked))
    covered = [*covers, *spec["hidden"]]
    bound: list[str] = []
    for path in sorted(handles, key=lambda item: (item == job_dir, item.count("/"))):
        if _under(path, covered) and (path == job_dir or not _under(path, bound)):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{handles[path]}", path, None, MS_BIND | MS_REC, None)
            bound.append(path)
    for handle in handles.values():
        os.close(handle)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid program gives the privileges back
    os.chdir(job_dir)
    os.execve(command[0], command, os.environ)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -I -m weir_control.training.sandbox SPEC -- COMMAND...", file=sys.stderr)
        return 2
    try:
        enter(json.loads(argv[0]), argv[2:])
    except OSError as error:
        print(f"--- weir: could not isolate the job: {error}", flush=True)
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        return 126
    return 0  # not reached: enter executes the command


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
