"""A training job can read nothing of the control plane (issue 14, finding 11), end to end: a real
`weir control` (as root here, so jobs run as the job user in their own mount and pid namespaces) runs a
job that hunts for secrets the way the probe did: every /proc/*/environ, the control plane's
/proc/PID/environ, its database file, tokens file, artifact and state directories, another running
job's directory, and its own environment. It prints all it finds. None of the control plane's tokens
(from WEIR_TOKENS or the tokens file, which is deliberately world-readable here) nor the other job's
secret may appear in its log, and the files it could read must be none; the job itself still works
(reports over gRPC, checkpoints, output)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import free_port
from tests.e2e.test_control_plane import TOKENS, ControlProcess, cli, start_control, wait_until
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import training_pb2, training_pb2_grpc

Job = training_pb2.Job
FILE_TOKENS = {"root": ("admin", "file-admin-secret-7c1d"), "ci": ("deployer", "file-deployer-secret-93ab")}

HUNT = r"""
import glob, json, os, sys
from pathlib import Path
from weir_control import tracking

run = tracking.init()
p = run.parameters
print(f"uid={os.getuid()} gid={os.getgid()} pid={os.getpid()}", flush=True)
print("MYENV", json.dumps(dict(os.environ)), flush=True)
environs = sorted(set(glob.glob("/proc/[0-9]*/environ")) | {f"/proc/{p['control_pid']}/environ"})
readable_environs = 0
for path in environs:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        print("ENVIRON-REFUSED", path, error.__class__.__name__, flush=True)
        continue
    readable_environs += 1
    print("ENVIRON", path, data.replace(b"\0", b" ").decode(errors="replace"), flush=True)
for path in (f"/proc/{p['control_pid']}/cmdline", f"/proc/{p['control_pid']}/mem"):
    try:
        print("PROC", path, Path(path).read_bytes()[:4096].replace(b"\0", b" ").decode(errors="replace"), flush=True)
    except OSError as error:
        print("PROC-REFUSED", path, error.__class__.__name__, flush=True)
found = {}
own = Path(os.environ["WEIR_JOB_DIR"])
for name in ("database", "tokens", "state_dir", "artifacts", "jobs_dir", "other_job", "other_secret", "other_log"):
    target = Path(p[name])
    try:
        if target.is_dir():  # the path down to its own directory is no secret
            found[name] = sorted(entry.name for entry in target.iterdir() if entry not in [own, *own.parents])
            print("LISTED", target, found[name], flush=True)
        else:
            found[name] = target.read_bytes().decode(errors="replace")
            print("READ", target, found[name], flush=True)
    except OSError as error:
        print("REFUSED", target, error.__class__.__name__, flush=True)
found = {key: value for key, value in found.items() if value}  # an empty directory gives nothing away
print("FOUND", json.dumps(found), flush=True)
# what a job must still be able to do
run.log_metrics({"found": len(found), "readable_environs": readable_environs}, step=0)
run.save_checkpoint({"epoch": 0})
assert run.load_checkpoint()["epoch"] == 0
(run.output_dir / "done.txt").write_text("ok")
run.close()
"""

VICTIM = """
import time
from weir_control import tracking
run = tracking.init()
for step in range(600):
    run.progress(epoch=step, total_epochs=600)
    time.sleep(0.5)
"""


def namespaces_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "true"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


@pytest.fixture
def world() -> Iterator[Path]:
    """A world-readable directory outside pytest's private ones: the state directory and tokens file
    live here with lax modes, so only the sandbox (not a file mode) keeps them from the job."""
    directory = Path(tempfile.mkdtemp(prefix="weir-sandbox-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def code_dir(parent: Path, name: str, text: str) -> Path:
    directory = parent / f"code-{name}"
    directory.mkdir()
    (directory / f"{name}.py").write_text(text)
    return directory


@pytest.mark.skipif(not namespaces_available(), reason="needs root and unshare (mount and pid namespaces)")
def test_a_job_hunting_for_secrets_finds_none_of_the_control_planes(world: Path, tmp_path: Path) -> None:
    tokens_file = world / "tokens.toml"
    entries = [f'[[token]]\nname = "{name}"\nrole = "{role}"\ntoken = "{token}"\n' for name, (role, token) in
               FILE_TOKENS.items()]  # fmt: skip
    tokens_file.write_text("".join(entries))
    tokens_file.chmod(0o644)
    state_dir = world / "state"
    control: ControlProcess = start_control(
        state_dir, str(state_dir / "control.db"), free_port(), "--tokens", str(tokens_file)
    )
    try:
        assert any('"training jobs run isolated"' in line for line in control.lines), control.lines[-5:]
        (state_dir / "control.db").chmod(0o644)  # lax on purpose: the namespace, not the mode, must hide it
        state_dir.chmod(0o755)
        deployer = FILE_TOKENS["ci"][1]
        cli(control, "train", "submit", "victim", "--script", "victim.py", "--code",
            str(code_dir(tmp_path, "victim", VICTIM)), token=deployer)  # fmt: skip
        with grpc.insecure_channel(control.address) as channel:
            stub = training_pb2_grpc.TrainingStub(channel)

            def job(job_id: str) -> Job:
                return stub.GetJob(
                    training_pb2.GetJobRequest(id=job_id), metadata=client_metadata(deployer), timeout=10
                )

            wait_until(lambda: job("victim").progress.epoch >= 1, 60, "the victim job running")
            jobs_dir = state_dir / "jobs"
            targets = {
                "control_pid": control.process.pid,
                "database": state_dir / "control.db",
                "tokens": tokens_file,
                "state_dir": state_dir,
                "artifacts": state_dir / "artifacts",
                "jobs_dir": jobs_dir,
                "other_job": jobs_dir / "victim",
                "other_secret": jobs_dir / "victim" / ".secret",
                "other_log": jobs_dir / "victim" / "job.log",
            }
            params = [item for key, value in targets.items() for item in ("--param", f"{key}={value}")]
            cli(control, "train", "submit", "hunt", "--script", "hunt.py", "--code",
                str(code_dir(tmp_path, "hunt", HUNT)), *params, token=deployer)  # fmt: skip
            wait_until(lambda: job("hunt").state in (Job.SUCCEEDED, Job.FAILED), 120, "the hunt ended")
            hunted = job("hunt")
            log = b"".join(
                chunk.data
                for chunk in stub.StreamLogs(
                    training_pb2.StreamLogsRequest(id="hunt"), metadata=client_metadata(deployer), timeout=10
                )
            ).decode(errors="replace")
            victim_secret = (jobs_dir / "victim" / ".secret").read_text().strip()
            stub.CancelJob(training_pb2.GetJobRequest(id="victim"), metadata=client_metadata(deployer), timeout=30)
        assert hunted.state == Job.SUCCEEDED, log[-4000:]
        # it ran and looked: as another user, seeing its own processes' environments
        uid = int(log.split("uid=")[1].split()[0])
        assert uid != 0 and "MYENV" in log and "ENVIRON /proc/1/environ" in log, log[-4000:]
        secrets = [token for entry in TOKENS.split(",") for token in [entry.split(":")[2]]]
        secrets += [token for _, token in FILE_TOKENS.values()] + [victim_secret, "WEIR_TOKENS"]
        leaked = [secret for secret in secrets if secret in log]
        assert not leaked, f"the job's log holds {leaked}"
        found = json.loads(log.split("FOUND ", 1)[1].splitlines()[0])
        assert found == {}, found
        assert hunted.metrics["found"] == 0 and hunted.metrics["readable_environs"] >= 1
        # its own directory stayed its own: checkpoint and output written where the control plane reads them
        assert (jobs_dir / "hunt" / "output" / "done.txt").read_text() == "ok"
        assert os.stat(jobs_dir / "hunt").st_uid == uid
    finally:
        control.process.send_signal(signal.SIGTERM)
        control.process.wait(timeout=30)


def test_the_control_plane_marks_itself_non_dumpable() -> None:
    """Whatever the mode, processes of the control plane's own user (jobs, when it is not root) cannot read
    its /proc/PID/environ or memory: it is non-dumpable (checked in a process that does what it does)."""
    import sys

    script = (
        "import ctypes; from weir_control.training.sandbox import mark_non_dumpable; "
        "assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 1; "
        "print(mark_non_dumpable(), ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["True", "0"], result.stderr
