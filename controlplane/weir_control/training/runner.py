"""The job runner: a queue with a concurrency limit over an ``Executor``, retries that resume from the
job's checkpoints, timeouts, cancel, sweeps (a parent whose trials are ordinary queued jobs, at most
``parallelism`` of them running), registration on success, and re-attachment after a restart.

All state lives in the store (``training_jobs``); the runner keeps only the attempts it watches. Every
blocking step (store, processes, files) runs in a worker thread under one lock, so the RPCs, the
median rule and the periodic tick never act on a job at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weir_control.artifacts import ArtifactStore
from weir_control.lease import LeaseKeeper
from weir_control.store import Store
from weir_control.store.store import _check_job_id
from weir_control.training import sandbox, sweeps
from weir_control.training.archive import unpack
from weir_control.training.executor import Executor, LocalExecutor
from weir_control.training.jobfiles import open_inside, read_inside
from weir_control.training.joblog import last_log_line, torchrun_root_cause
from weir_control.training.jobspec import BUILTIN, attempt_command, check_spec, version_ref
from weir_control.training.jobspec import archive_directory as archive_directory  # the CLI packs code with it
from weir_control.training.jobspec import code_hash as code_hash
from weir_control.training.preflight import check_builtin_job
from weir_control.training.registration import register_job_output
from weir_proto.auth import new_token
from weir_proto.control.v1 import training_pb2
from weir_proto.errors import (
    AlreadyExistsError,
    NotFoundError,
    WeirError,
)

log = logging.getLogger(__name__)

Job = training_pb2.Job
TICK_SECONDS = 0.25
MEDIAN_STOPPED = "stopped by the median rule"  # a CANCELLED trial's reason starts so (not cancelled by hand)
STOP_GRACE_SECONDS = 5.0
# What a job inherits from the control plane's environment (besides LC_*): nothing secret.
INHERITED = frozenset(
    {"PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
     "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
     "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"}
)  # fmt: skip


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Attempt:
    handle: int
    number: int
    deadline: float | None  # time.time() after which the job is ended, or None
    parent: str = ""  # a trial's sweep


def param_value(value: training_pb2.ParamValue) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind is None else getattr(value, kind)


class JobRunner:
    def __init__(
        self,
        store: Store,
        artifacts: ArtifactStore,
        jobs_dir: Path,
        max_concurrent: int = 2,
        executor: Executor | None = None,
        start_canary: Callable[[Any, str], Any] | None = None,
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self.jobs_dir = jobs_dir
        self.max_concurrent = max(1, max_concurrent)
        self._executor: Executor = executor or LocalExecutor()
        self._start_canary = start_canary  # (StartRolloutRequest, actor) -> awaitable, run on the loop
        self.control_address = ""  # told to jobs for tracking; set once the server has its port
        # Several replicas: every live replica's address, told to jobs so they keep reporting when
        # this one dies (blocking; None: this replica's address alone).
        self.control_addresses: Callable[[], list[str]] | None = None
        # The queue, launches and watching run only on the lease holder; a launch is fenced by it.
        # Jobs are submitted and cancelled through any replica (rows in the store).
        self.lease: LeaseKeeper | None = None
        self._adopted = False  # the running jobs were adopted in this term
        self._attempts: dict[str, Attempt] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.changed = asyncio.Event()
        self._job_user = sandbox.DEFAULT_JOB_USER
        self._hidden: list[Path] = []
        self._readable: list[Path] = []
        self.sandbox = sandbox.JobSandbox()  # decided at start

    def isolate(self, job_user: str, state: list[Path | None], database_url: str, readable: list[Path]) -> None:
        """What jobs must not see (the control plane's state directory, artifacts, tokens file and SQLite
        database, besides the jobs directory) and what they may read (the feature root); applied at
        start (see ``training.sandbox``)."""
        self._job_user = job_user
        database = database_url.removeprefix("sqlite:///") if database_url.startswith("sqlite:///") else database_url
        paths = [path for path in state if path is not None]
        if "://" not in database:
            paths += [Path(database + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
        self._hidden = paths
        self._readable = readable

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.sandbox = await asyncio.to_thread(
            sandbox.prepare, self._job_user, self.jobs_dir, self._hidden, self._readable
        )
        if isinstance(self._executor, LocalExecutor):
            self._executor.sandbox = self.sandbox
        if self.sandbox.isolated:  # jobs do not list each other (with namespaces they do not see the directory)
            os.chmod(self.jobs_dir, 0o700 if self.sandbox.namespaces else 0o711)
        self._task = asyncio.create_task(self._run(), name="weir-training-runner")

    async def stop(self) -> None:
        """Stop watching; running jobs keep running (a restart re-attaches them)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                holding = self.lease is None or self.lease.held
                if holding and not self._adopted:  # a new term (or the start): adopt the running jobs
                    await asyncio.to_thread(self._recover)
                    self._adopted = True
                elif not holding and self._adopted:  # another replica adopts them: stop watching
                    with self._lock:
                        self._attempts.clear()
                    self._adopted = False
                    log.info("training jobs left to the new lease holder")
                if holding and await asyncio.to_thread(self._tick):
                    self.notify()
            except Exception:  # the loop must survive one bad job
                log.exception("training runner tick failed")
            await asyncio.sleep(TICK_SECONDS)

    def notify(self) -> None:
        """Wake streams following a job (from any thread)."""
        if self._loop is None:
            return

        def wake() -> None:
            self.changed.set()
            self.changed = asyncio.Event()

        self._loop.call_soon_threadsafe(wake)

    def _recover(self) -> None:
        """After a restart: re-attach attempts still running, settle those that ended meanwhile, and fail
        those whose processes vanished without an exit status."""
        with self._lock:
            for job in self._store.jobs_in_states(Job.RUNNING):
                if job.kind == "sweep":
                    continue
                handle, _ = self._store.job_process(job.id)
                job_dir = self.jobs_dir / job.id
                code = self._executor.exit_code(job_dir, job.attempt, handle)
                if code is None and self._executor.alive(handle):
                    self._attempts[job.id] = Attempt(handle, job.attempt, self._deadline(job), job.parent_id)
                    log.info("re-attached a running training job", extra={"job": job.id, "pid": handle})
                elif code is not None and code >= 0 and (job_dir / f"exit-{job.attempt}.json").is_file():
                    self._attempts[job.id] = Attempt(
                        handle, job.attempt, None, job.parent_id
                    )  # the next tick settles it
                else:
                    self._finish(
                        job.id, Job.FAILED, -1,
                        "its processes ended while the control plane was down, without an exit status",
                    )  # fmt: skip

    # --- submission ------------------------------------------------------------------------------

    def submit(self, job_id: str, spec: training_pb2.JobSpec, actor: str) -> Job:
        digest = check_spec(spec)
        existing = self._existing(job_id, "job", spec, digest)
        if existing is not None:
            return existing  # an identical resubmission: the first job, whatever its state
        self.preflight(spec)
        return self._submit(job_id, spec, actor, digest)

    def preflight(self, spec: training_pb2.JobSpec) -> None:
        """A built-in job's data parameters, checked now rather than when it runs (see ``preflight``)."""
        if spec.entrypoint in BUILTIN:
            check_builtin_job(spec, self._readable, self._store.feature_definitions()[1])

    def _existing(self, job_id: str, kind: str, spec: Any, digest: str) -> Job | None:
        """The stored job of that id when ``spec`` is the one it was submitted with (its code by hash),
        None when there is none; ALREADY_EXISTS naming it and its state when it differs: a resubmission
        must not silently answer with another job (e.g. the failed first try of a fixed spec)."""
        _check_job_id(job_id)  # the id first: its error names it before any parameter's
        try:
            stored = self._store.get_job(job_id)
        except NotFoundError:
            return None
        submitted = type(spec)()
        submitted.CopyFrom(spec)
        if kind == "sweep":
            submitted.template.ClearField("code_archive")
            same = stored.kind == "sweep" and stored.sweep == submitted
        else:
            submitted.ClearField("code_archive")
            same = stored.kind == kind and stored.spec == submitted
        if same and stored.code_hash == digest:
            return stored
        state = Job.State.Name(stored.state)
        raise AlreadyExistsError(
            f"id: {stored.kind} '{job_id}' already exists ({state}"
            + (f": {clip(stored.reason, 200)}" if stored.reason else "")
            + f") with a different {'sweep' if kind == 'sweep' else 'spec'}; submit under a new id "
            "(the same spec again returns the existing job)"
        )

    def _submit(
        self, job_id: str, spec: training_pb2.JobSpec, actor: str, digest: str, parent: Job | None = None
    ) -> Job:
        job = Job(id=job_id, kind="trial" if parent else "job", parent_id=parent.id if parent else "", state=Job.QUEUED)
        job.spec.CopyFrom(spec)
        job.spec.ClearField("code_archive")
        job.code_hash = digest
        job.submitted_by = actor
        secret = new_token("weirjob_", 24)
        with self._lock:
            stored, created = self._store.insert_job(job, hashlib.sha256(secret.encode()).hexdigest())
            if created:
                try:
                    self._prepare(job_id, spec, secret)
                except OSError as error:  # the archive passed its checks: this is the server's disk
                    log.exception("could not prepare a training job's directory", extra={"job": job_id})
                    shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
                    stored = self._finish(job_id, Job.FAILED, -1, f"could not prepare its directory: {error}")
        if created:
            self.notify()
        return stored

    def submit_sweep(self, sweep_id: str, sweep: training_pb2.SweepSpec, actor: str) -> Job:
        digest = check_spec(sweep.template)  # the trials differ from it only in their parameters
        existing = self._existing(sweep_id, "sweep", sweep, digest)
        if existing is not None:
            return existing
        overrides = sweeps.trial_parameters(sweep)
        for values in overrides:  # each trial's parameters, as it will run
            trial = training_pb2.JobSpec()
            trial.CopyFrom(sweep.template)
            for name, value in values.items():
                trial.parameters[name].CopyFrom(value)
            self.preflight(trial)
        parent = Job(id=sweep_id, kind="sweep", state=Job.RUNNING, submitted_by=actor)
        parent.sweep.CopyFrom(sweep)
        parent.sweep.template.ClearField("code_archive")
        parent.code_hash = digest
        parent.started_at.FromDatetime(datetime.datetime.now(datetime.UTC))
        with self._lock:
            stored, created = self._store.insert_job(parent, "")
        if not created:
            return stored
        trial_ids = []
        for index, values in enumerate(overrides):
            spec = training_pb2.JobSpec()
            spec.CopyFrom(sweep.template)
            spec.ClearField("register")  # the sweep registers its best trial, not every trial
            for name, value in values.items():
                spec.parameters[name].CopyFrom(value)
            trial_id = f"{sweep_id}.trial-{index:03d}"
            self._submit(trial_id, spec, actor, digest, parent=parent)
            trial_ids.append(trial_id)
        with self._lock:
            return self._store.update_job(sweep_id, lambda job: job.trials.extend(trial_ids))

    def spec_like(self, job_id: str) -> training_pb2.JobSpec:
        """The spec of an earlier job, its code packed again from that job's directory (a retraining)."""
        job = self._store.get_job(job_id)
        spec = training_pb2.JobSpec()
        spec.CopyFrom(job.spec)
        code_dir = self.jobs_dir / job_id / "code"
        if code_dir.is_dir() and not code_dir.is_symlink():
            spec.code_archive = archive_directory(code_dir, follow_links=False)  # the job may have changed it
        return spec

    def _prepare(self, job_id: str, spec: training_pb2.JobSpec, secret: str) -> None:
        """The job's directory: its code unpacked, its secret, and the feature definitions for the
        built-in trainer."""
        job_dir = self.jobs_dir / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        secret_file = os.open(job_dir / ".secret", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(secret_file, "w") as handle:
            handle.write(secret)
        if spec.code_archive:
            unpack(spec.code_archive, job_dir / "code")  # checked in full before the job was inserted
        _, definitions = self._store.feature_definitions()
        if definitions:
            (job_dir / "features.toml").write_text(definitions)
        if self.sandbox.isolated:
            # the job user owns its directory (checkpoints, output, logs of its own); the code, the secret
            # and the definitions stay the control plane's: readable (not the secret), not replaceable
            # in place
            (job_dir / "tmp").mkdir(exist_ok=True)
            for path in (job_dir, job_dir / "tmp"):
                os.chown(path, self.sandbox.uid, self.sandbox.gid, follow_symlinks=False)  # type: ignore[arg-type]
            os.chmod(job_dir, 0o700)

    # --- cancel and the median rule --------------------------------------------------------------

    def cancel(self, job_id: str, reason: str = "cancelled on request") -> Job:
        with self._lock:
            job = self._store.get_job(job_id)
            if job.kind == "sweep":
                for trial_id in job.trials:
                    self._stop_locked(trial_id, reason)
            stopped = self._stop_locked(job_id, reason)
        self.notify()
        return stopped

    def _stop_locked(self, job_id: str, reason: str) -> Job:
        attempt = self._attempts.pop(job_id, None)
        if attempt is not None:
            self._executor.stop(attempt.handle, STOP_GRACE_SECONDS)
        return self._finish(job_id, Job.CANCELLED, -1 if attempt else 0, reason)

    def after_metrics(self, job: Job, points: list[training_pb2.MetricPoint]) -> bool:
        """The median stopping rule for a sweep's trial; True when the reporting trial was stopped.

        Every report at a step judges every running trial that has reached that step (not only the one
        reporting): the rule does not depend on which trial happens to report first."""
        if job.kind != "trial" or not job.parent_id:
            return False
        sweep = self._store.get_job(job.parent_id).sweep
        if not sweep.median_stopping:
            return False
        stopped_self = False
        for point in points:
            if point.key != sweep.metric or point.step < max(1, sweep.median_min_steps):
                continue
            values = self._store.step_values(job.parent_id, point.key, point.step)
            for trial_id, value in values.items():
                others = [other for other_id, other in values.items() if other_id != trial_id]
                if not sweeps.worse_than_median(value, others, sweep.maximize):
                    continue
                trial = job if trial_id == job.id else self._store.get_job(trial_id)
                if trial_id != job.id and trial.state != Job.RUNNING:
                    continue  # already ended (or not started): nothing to stop
                if trial.metrics.get(sweep.metric) != value:
                    # it has reported a later step since: judged on that one (once the others reach it),
                    # never stopped for an old value its metrics no longer show
                    continue
                self.cancel(
                    trial_id,
                    f"{MEDIAN_STOPPED} at step {point.step}: {sweep.metric} {value:.6g} worse than the "
                    f"other trials' median {statistics.median(others):.6g}",
                )
                stopped_self = stopped_self or trial_id == job.id
        return stopped_self

    # --- the periodic tick -----------------------------------------------------------------------

    def _tick(self) -> bool:
        with self._lock:
            changed = self._watch()
            changed = self._schedule() or changed
            return self._settle_sweeps() or changed

    def _watch(self) -> bool:
        changed = False
        for job_id, attempt in list(self._attempts.items()):
            job_dir = self.jobs_dir / job_id
            if self.lease is not None and self._store.get_job(job_id).state != Job.RUNNING:
                self._attempts.pop(job_id)  # cancelled through another replica: its process goes
                self._executor.stop(attempt.handle, STOP_GRACE_SECONDS)
                changed = True
                continue
            code = self._executor.exit_code(job_dir, attempt.number, attempt.handle)
            if code is None:
                if attempt.deadline is not None and time.time() > attempt.deadline:
                    self._attempts.pop(job_id)
                    self._executor.stop(attempt.handle, STOP_GRACE_SECONDS)
                    job = self._store.get_job(job_id)
                    self._finish(job_id, Job.FAILED, -1, f"timed out after {job.spec.timeout_seconds:g} s")
                    changed = True
                continue
            self._attempts.pop(job_id)
            self._attempt_ended(job_id, code)
            changed = True
        return changed

    def _attempt_ended(self, job_id: str, code: int) -> None:
        job = self._store.get_job(job_id)
        if code == 0:
            job = self._merge_final_metrics(job)
            if job.kind == "job" and job.spec.register.model_name:
                try:
                    version = register_job_output(self._store, self._artifacts, job, self.jobs_dir / job_id)
                except WeirError as error:
                    self._finish(job_id, Job.FAILED, 0, f"the job succeeded but registration failed: {error.message}")
                    return
                self._record_registration(job_id, version.model_name, version.version)
                self._finish(job_id, Job.SUCCEEDED, 0, self._canary(job, version.model_name, version.version))
                return
            self._finish(job_id, Job.SUCCEEDED, 0, "")
            return
        log_path = self.jobs_dir / job_id / "job.log"
        last_line = last_log_line(log_path)
        root_cause = torchrun_root_cause(log_path)
        if root_cause is not None:  # torchrun exits 1 whatever its worker did; the worker's own status counts
            rank, code = root_cause
            last_line = f"worker rank {rank} exited with code {code}"
        if job.attempt <= job.spec.max_retries:
            reason = f"attempt {job.attempt} failed ({last_line}); retrying from the last checkpoint"
            log.warning("training job attempt failed; retrying", extra={"job": job_id, "exit_code": code})
            self._launch(job_id, reason)
            return
        if root_cause is not None:
            code = root_cause[1]
        self._finish(job_id, Job.FAILED, code, f"exited with code {code} after {job.attempt} attempt(s): {last_line}")

    def _schedule(self) -> bool:
        queued = self._store.jobs_in_states(Job.QUEUED)
        if not queued or len(self._attempts) >= self.max_concurrent:
            return False
        running_by_sweep: dict[str, int] = {}
        for attempt in self._attempts.values():
            running_by_sweep[attempt.parent] = running_by_sweep.get(attempt.parent, 0) + 1
        parallelism: dict[str, int] = {}
        started = False
        for job in queued:
            if len(self._attempts) >= self.max_concurrent:
                break
            if job.parent_id:
                if job.parent_id not in parallelism:
                    parallelism[job.parent_id] = self._store.get_job(job.parent_id).sweep.parallelism or 2
                if running_by_sweep.get(job.parent_id, 0) >= parallelism[job.parent_id]:
                    continue
                running_by_sweep[job.parent_id] = running_by_sweep.get(job.parent_id, 0) + 1
            self._launch(job.id, "")
            started = True
        return started

    def _launch(self, job_id: str, reason: str) -> None:
        job_dir = self.jobs_dir / job_id
        job = self._store.get_job(job_id)
        attempt = job.attempt + 1

        def running(stored: Job) -> None:
            stored.state = Job.RUNNING
            stored.attempt = attempt
            stored.reason = reason
            if not stored.HasField("started_at"):
                stored.started_at.FromDatetime(datetime.datetime.now(datetime.UTC))

        # RUNNING with its attempt number before the process exists, fenced by the lease: a replica
        # that lost the lease launches nothing, and the new holder never launches this attempt again
        # (a holder killed between this and the spawn leaves the job RUNNING without a process: the
        # new holder's adoption fails it, "ended ... without an exit status")
        with self._store.transaction() as connection:
            if self.lease is not None:
                self.lease.fence(connection)
            if self._store.get_job(job_id).attempt != job.attempt:
                return  # launched meanwhile (cannot happen under the lease; never twice)
            job = self._store.update_job(job_id, running)
        if job.state != Job.RUNNING or job.attempt != attempt:
            return  # ended meanwhile (cancelled through another replica)
        command = attempt_command(job.spec, job_dir)
        env = self._environment(job, job_dir, attempt)
        try:
            header = f"--- weir: attempt {attempt} of job {job_id}: {' '.join(command)}\n"
            log_file = open_inside(job_dir, "job.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            with os.fdopen(log_file, "w") as handle:
                handle.write(header)
            handle_id = self._executor.launch(job_id, job_dir, attempt, command, env)
        except OSError as error:
            self._finish(job_id, Job.FAILED, -1, f"could not start: {error}")
            return
        job = self._store.update_job(job_id, lambda stored: None, pid=handle_id)
        self._attempts[job_id] = Attempt(handle_id, attempt, self._deadline(job), job.parent_id)
        log.info(
            "training job launched",
            extra={"job": job_id, "attempt": attempt, "pid": handle_id, "token": self.lease.token if self.lease else 0},
        )

    def _environment(self, job: Job, job_dir: Path, attempt: int) -> dict[str, str]:
        """An allow-list, never the control plane's environment (its tokens, credentials, database
        URL): what finds programs and libraries, locale, device selection, and the job's own
        variables."""
        env = {name: value for name, value in os.environ.items() if name in INHERITED or name.startswith("LC_")}
        code_dir = job_dir / "code"
        paths = [str(code_dir)] if code_dir.is_dir() else []
        env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH", "")])])
        env.setdefault("OMP_NUM_THREADS", "1")  # several processes per node must not oversubscribe the cores
        env["PYTHONUNBUFFERED"] = "1"  # logs reach job.log as they are written
        env["HOME"] = str(job_dir)
        if self.sandbox.isolated:
            env["USER"] = env["LOGNAME"] = self.sandbox.user
            env["TMPDIR"] = str(job_dir / "tmp")
        env.update(
            {
                "WEIR_JOB_ID": job.id,
                "WEIR_JOB_DIR": str(job_dir),
                "WEIR_JOB_ATTEMPT": str(attempt),
                "WEIR_JOB_SECRET": read_inside(job_dir, ".secret", 1024).decode().strip(),
                "WEIR_CONTROL_PLANE": self._control_target(),
                "WEIR_CHECKPOINT_EVERY": str(job.spec.checkpoint_every_epochs or 1),
                "WEIR_JOB_PARAMS": json.dumps({key: param_value(value) for key, value in job.spec.parameters.items()}),
            }
        )
        return env

    def _control_target(self) -> str:
        """The gRPC target a job reports to: every live replica (``ipv4:A,B``: gRPC's pick_first moves
        to the next when one dies), or this replica's address when they are not all IPv4 literals."""
        addresses = self.control_addresses() if self.control_addresses is not None else []
        if len(addresses) < 2:
            return self.control_address
        if all(_is_ipv4_address(address) for address in addresses):
            return "ipv4:" + ",".join(addresses)
        return self.control_address

    @staticmethod
    def _deadline(job: Job) -> float | None:
        if not job.spec.timeout_seconds:
            return None
        started = job.started_at.ToDatetime(datetime.UTC).timestamp() if job.HasField("started_at") else time.time()
        return started + job.spec.timeout_seconds

    def _finish(self, job_id: str, state: int, exit_code: int, reason: str) -> Job:
        def end(job: Job) -> None:
            job.state = state  # type: ignore[assignment]
            job.exit_code = exit_code
            job.reason = reason
            job.finished_at.FromDatetime(datetime.datetime.now(datetime.UTC))

        return self._store.update_job(job_id, end)

    def _settle_sweeps(self) -> bool:
        changed = False
        for sweep in self._store.jobs_in_states(Job.RUNNING):
            if sweep.kind != "sweep":
                continue
            trials = {trial_id: self._store.get_job(trial_id) for trial_id in sweep.trials}
            if len(trials) < len(sweep.trials) or not trials:
                continue
            if any(trial.state in (Job.QUEUED, Job.RUNNING) for trial in trials.values()):
                continue
            best = sweeps.best_trial(trials, sweep.sweep.metric, sweep.sweep.maximize)
            if best is None:
                self._finish(sweep.id, Job.FAILED, 0, f"no trial succeeded with a value for {sweep.sweep.metric}")
                changed = True
                continue
            best_id, value = best
            winner = trials[best_id]

            def record(job: Job, best_id: str = best_id, value: float = value, winner: Job = winner) -> None:
                job.best_trial = best_id
                job.best_value = value
                job.metrics.clear()
                job.metrics.update(winner.metrics)
                job.dataset_hash = winner.dataset_hash
                job.logged_params.clear()
                job.logged_params.update(winner.logged_params)

            sweep = self._store.update_job(sweep.id, record)
            register = sweep.sweep.template.register
            if register.model_name:
                registering = Job()
                registering.CopyFrom(winner)
                registering.spec.register.CopyFrom(register)
                try:
                    version = register_job_output(self._store, self._artifacts, registering, self.jobs_dir / best_id)
                except WeirError as error:
                    self._finish(sweep.id, Job.FAILED, 0, f"best trial {best_id}: registration failed: {error.message}")
                    changed = True
                    continue
                self._record_registration(sweep.id, version.model_name, version.version)
                canary = self._canary(registering, version.model_name, version.version)
            else:
                canary = ""
            outcome = f"best trial {best_id}: {sweep.sweep.metric} = {value:.6g}"
            self._finish(sweep.id, Job.SUCCEEDED, 0, f"{outcome}; {canary}" if canary else outcome)
            changed = True
        return changed

    def _merge_final_metrics(self, job: Job) -> Job:
        """A job may write its final metrics (e.g. the best epoch's, after early stopping) to
        output/metrics.json; they replace the last logged values, rank sweep trials and go to the
        registry."""
        try:
            document = json.loads(read_inside(self.jobs_dir / job.id, "output/metrics.json", 1024 * 1024))
        except (OSError, ValueError):
            return job
        final = {
            key: float(value)
            for key, value in (document.items() if isinstance(document, dict) else [])
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        return self._store.update_job(job.id, lambda stored: stored.metrics.update(final)) if final else job

    def _record_registration(self, job_id: str, model_name: str, version: int) -> None:
        reference = version_ref(model_name, version)
        self._store.update_job(job_id, lambda job: job.registered.MergeFrom(reference))

    def _canary(self, job: Job, model_name: str, version: int) -> str:
        """Hand the new version to the rollouts controller when the job asks for a canary; returns what
        went wrong ('' when it started or none was asked for). The version stays registered either way."""
        canary = job.spec.register.canary
        if not canary.endpoint or self._start_canary is None or self._loop is None:
            return ""
        actor = f"training-job:{job.id}"
        with contextlib.suppress(NotFoundError):
            if self._store.get_rollout(canary.endpoint).started_by == actor:
                return ""  # started when the job was first settled (it is settled again after a handover)
        request = type(canary)()
        request.CopyFrom(canary)
        request.model_name = model_name
        request.version = version
        future = asyncio.run_coroutine_threadsafe(self._start_canary(request, actor), self._loop)
        try:
            future.result(timeout=30)
        except Exception as error:
            message = error.message if isinstance(error, WeirError) else repr(error)
            log.warning("could not start the canary of a trained version", extra={"job": job.id, "error": message})
            return f"canary not started: {message}"
        return ""


def _is_ipv4_address(address: str) -> bool:
    host, _, port = address.rpartition(":")
    parts = host.split(".")
    return port.isdigit() and len(parts) == 4 and all(part.isdigit() and int(part) < 256 for part in parts)
