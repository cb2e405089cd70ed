"""Training jobs end to end with real processes: `weir control` runs torchrun attempts of a small
script (uploaded as the job's code) and of the built-in trainer. A duplicate submit returns the first
job; a 2-process gloo job runs; a worker killed mid-run is retried and resumes from its checkpoint;
cancel ends every process; a control plane restarted during runs leaves no job in a wrong state; a
sweep picks its best trial; the built-in trainer registers a READY version with full lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import free_port
from tests.e2e.test_control_plane import ControlProcess, cli, start_control, wait_until
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import registry_pb2, registry_pb2_grpc, training_pb2, training_pb2_grpc

Job = training_pb2.Job
TRAIN_SCRIPT = """
import os, sys, time
import torch
import torch.distributed as dist
from weir_control import tracking

run = tracking.init()
p = run.parameters
epochs, sleep, lr = int(p.get("epochs", 3)), float(p.get("epoch_sleep", 0)), float(p.get("lr", 0.1))
if run.world_size > 1:
    dist.init_process_group("gloo")
(run.directory / f"pid-{run.attempt}-{run.rank}").write_text(str(os.getpid()))
state = run.load_checkpoint()
start = state["epoch"] + 1 if state else 0
print(f"rank {run.rank}/{run.world_size} attempt {run.attempt} starting at epoch {start}", flush=True)
if run.world_size > 1:
    total = torch.tensor([run.rank + 1.0])
    dist.all_reduce(total)
    print(f"rank {run.rank} all_reduce sum {total.item():g}", flush=True)
run.log_params({"epochs": epochs, "lr": lr}, dataset_hash="synthetic-v1")
for epoch in range(start, epochs):
    time.sleep(sleep)
    run.log_metrics({"loss": (lr - 0.3) ** 2 + 1.0 / (epoch + 1)}, step=epoch)
    run.progress(epoch=epoch + 1, total_epochs=epochs)
    if run.should_checkpoint(epoch):
        run.save_checkpoint({"epoch": epoch})
    if run.stop_requested:
        break
if run.world_size > 1:
    dist.destroy_process_group()
run.close()
sys.exit(int(p.get("exit_code", 0)))
"""


@pytest.fixture
def code(tmp_path: Path) -> Path:
    directory = tmp_path / "code"
    directory.mkdir()
    (directory / "train.py").write_text(TRAIN_SCRIPT)
    return directory


class Control:
    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / "control"
        self.port = free_port()
        self.process: ControlProcess = self.start()

    def start(self) -> ControlProcess:
        self.process = start_control(
            self.state_dir, str(self.state_dir / "control.db"), self.port, "--max-concurrent-jobs", "4"
        )
        return self.process

    def stop(self, kill: bool = False) -> None:
        self.process.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.process.process.wait(timeout=30)

    def job(self, job_id: str) -> Job:
        with grpc.insecure_channel(self.process.address) as channel:
            return training_pb2_grpc.TrainingStub(channel).GetJob(
                training_pb2.GetJobRequest(id=job_id), metadata=client_metadata("t-replica"), timeout=10
            )

    def wait_state(self, job_id: str, *states: int, timeout: float = 120) -> Job:
        wait_until(lambda: self.job(job_id).state in states, timeout, f"{job_id} in {states}")
        return self.job(job_id)

    def log(self, job_id: str) -> str:
        return (self.state_dir / "jobs" / job_id / "job.log").read_text(errors="replace")

    def job_dir(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    running = Control(tmp_path)
    try:
        yield running
    finally:
        if running.process.process.poll() is None:
            running.stop()


def submit(control: Control, job_id: str, code: Path, *extra: str) -> dict:
    return cli(control.process, "train", "submit", job_id, "--script", "train.py", "--code", str(code), *extra)


def run_cli(control: Control, *args: str, json_output: bool = True, cwd: Path | None = None,
            token: str = "t-deployer") -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The real CLI, its exit status and output as they are (for refusals and text output)."""
    return subprocess.run(
        [sys.executable, "-m", "weir.cli", *args, "--control-plane", control.process.address, "--token", token,
         *(["--json"] if json_output else [])], capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


def metric_events(control: Control, job_id: str) -> list:
    with grpc.insecure_channel(control.process.address) as channel:
        events = training_pb2_grpc.TrainingStub(channel).StreamMetrics(
            training_pb2.StreamMetricsRequest(id=job_id), metadata=client_metadata("t-replica"), timeout=10
        )
        return [event for event in events if event.WhichOneof("event") == "metric"]


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def job_workers(job_id: str, attempt: int = 1) -> dict[int, int]:
    """rank -> pid of a job's torchrun workers, as this test sees them: found by their environment, since
    the pids a job sees (and writes) are those of its own pid namespace."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
        ours = (variables.get(b"WEIR_JOB_ID"), variables.get(b"WEIR_JOB_ATTEMPT")) == (job_id.encode(), b"%d" % attempt)
        if ours and b"LOCAL_RANK" in variables:
            workers[int(variables[b"RANK"])] = int(entry.name)
    return workers


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_job_runs_reports_and_a_duplicate_submit_returns_the_first(control: Control, code: Path) -> None:
    first = submit(control, "job-1", code, "--param", "epochs=3", "--param", "lr=0.25")
    assert first["state"] in ("QUEUED", "RUNNING") and first["code_hash"]
    again = submit(control, "job-1", code, "--param", "epochs=3", "--param", "lr=0.25")  # the same: the first
    assert again["created_at"] == first["created_at"] and again["spec"]["parameters"]["epochs"] == {"integer": "3"}
    job = control.wait_state("job-1", Job.SUCCEEDED, Job.FAILED)
    assert job.state == Job.SUCCEEDED and job.exit_code == 0 and job.attempt == 1
    assert job.logged_params["lr"] == "0.25" and job.dataset_hash == "synthetic-v1"
    assert job.metrics["loss"] == pytest.approx((0.25 - 0.3) ** 2 + 1 / 3)
    assert job.progress.epoch == 3 and job.progress.total_epochs == 3
    # streamed metrics: every step, in order, then the final state
    with grpc.insecure_channel(control.process.address) as channel:
        events = list(
            training_pb2_grpc.TrainingStub(channel).StreamMetrics(
                training_pb2.StreamMetricsRequest(id="job-1"), metadata=client_metadata("t-replica"), timeout=10
            )
        )
    assert [event.metric.step for event in metric_events(control, "job-1")] == [0, 1, 2]
    assert events[-1].state == Job.SUCCEEDED
    logs = subprocess.run(
        [sys.executable, "-m", "weir.cli", "train", "logs", "job-1", "--control-plane", control.process.address,
         "--token", "t-deployer"], capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "rank 0/1 attempt 1 starting at epoch 0" in logs
    # the log is its submitter's ('ci', t-deployer) and the admins' to read, not every viewer's
    with grpc.insecure_channel(control.process.address) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamLogs(training_pb2.StreamLogsRequest(id="job-1"), metadata=client_metadata("t-replica"),
                                 timeout=10))  # fmt: skip
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "submitter and by admins" in str(caught.value.details())
        chunks = stub.StreamLogs(training_pb2.StreamLogsRequest(id="job-1"), metadata=client_metadata("t-admin"),
                                 timeout=10)  # fmt: skip
        assert b"".join(chunk.data for chunk in chunks).decode() == logs
    # a failing job: its exit code and the reason, and FAILED never changes again
    cli(control.process, "train", "submit", "job-2", "--script", "train.py", "--code", str(code),
        "--param", "epochs=1", "--param", "exit_code=3")  # fmt: skip
    failed = control.wait_state("job-2", Job.FAILED, Job.SUCCEEDED)
    assert failed.state == Job.FAILED and failed.exit_code == 3 and "exited with code 3" in failed.reason
    # issue 15, item 6: the same id with a fixed spec answered the old FAILED job as if submitted
    fixed = run_cli(control, "train", "submit", "job-2", "--script", "train.py", "--code", str(code),
                    "--param", "epochs=1")  # fmt: skip
    assert fixed.returncode == 1, fixed.stdout + fixed.stderr
    error = json.loads(fixed.stdout)["error"]
    assert error["code"] == "ALREADY_EXISTS", error
    assert "job 'job-2' already exists (FAILED" in error["message"] and "different spec" in error["message"]
    same = run_cli(control, "train", "submit", "job-2", "--script", "train.py", "--code", str(code),
                   "--param", "epochs=1", "--param", "exit_code=3", json_output=False)  # fmt: skip
    assert same.returncode == 0, same.stderr
    assert "job 'job-2' already exists (FAILED) with this spec: this is that job" in same.stderr
    assert "job job-2: FAILED" in same.stdout
    assert cli(control.process, "train", "cancel", "job-2")["state"] == "FAILED"
    listed = cli(control.process, "train", "list", "--state", "SUCCEEDED")
    assert [job["id"] for job in listed] == ["job-1"]


def test_a_two_process_gloo_job_runs_every_rank(control: Control, code: Path) -> None:
    submit(control, "ddp", code, "--processes", "2", "--param", "epochs=2", "--param", "epoch_sleep=0.5")
    followed = subprocess.run(  # follows the log while the job runs and returns when it ends
        [sys.executable, "-m", "weir.cli", "train", "logs", "ddp", "--follow", "--control-plane",
         control.process.address, "--token", "t-admin"], capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    job = control.job("ddp")
    assert job.state in (Job.SUCCEEDED, Job.FAILED)
    log = control.log("ddp")
    assert followed == log
    assert job.state == Job.SUCCEEDED, log
    assert "rank 0 all_reduce sum 3" in log and "rank 1 all_reduce sum 3" in log


def test_a_worker_killed_mid_run_is_retried_and_resumes_from_its_checkpoint(control: Control, code: Path) -> None:
    submit(control, "resume", code, "--param", "epochs=8", "--param", "epoch_sleep=0.5", "--max-retries", "1")
    wait_until(lambda: control.job("resume").metrics.get("loss", 0) and control.job("resume").progress.epoch >= 3,
               60, "three epochs done")  # fmt: skip
    worker = job_workers("resume")[0]
    os.kill(worker, signal.SIGKILL)  # mid-epoch: torchrun sees a worker die and exits non-zero
    job = control.wait_state("resume", Job.SUCCEEDED, Job.FAILED)
    log = control.log("resume")
    assert job.state == Job.SUCCEEDED and job.attempt == 2, log
    resumed_at = int(log.split("attempt 2 starting at epoch ")[1].split()[0])
    assert resumed_at >= 3, log  # not from epoch 0
    assert job.progress.epoch == 8


def test_cancel_ends_every_process_of_a_job(control: Control, code: Path) -> None:
    submit(control, "long", code, "--processes", "2", "--param", "epochs=100", "--param", "epoch_sleep=0.5")
    wait_until(lambda: len(list(control.job_dir("long").glob("pid-1-*"))) == 2 and control.job("long").metrics,
               60, "both workers started")  # fmt: skip
    workers = list(job_workers("long").values())
    assert len(workers) == 2
    cancelled = cli(control.process, "train", "cancel", "long")
    assert cancelled["state"] == "CANCELLED" and "cancelled by ci" in cancelled["reason"]
    wait_until(lambda: not any(pid_alive(pid) for pid in workers), 20, "every worker gone")
    time.sleep(1.0)
    assert control.job("long").state == Job.CANCELLED  # terminal: the exit that followed changed nothing


def test_a_control_plane_restart_during_runs_leaves_no_job_in_a_wrong_state(control: Control, code: Path) -> None:
    submit(control, "outlives", code, "--param", "epochs=20", "--param", "epoch_sleep=0.5")
    submit(control, "ends-meanwhile", code, "--param", "epochs=3", "--param", "epoch_sleep=0.5")
    submit(control, "vanishes", code, "--param", "epochs=100", "--param", "epoch_sleep=0.5")
    for job_id in ("outlives", "ends-meanwhile", "vanishes"):
        wait_until(lambda job_id=job_id: control.job(job_id).progress.epoch >= 1, 60, f"{job_id} running")
    worker = job_workers("vanishes")[0]
    control.stop(kill=True)  # the control plane dies; its jobs run on in their own sessions
    torchrun = parent_of(worker)
    os.killpg(os.getpgid(torchrun), signal.SIGKILL)  # ... except this one: launcher and torchrun,
    os.kill(worker, signal.SIGKILL)  # then its worker, gone without an exit status
    wait_until(lambda: (control.job_dir("ends-meanwhile") / "exit-1.json").is_file(), 60, "a job ended meanwhile")
    control.start()
    assert control.wait_state("ends-meanwhile", Job.SUCCEEDED, Job.FAILED).state == Job.SUCCEEDED
    vanished = control.wait_state("vanishes", Job.FAILED, Job.SUCCEEDED, Job.CANCELLED)
    assert vanished.state == Job.FAILED and "while the control plane was down" in vanished.reason
    survivor = control.wait_state("outlives", Job.SUCCEEDED, Job.FAILED)
    # re-attached, not restarted; the reports it could not make meanwhile arrived afterwards
    assert survivor.state == Job.SUCCEEDED and survivor.attempt == 1 and survivor.progress.epoch == 20
    steps = [event.metric.step for event in metric_events(control, "outlives")]
    assert steps == list(range(20))


def test_a_sweep_picks_its_best_trial_and_stops_poor_ones(control: Control, code: Path) -> None:
    cli(control.process, "sweep", "submit", "lr-sweep", "--script", "train.py", "--code", str(code),
        "--param", "epochs=3", "--param", "epoch_sleep=0.2", "--space", "lr=0.1,0.3,0.9,0.5",
        "--metric", "loss", "--parallelism", "2")  # fmt: skip
    sweep = control.wait_state("lr-sweep", Job.SUCCEEDED, Job.FAILED, timeout=180)
    assert sweep.state == Job.SUCCEEDED and len(sweep.trials) == 4
    assert sweep.best_trial == "lr-sweep.trial-001"  # lr 0.3: the lowest loss
    assert sweep.best_value == pytest.approx(1 / 3)
    status = cli(control.process, "sweep", "status", "lr-sweep")
    assert {trial["state"] for trial in status["trial_jobs"]} == {"SUCCEEDED"}
    # issue 15, item 6: each trial's hyperparameters, in the JSON and the text
    assert [trial["hyperparameters"] for trial in status["trial_jobs"]] == [{"lr": lr} for lr in (0.1, 0.3, 0.9, 0.5)]
    text = run_cli(control, "sweep", "status", "lr-sweep", json_output=False).stdout
    assert "trial lr-sweep.trial-002: SUCCEEDED (attempt 1)\n    hyperparameters: lr=0.9\n" in text, text
    # the median rule: a trial worse than the others' median at a step is stopped
    cli(control.process, "sweep", "submit", "median", "--script", "train.py", "--code", str(code),
        "--param", "epochs=4", "--param", "epoch_sleep=0.3", "--space", "lr=0.3,0.25,0.35,3.0",
        "--metric", "loss", "--parallelism", "4", "--median-stopping")  # fmt: skip
    stopped = control.wait_state("median", Job.SUCCEEDED, Job.FAILED, timeout=180)
    poor = control.job("median.trial-003")
    assert poor.state == Job.CANCELLED and poor.reason.startswith("stopped by the median rule at step "), poor.reason
    assert stopped.best_trial == "median.trial-000"


def test_bad_submissions_name_the_field(control: Control, code: Path) -> None:
    def refused(*args: str) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "weir.cli", *args, "--control-plane", control.process.address, "--token",
             "t-deployer", "--json"], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        return json.loads(result.stdout)["error"]

    error = refused("train", "submit", "no-code", "--script", "train.py")
    assert error["code"] == "INVALID_ARGUMENT" and "spec.code_archive" in error["message"]
    error = refused("train", "submit", "bad id!", "--builtin", "mlp")
    assert error["code"] == "INVALID_ARGUMENT" and error["message"].startswith("id:")
    error = refused("train", "status", "ghost")
    assert error["code"] == "NOT_FOUND"
    # a name the registry would refuse only once the job has run is refused at submission
    error = refused("train", "submit", "bad-name", "--builtin", "mlp", "--register", "../escape")
    assert error["code"] == "INVALID_ARGUMENT" and "spec.register.model_name" in error["message"], error
    error = refused("sweep", "submit", "s", "--builtin", "mlp", "--space", "lr=range:1:0", "--metric", "loss",
                    "--method", "random", "--trials", "2")  # fmt: skip
    assert error["code"] == "INVALID_ARGUMENT" and "low < high" in error["message"]
    # a job past its timeout is ended and FAILED, without a retry
    submit(control, "slow", code, "--param", "epochs=100", "--param", "epoch_sleep=0.5", "--timeout", "2",
           "--max-retries", "2")  # fmt: skip
    slow = control.wait_state("slow", Job.FAILED, Job.SUCCEEDED, Job.CANCELLED, timeout=60)
    assert slow.state == Job.FAILED and slow.reason == "timed out after 2 s" and slow.attempt == 1
    # reporting needs the job's own secret
    with grpc.insecure_channel(control.process.address) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        submit(control, "secret", code, "--param", "epochs=1")
        with pytest.raises(grpc.RpcError) as caught:
            stub.LogMetrics(training_pb2.LogMetricsRequest(job_id="secret"), metadata=(("x-weir-job-secret", "guess"),))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        wrong_secret = caught.value.details()
        # ... and an unknown job id gets the same answer: reporting tells nothing about which jobs exist
        with pytest.raises(grpc.RpcError) as caught:
            stub.LogMetrics(training_pb2.LogMetricsRequest(job_id="ghost"), metadata=(("x-weir-job-secret", "guess"),))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == wrong_secret.replace("'secret'", "'ghost'")
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(training_pb2.SubmitJobRequest(id="x"), metadata=client_metadata("t-replica"), timeout=10)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_the_built_in_trainer_registers_a_ready_version_with_lineage(control: Control) -> None:
    from examples.training_data import build_training_data

    # in the feature root, which jobs may read (running as the job user, they see no other part of the
    # control plane's state directory)
    definitions, entities = build_training_data(control.state_dir / "features" / "data", rows=1500)
    cli(control.process, "features", "apply", str(definitions))
    cli(control.process, "train", "submit", "churn-1", "--builtin", "mlp", "--param", f"entities={entities}",
        "--param", "feature_service=churn", "--param", "label=churned", "--param", "epochs=6",
        "--register", "churn", "--alias", "candidate", "--canary-endpoint", "churn-endpoint")  # fmt: skip
    job = control.wait_state("churn-1", Job.SUCCEEDED, Job.FAILED, timeout=300)
    assert job.state == Job.SUCCEEDED, control.log("churn-1")[-3000:]
    assert job.registered.model_name == "churn" and job.registered.version == 1
    # the hand-off to the rollouts service happened: nothing serves that endpoint, so it refused
    assert job.reason.startswith("canary not started:") and "churn-endpoint" in job.reason, job.reason
    with grpc.insecure_channel(control.process.address) as channel:
        version = registry_pb2_grpc.RegistryStub(channel).GetModelVersionByAlias(
            registry_pb2.GetModelVersionByAliasRequest(model_name="churn", alias="candidate"),
            metadata=client_metadata("t-replica"), timeout=10,
        )  # fmt: skip
    assert version.state == registry_pb2.ModelVersion.READY and version.version == 1
    lineage = version.lineage
    assert lineage.source_job == "churn-1" and lineage.dataset_hash == job.dataset_hash and len(job.dataset_hash) == 64
    assert lineage.code_version == job.code_hash and lineage.parameters["feature_service"] == "churn"
    assert version.metrics["val_accuracy"] > 0.85
    assert "weir_feature_service" in version.config_pbtxt
    # a sweep of the built-in trainer registers its best trial, with that trial as the lineage's job
    cli(control.process, "sweep", "submit", "churn-sweep", "--builtin", "mlp", "--param", f"entities={entities}",
        "--param", "feature_service=churn", "--param", "label=churned", "--param", "epochs=4",
        "--space", "lr=0.00001,0.05", "--metric", "val_accuracy", "--maximize", "--register", "churn")  # fmt: skip
    sweep = control.wait_state("churn-sweep", Job.SUCCEEDED, Job.FAILED, timeout=300)
    assert sweep.state == Job.SUCCEEDED and sweep.best_trial == "churn-sweep.trial-001", sweep.reason
    assert sweep.registered.version == 2 and sweep.metrics["val_accuracy"] == sweep.best_value
    with grpc.insecure_channel(control.process.address) as channel:
        best = registry_pb2_grpc.RegistryStub(channel).GetModelVersion(
            registry_pb2.GetModelVersionRequest(model_name="churn", version=2),
            metadata=client_metadata("t-replica"), timeout=10,
        )  # fmt: skip
    assert best.lineage.source_job == "churn-sweep.trial-001" and best.lineage.parameters["lr"] == "0.05"


def test_hostile_code_archives_are_refused_before_anything_is_stored(control: Control) -> None:
    """Each hostile archive answers INVALID_ARGUMENT naming the member, no job exists afterwards, and a
    gzip bomb does not grow the control plane's memory by what it inflates to."""
    from tests.controlplane.test_training_store import BOMB_UNPACKED, HOSTILE, gzip_bomb, tar_of

    def peak_rss_kib() -> int:
        status = Path(f"/proc/{control.process.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])

    cases = {name: (tar_of(*members), member) for name, (members, member, _) in HOSTILE.items()}
    cases["bomb"] = (gzip_bomb(BOMB_UNPACKED), "unpacked")
    before = peak_rss_kib()
    with grpc.insecure_channel(control.process.address) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        for name, (archive, member) in cases.items():
            spec = training_pb2.JobSpec(entrypoint="script:train.py", code_archive=archive)
            with pytest.raises(grpc.RpcError) as caught:
                stub.SubmitJob(training_pb2.SubmitJobRequest(id=f"hostile-{name}", spec=spec),
                               metadata=client_metadata("t-deployer"), timeout=60)  # fmt: skip
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (name, caught.value.details())
            assert str(caught.value.details()).startswith("spec.code_archive: ") and member in str(
                caught.value.details()
            ), name
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetJob(training_pb2.GetJobRequest(id=f"hostile-{name}"), metadata=client_metadata("t-admin"))
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert not list((control.state_dir / "jobs").glob("hostile-*"))
    assert peak_rss_kib() - before < 64 * 1024, "the bomb grew the control plane's memory"  # KiB


def test_built_in_job_inputs_are_checked_at_submission_and_followed_as_they_run(
    control: Control, tmp_path: Path
) -> None:
    """Issue 15, item 6: a relative entities= path (as the README writes it) resolved against the job's
    directory on the control plane and the job "exited with code 2"; an unknown feature service the
    same. Now a relative path is the user's (the CLI sends it absolute), and a bad input is refused at
    submission naming the parameter, with no job stored. --follow prints each epoch while the job
    runs; `train status` shows every epoch's metrics."""
    from training_data import build_training_data  # examples/ (on the path: tests/conftest.py)

    project = control.state_dir / "features"  # the feature root
    definitions, entities = build_training_data(project / "data", rows=400)
    cli(control.process, "features", "apply", str(definitions))
    outside, _ = build_training_data(tmp_path / "outside", rows=50)

    def refused(job_id: str, *params: str, cwd: Path = project) -> str:
        args = [item for param in params for item in ("--param", param)]
        result = run_cli(control, "train", "submit", job_id, "--builtin", "mlp", *args, cwd=cwd)
        assert result.returncode == 1, result.stdout + result.stderr
        error = json.loads(result.stdout)["error"]
        assert error["code"] == "INVALID_ARGUMENT", error
        assert run_cli(control, "train", "status", job_id).returncode == 1  # nothing was stored
        return str(error["message"])

    good = ("feature_service=churn", "label=churned")
    message = refused("outside", f"entities={outside.parent / 'entities.parquet'}", *good)
    assert message.startswith("spec.parameters['entities']: ") and "inside the feature root" in message, message
    message = refused("missing", "entities=data/nothing.parquet", *good)
    assert message.startswith("spec.parameters['entities']: ") and str(project / "data/nothing.parquet") in message
    message = refused("service", "entities=data/entities.parquet", "feature_service=nope", "label=churned")
    assert message.startswith("spec.parameters['feature_service']: ") and "'nope'" in message and "churn" in message
    message = refused("label", "entities=data/entities.parquet", "feature_service=churn", "label=churn")
    assert message.startswith("spec.parameters['label']: ") and "'churn'" in message and "churned" in message
    message = refused("epochs", "entities=data/entities.parquet", *good, "epochs=0")
    assert message.startswith("spec.parameters['epochs']: "), message
    # the API itself: a relative path cannot mean anything on the control plane
    with grpc.insecure_channel(control.process.address) as channel:
        spec = training_pb2.JobSpec(entrypoint="builtin:mlp")
        for key, value in (("entities", "data/entities.parquet"), ("feature_service", "churn"), ("label", "churned")):
            spec.parameters[key].text = value
        with pytest.raises(grpc.RpcError) as caught:
            training_pb2_grpc.TrainingStub(channel).SubmitJob(
                training_pb2.SubmitJobRequest(id="relative", spec=spec), metadata=client_metadata("t-deployer"),
                timeout=30,
            )  # fmt: skip
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value.details()).startswith("spec.parameters['entities']: expected an absolute path")

    # the README's relative path, from the project directory, followed as it runs
    follow = subprocess.Popen(
        [sys.executable, "-m", "weir.cli", "train", "submit", "churn-rel", "--builtin", "mlp", "--param",
         "entities=data/entities.parquet", "--param", "feature_service=churn", "--param", "label=churned",
         "--param", "epochs=3", "--param", "patience=10", "--param", "epoch_sleep=1", "--follow",
         "--control-plane", control.process.address, "--token", "t-deployer"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=project,
    )  # fmt: skip
    assert follow.stdout is not None
    lines = []
    for line in follow.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("churn-rel: epoch 1/3: "):
            # printed as it happens: the job still has two epochs (and a second's sleep each) to go
            assert control.job("churn-rel").state == Job.RUNNING
    assert follow.wait(timeout=300) == 0, "\n".join(lines) + follow.stderr.read()  # type: ignore[union-attr]
    epochs = [line for line in lines if line.startswith("churn-rel: epoch ")]
    assert [line.split(":")[1].strip() for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], lines
    assert all("val_accuracy=" in line and "loss=" in line for line in epochs)
    assert "churn-rel: RUNNING" in lines and "churn-rel: SUCCEEDED" in lines
    assert lines.index("churn-rel: RUNNING") < lines.index(epochs[0]) < lines.index("churn-rel: SUCCEEDED")
    job = control.job("churn-rel")
    assert job.spec.parameters["entities"].text == str(entities)
    # every epoch's metrics through the API and the CLI, not only in a file on the control plane's disk
    status = cli(control.process, "train", "status", "churn-rel")
    assert [point["step"] for point in status["metric_history"]] == [0, 1, 2]
    assert all({"loss", "val_loss", "val_accuracy"} <= point.keys() for point in status["metric_history"])
    text = run_cli(control, "train", "status", "churn-rel", json_output=False).stdout
    assert "metric history:" in text and "step\tloss\tval_accuracy\tval_loss" in text, text
    assert len([line for line in text.splitlines() if line.startswith(("  0\t", "  1\t", "  2\t"))]) == 3, text


IDLE_SCRIPT = """
import time
from weir_control import tracking

run = tracking.init()
for _ in range(600):  # the test reports for it; ended by the median rule or a cancel
    time.sleep(0.2)
"""


def test_a_median_stopped_trial_is_stopped_on_the_value_its_metrics_show(control: Control, tmp_path: Path) -> None:
    """Issue 15, item 6: a trial was stopped for its value at an old step although it had reported a
    better later one, so it showed CANCELLED with metrics contradicting its reason. The test reports for
    the trials itself, through the real LogMetrics RPC with each trial's own secret, in a chosen order."""
    code = tmp_path / "idle"
    code.mkdir()
    (code / "idle.py").write_text(IDLE_SCRIPT)
    cli(control.process, "sweep", "submit", "median", "--script", "idle.py", "--code", str(code),
        "--space", "lr=1,2,3,4", "--metric", "loss", "--parallelism", "4", "--median-stopping")  # fmt: skip
    trials = [f"median.trial-00{index}" for index in range(4)]
    for trial in trials:
        control.wait_state(trial, Job.RUNNING)
    with grpc.insecure_channel(control.process.address) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)

        def report(trial: str, step: int, loss: float) -> bool:
            secret = (control.job_dir(trial) / ".secret").read_text().strip()
            ack = stub.LogMetrics(
                training_pb2.LogMetricsRequest(job_id=trial, points=[training_pb2.MetricPoint(key="loss", step=step,
                                               value=loss)]), metadata=(("x-weir-job-secret", secret),), timeout=30,
            )  # fmt: skip
            return bool(ack.stop)

        fast, steady, other, poor = trials
        assert not report(fast, 1, 5.0) and not report(fast, 2, 1.0)  # a poor start, then as good as any
        for trial in (steady, other, poor):
            assert not report(trial, 1, 1.0)  # step 1: 'fast' was worse there, but its metrics show 1.0 now
        assert control.job(fast).state == Job.RUNNING, control.job(fast).reason
        assert not report(steady, 2, 1.0) and not report(other, 2, 1.0)
        assert report(poor, 2, 9.0)  # worse than the others' median at its latest step: stopped
    stopped = control.job(poor)
    assert stopped.state == Job.CANCELLED
    assert stopped.reason == "stopped by the median rule at step 2: loss 9 worse than the other trials' median 1"
    assert stopped.metrics["loss"] == 9.0  # the value the reason names
    assert control.job(fast).state == Job.RUNNING and control.job(fast).metrics["loss"] == 1.0
    cli(control.process, "train", "cancel", "median")


def test_the_canary_a_job_starts_takes_its_steps_and_interval_from_the_cli(control: Control, code: Path) -> None:
    """`--canary-endpoint` started the canary with the default steps and interval, which the CLI could not
    change; `--canary-steps` and `--canary-interval` reach register.canary, checked at submission."""
    register = ("--register", "scored", "--canary-endpoint", "scoring")
    job = submit(control, "canary-1", code, "--param", "epochs=1", *register, "--canary-steps", "10,50,100",
                 "--canary-interval", "5")  # fmt: skip
    assert job["spec"]["register"]["canary"] == {"endpoint": "scoring", "steps": [10, 50, 100], "interval_seconds": 5.0}
    default = submit(control, "canary-2", code, "--param", "epochs=1", *register)
    assert default["spec"]["register"]["canary"] == {"endpoint": "scoring"}  # the rollout's defaults apply
    refused = run_cli(control, "train", "submit", "canary-3", "--script", "train.py", "--code", str(code), *register,
                      "--canary-steps", "10,50")  # fmt: skip
    error = json.loads(refused.stdout)["error"]
    assert refused.returncode == 1 and error["code"] == "INVALID_ARGUMENT", refused.stdout + refused.stderr
    assert error["message"] == (
        "spec.register.canary.steps: expected increasing percentages in 1..100 ending at 100, got [10, 50]"
    )
    alone = run_cli(control, "train", "submit", "canary-4", "--script", "train.py", "--code", str(code),
                    "--canary-steps", "10,100")  # fmt: skip
    assert alone.returncode == 1 and "--canary-steps: goes with --canary-endpoint" in alone.stdout, alone.stdout
