"""The whole MLOps loop on one machine, driven by Weir's own controllers (``make loop``):

    python examples/mlops_loop.py [--out build/loop] [--bad-retrain] [--fast]

1. starts ``weir control`` (SQLite, embedded online store, local job executor) and a ``weir serve`` that
   follows it, as subprocesses on free loopback ports;
2. writes a data set with a known churn concept (``examples/loop_data.py``), applies its feature
   definitions and materializes them into the online store;
3. trains a first (linear) model with the built-in trainer and deploys it: the endpoint ``churn``
   serves by entity key; then trains the MLP, registered with lineage and the alias ``candidate``, which
   the training runner hands to a canary that the rollout controller analyses step by step and promotes;
4. sets the drift reference from the serving version's training data (its predictions) and a policy that
   retrains on critical drift, sends unshifted traffic (no alarm), then the world moves: one feature
   shifts for every customer (pushed to the feature store), the concept with it, and fresh labels reach
   the label table the training job reads;
5. the drift monitor finds the window CRITICAL and submits the retraining job (actor ``drift-monitor``),
   the runner trains and registers the new version (``training-runner``), the canary promotes it (or,
   with ``--bad-retrain``, whose retraining reads inverted labels, rolls the worse version back:
   ``rollout-controller``);
6. prints a timeline and writes one self-contained HTML report (``OUT/report.html``).

The script itself only sends traffic (tritonclient, by entity key), sends labels
(``Monitoring/RecordFeedback``, what ``weir drift feedback`` sends) and waits; every transition is made by
the control plane (``weir audit`` names who made each). Every wait is bounded and shows progress; the
planes are stopped, and unfinished training jobs cancelled, on exit, Ctrl-C and failure alike. Exit
status 0 when the retrained version was promoted (rolled back with ``--bad-retrain``) and no inference
request failed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weir_proto.auth import new_token

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loop_data
import loop_report

ENDPOINT = "churn"
MODEL = "churn"
CANDIDATE = "candidate"


class LoopError(Exception):
    """A step of the loop did not happen as it should: the message says which and what was seen."""


@dataclass
class LoopSettings:
    out: Path = Path("build/loop")
    customers: int = 2000
    window_seconds: float = 8.0  # drift windows
    min_records: int = 300  # a window with fewer sampled records is not judged
    sample_rate: float = 0.5  # the share of requests the trained versions sample for drift (default 0.1)
    quiet_windows: int = 3  # unshifted windows without an alarm before the shift
    after_windows: int = 2  # windows after the retrained version's reference
    canary_steps: tuple[int, ...] = (25, 50, 100)
    canary_interval: float = 4.0
    # failed intervals in a row that roll a canary back: 2, so that one noisy interval of a p99 over ~200
    # requests on this busy 2-core VM does not decide alone (Weir's default is 1)
    canary_failure_limit: int = 2
    cooldown: float = 900.0  # one retraining per cool-down
    epochs: int = 25
    rate: float = 250.0  # requests per second (the built-in model samples 1 in 10 for drift)
    clients: int = 2
    heartbeat: float = 1.0
    bad_retrain: bool = False  # the retraining reads inverted labels: a worse model, the canary rolls it back
    seed: int = 0
    deadline: float = 420.0  # the whole loop, seconds (a bound: it takes 2-4 minutes here)
    verbose: bool = True

    @classmethod
    def fast(cls, out: Path) -> LoopSettings:
        """A quicker setting (the end-to-end test): shorter windows and canary intervals."""
        return cls(
            out=out, customers=1500, window_seconds=6.0, min_records=250, after_windows=1, canary_steps=(50, 100),
            canary_interval=3.0, epochs=20, rate=200.0, deadline=300.0,
        )  # fmt: skip


@dataclass
class Event:
    at: float  # unix time
    actor: str
    what: str


@dataclass
class VersionInfo:
    version: int
    job: str
    lineage: dict[str, Any]
    metrics: dict[str, float]
    accuracy_before: float  # held-out customers, features and concept before the shift
    accuracy_after: float  # held-out customers after the shift
    outcome: str  # deployed, promoted, rolled back


@dataclass
class LoopResult:
    settings: LoopSettings
    started: float
    finished: float
    events: list[Event]
    versions: dict[int, VersionInfo]
    windows: list[dict[str, Any]]  # every drift window (GetDriftReport, JSON)
    reference: dict[str, Any]  # the drift reference at the end
    actions: list[dict[str, Any]]  # the drift monitor's actions
    rollouts: list[dict[str, Any]]  # each canary as it ended (GetRollout, JSON)
    audit: list[dict[str, Any]]  # the audit log, oldest first
    jobs: list[dict[str, Any]]  # every training job
    retrain_jobs: list[str]
    quiet: list[dict[str, Any]]  # the unshifted windows judged before the shift
    shift_at: float
    shifted_feature: str
    reference_after_at: float  # when the retrained version's training data became the reference (0: never)
    critical: dict[str, Any] | None  # the window whose drift retrained
    retrained: VersionInfo | None
    outcome: str  # promoted or rolled back
    requests: int
    failures: list[str]  # failed inference requests (none expected)
    variants: dict[str, int]  # responses per serving variant
    report: Path


# --- processes ---------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Child processes get SIGTERM when the loop dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Plane:
    """A ``weir`` subprocess whose stderr goes to a log file; ``wait_for_line`` reads its start line."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        self.lines: list[str] = []
        self._started = threading.Event()
        self._marker = ""
        self.record: dict[str, Any] = {}
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stderr is not None
        with self.log_path.open("w") as log:
            for line in self.process.stderr:
                log.write(line)
                log.flush()
                self.lines.append(line.rstrip("\n"))
                del self.lines[:-200]
                if self._marker and not self._started.is_set() and self._marker in line:
                    with contextlib.suppress(json.JSONDecodeError):
                        self.record = json.loads(line)
                    self._started.set()

    def wait_for_line(self, marker: str, timeout: float) -> dict[str, Any]:
        self._marker = marker
        for line in list(self.lines):  # it may have come already
            if marker in line:
                self.record = json.loads(line)
                return self.record
        deadline = time.monotonic() + timeout
        while not self._started.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.lines[-20:])
                raise LoopError(f"{self.name} did not start (log {self.log_path}):\n{tail}")
        return self.record

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _weir_command() -> list[str]:
    script = Path(sys.executable).with_name("weir")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "weir.cli"]


# --- the loop ----------------------------------------------------------------------------------------


class Loop:
    def __init__(self, settings: LoopSettings) -> None:
        self.settings = settings
        self.out = settings.out.resolve()
        self.started = time.time()
        self.events: list[Event] = []
        self.planes: list[Plane] = []
        self.admin_token = new_token()
        self.replica_token = new_token()
        self.control_address = ""
        self.data_address = ""
        self.rollouts: list[dict[str, Any]] = []
        self.versions: dict[int, VersionInfo] = {}
        self.traffic: Traffic | None = None
        self._deadline = time.monotonic() + settings.deadline

    # --- output --------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        if self.settings.verbose:
            print(f"[{time.time() - self.started:6.1f}s] {text}", flush=True)

    def note(self, actor: str, what: str, at: float | None = None) -> None:
        """Progress; the loop's own steps also go to the timeline (the others come from the audit log
        and the drift report, where Weir recorded them)."""
        if actor == "loop":
            self.events.append(Event(time.time() if at is None else at, actor, what))
        self.say(f"{actor}: {what}")

    def note_window(self, window: Any) -> None:
        self.note(
            "drift-monitor",
            f"window {_clock(window.start)}: {window.records} records, {_severity(window.severity)}",
            at=window.end.ToNanoseconds() / 1e9,
        )

    def wait(self, what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
        """Poll ``check`` until it returns something true; progress every 5 s; bounded by ``timeout``
        and by the loop's own deadline."""
        started = time.monotonic()
        limit = min(started + timeout, self._deadline)
        shown = started
        while True:
            value = check()
            if value:
                return value
            now = time.monotonic()
            if now > limit:
                raise LoopError(f"timed out after {now - started:.0f} s waiting for {what}")
            if now - shown >= 5.0:
                shown = now
                self.say(f"  ... waiting for {what} ({now - started:.0f} s)")
            time.sleep(every)

    # --- the planes ----------------------------------------------------------------------------

    def start_planes(self) -> None:
        state = self.out / "state"
        shutil.rmtree(state, ignore_errors=True)
        (state / "repository").mkdir(parents=True)
        env = {key: value for key, value in os.environ.items() if key not in ("WEIR_TOKEN", "WEIR_TOKENS")}
        control_env = {**env, "WEIR_TOKENS": f"user:admin:{self.admin_token},data-plane:replica:{self.replica_token}"}
        control = Plane(
            "weir control",
            [*_weir_command(), "control", "--state-dir", str(state / "control"), "--listen-address", "127.0.0.1",
             "--port", "0", "--metrics-port", "-1", "--online-store", str(state / "online.db"),
             "--feature-root", str(self.out / "data"), "--log-format", "json"],
            state / "control.log", control_env,
        )  # fmt: skip
        self.planes.append(control)
        record = control.wait_for_line('"control plane started"', 90)
        self.control_address = f"127.0.0.1:{record['port']}"
        serve = Plane(
            "weir serve",
            [*_weir_command(), "serve", "--model-repository", str(state / "repository"), "--listen-address",
             "127.0.0.1", "--grpc-port", "0", "--metrics-port", "-1", "--model-control-mode", "explicit",
             "--control-plane", self.control_address, "--replica-id", "loop-replica",
             "--heartbeat-seconds", str(self.settings.heartbeat), "--log-format", "json"],
            state / "serve.log", {**env, "WEIR_CONTROL_PLANE_TOKEN": self.replica_token},
        )  # fmt: skip
        self.planes.append(serve)
        record = serve.wait_for_line('"server started"', 90)
        self.data_address = f"127.0.0.1:{record['grpc_port']}"
        self.say(f"control plane {self.control_address}, data plane {self.data_address} (logs: {state})")

    def stop_planes(self) -> None:
        """Cancel the loop's unfinished training jobs (a job outlives its control plane by design: a
        restarted one re-attaches it), then stop the data plane and the control plane."""
        if self.planes and self.planes[0].process.poll() is None and self.control_address:
            with contextlib.suppress(Exception):
                self.cancel_jobs()
        for plane in reversed(self.planes):
            plane.stop()
        self.planes.clear()

    def cancel_jobs(self) -> None:
        from weir_proto.control.v1 import training_pb2

        Job = training_pb2.Job
        running = (Job.QUEUED, Job.RUNNING)
        jobs = self.rpc("Training", "ListJobs", training_pb2.ListJobsRequest(), timeout=10).jobs
        for job in jobs:
            if job.state in running:
                self.say(f"cancelling training job {job.id}")
                self.rpc("Training", "CancelJob", training_pb2.GetJobRequest(id=job.id), timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
            job.state in running
            for job in self.rpc("Training", "ListJobs", training_pb2.ListJobsRequest(), timeout=10).jobs
        ):
            time.sleep(0.5)

    # --- Weir's interfaces ---------------------------------------------------------------------

    def weir(self, *args: str, check: bool = True) -> Any:
        """The `weir` CLI, as a user runs it; returns its JSON."""
        env = {**os.environ, "WEIR_CONTROL_PLANE": self.control_address, "WEIR_TOKEN": self.admin_token}
        result = subprocess.run(
            [*_weir_command(), *args, "--json"], capture_output=True, text=True, timeout=120, env=env, cwd=self.out
        )
        if check and result.returncode != 0:
            raise LoopError(f"weir {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        text = result.stdout.strip()
        try:
            return json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {"text": text}

    def rpc(self, service: str, method: str, request: Any, timeout: float = 30) -> Any:
        import grpc

        from weir_proto.auth import client_metadata
        from weir_proto.control.v1 import monitoring_pb2_grpc, rollouts_pb2_grpc, training_pb2_grpc

        stubs = {
            "Training": training_pb2_grpc.TrainingStub,
            "Monitoring": monitoring_pb2_grpc.MonitoringStub,
            "Rollouts": rollouts_pb2_grpc.RolloutsStub,
        }
        with grpc.insecure_channel(self.control_address) as channel:
            try:
                return getattr(stubs[service](channel), method)(
                    request, metadata=client_metadata(self.admin_token), timeout=timeout
                )
            except grpc.RpcError as error:
                raise LoopError(f"{service}/{method}: {error.code().name}: {error.details()}") from None

    def job(self, job_id: str) -> Any:
        from weir_proto.control.v1 import training_pb2

        return self.rpc("Training", "GetJob", training_pb2.GetJobRequest(id=job_id))

    def rollout(self) -> Any:
        from weir_proto.control.v1 import rollouts_pb2

        return self.rpc("Rollouts", "GetRollout", rollouts_pb2.GetRolloutRequest(endpoint=ENDPOINT))

    def drift_report(self) -> Any:
        from weir_proto.control.v1 import monitoring_pb2

        return self.rpc("Monitoring", "GetDriftReport", monitoring_pb2.GetDriftReportRequest(endpoint=ENDPOINT))

    def builtin_spec(self, entities: Path, canary: bool, **parameters: Any) -> Any:
        from weir_proto.control.v1 import rollouts_pb2, training_pb2

        spec = training_pb2.JobSpec(entrypoint="builtin:mlp")
        values = {
            "entities": str(entities), "feature_service": loop_data.SERVICE, "label": loop_data.LABEL,
            "epochs": self.settings.epochs, "patience": 5, "seed": self.settings.seed,
            "monitoring_sample_rate": self.settings.sample_rate, **parameters,
        }  # fmt: skip
        for key, value in values.items():
            if isinstance(value, bool):
                spec.parameters[key].flag = value
            elif isinstance(value, int):
                spec.parameters[key].integer = value
            elif isinstance(value, float):
                spec.parameters[key].number = value
            else:
                spec.parameters[key].text = str(value)
        spec.register.model_name = MODEL
        spec.register.aliases.append(CANDIDATE)
        if canary:
            spec.register.canary.CopyFrom(
                rollouts_pb2.StartRolloutRequest(
                    endpoint=ENDPOINT, steps=list(self.settings.canary_steps),
                    interval_seconds=self.settings.canary_interval,
                )
            )  # fmt: skip
            spec.register.canary.thresholds.failure_limit = self.settings.canary_failure_limit
        return spec

    def follow_job(self, job_id: str, timeout: float = 150) -> Any:
        from weir_proto.control.v1 import training_pb2

        Job = training_pb2.Job
        shown: list[str] = []

        def finished() -> Any:
            job = self.job(job_id)
            line = Job.State.Name(job.state)
            if job.progress.total_epochs:
                line += f" epoch {job.progress.epoch}/{job.progress.total_epochs}"
            if "val_accuracy" in job.metrics:
                line += f" val_accuracy {job.metrics['val_accuracy']:.3f}"
            if not shown or shown[-1] != line:
                shown.append(line)
                self.say(f"  job {job_id}: {line}")
            return job if job.state in (Job.SUCCEEDED, Job.FAILED, Job.CANCELLED) else None

        job = self.wait(f"training job {job_id}", finished, timeout, every=1.0)
        if job.state != Job.SUCCEEDED:
            raise LoopError(f"training job {job_id} ended {Job.State.Name(job.state)}: {job.reason}")
        return job

    def follow_canary(self, version: int, timeout: float = 120) -> str:
        """Wait until the rollout controller ends the canary of ``version``; returns promoted or rolled back."""
        from google.protobuf import json_format

        from weir_proto.control.v1 import rollouts_pb2

        Rollout = rollouts_pb2.Rollout
        seen = [0]

        def ended() -> Any:
            try:
                rollout = self.rollout()
            except LoopError:
                return None
            canary = next((v for v in rollout.variants if v.name == rollout.canary_variant), None)
            if canary is not None and canary.version not in (0, version):
                return None  # an earlier rollout still
            for analysis in rollout.analyses[seen[0] :]:
                figures = json_format.MessageToDict(analysis, preserving_proto_field_name=True)
                figures.update(self.labelled_accuracy(rollout, analysis))
                extra = loop_report.accuracy_figures(figures)
                self.say(
                    f"  canary step {analysis.step} ({analysis.canary_weight}%): {analysis.verdict}, "
                    f"{analysis.canary_requests} canary / {analysis.baseline_requests} baseline requests"
                    f"; accuracy {extra}; {analysis.reason}"
                )
            seen[0] = len(rollout.analyses)
            return rollout if rollout.state in (Rollout.SUCCEEDED, Rollout.ROLLED_BACK, Rollout.SUPERSEDED) else None

        rollout = self.wait(f"the canary of version {version}", ended, timeout)
        record = json_format.MessageToDict(rollout, preserving_proto_field_name=True)
        record["version"] = version
        for analysis, figures in zip(rollout.analyses, record.get("analyses", []), strict=True):
            figures.update(self.labelled_accuracy(rollout, analysis))
        self.rollouts.append(record)
        outcome = {Rollout.SUCCEEDED: "promoted", Rollout.ROLLED_BACK: "rolled back"}.get(rollout.state, "superseded")
        self.note("rollout-controller", f"canary of version {version} {outcome}: {rollout.reason}")
        return outcome

    def labelled_accuracy(self, rollout: Any, analysis: Any) -> dict[str, float]:
        """The accuracy of the canary's and the baseline's answers over the analysis's interval, as the labels
        show it (the client's view; Weir's analysis judges errors and latency)."""
        if self.traffic is None:
            return {}
        end = analysis.at.ToNanoseconds() / 1e9
        figures = self.traffic.accuracy(end - rollout.interval_seconds, end)
        result = {}
        for role, name in (("canary", rollout.canary_variant), ("baseline", rollout.baseline_variant)):
            correct, total = figures.get(name, (0, 0))
            if total:
                result[f"labelled_{role}_accuracy"] = correct / total
        return result

    def version_of(self, job: Any) -> int:
        return int(job.registered.version)

    def describe(self, version: int) -> dict[str, Any]:
        shown: dict[str, Any] = self.weir("models", "show", MODEL, str(version))
        return shown

    def accuracy(self, version: int, data: loop_data.LoopData) -> tuple[float, float]:
        """The version's accuracy on the held-out customers, before and after the shift (its own
        artifact, downloaded from the registry)."""
        import torch

        target = self.out / "versions" / f"{version}" / "model.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.weir("models", "download", MODEL, str(version), "--out", str(target))
        model = torch.jit.load(str(target))
        held_out = ~data.training
        scores = []
        for when in ("before", "after"):
            with torch.no_grad():
                predicted = model(torch.from_numpy(data.matrix(when, held_out))).argmax(dim=1).numpy()
            scores.append(float((predicted == data.labels(when, held_out)).mean()))
        return scores[0], scores[1]

    def record_version(self, job: Any, data: loop_data.LoopData, outcome: str) -> VersionInfo:
        version = self.version_of(job)
        shown = self.describe(version)
        before, after = self.accuracy(version, data)
        info = VersionInfo(
            version=version, job=job.id, lineage=shown.get("lineage", {}),
            metrics={key: float(value) for key, value in shown.get("metrics", {}).items()},
            accuracy_before=before, accuracy_after=after, outcome=outcome,
        )  # fmt: skip
        self.versions[version] = info
        self.say(f"  version {version}: held-out accuracy {before:.3f} before the shift, {after:.3f} after")
        return info

    # --- the scenario --------------------------------------------------------------------------

    def run(self) -> LoopResult:
        from weir_proto.control.v1 import monitoring_pb2, training_pb2

        settings = self.settings
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"the MLOps loop in {self.out}")
        self.start_planes()

        data = loop_data.build(self.out / "data", settings.customers, seed=settings.seed)
        self.note("loop", f"data set: {settings.customers} customers, {int(data.training.sum())} labelled for training")
        applied = self.weir("features", "apply", str(data.definitions))
        self.note("user", f"features applied: services {applied.get('feature_services')}")
        self.weir("features", "materialize", "2024-01-01T00:00", "2024-03-01T00:00", "--view", loop_data.VIEW)
        self.note("user", f"features of {loop_data.VIEW} materialized into the online store")
        self.weir(
            "drift", "policy", ENDPOINT, "--window-seconds", str(settings.window_seconds),
            "--min-records", str(settings.min_records), "--cooldown", str(settings.cooldown),
        )  # fmt: skip

        # the first model: linear, deployed by hand (there is nothing to canary against yet)
        baseline_id = "loop-linear"
        self.weir(
            "train", "submit", baseline_id, "--builtin", "mlp", "--param", f"entities={data.entities}",
            "--param", f"feature_service={loop_data.SERVICE}", "--param", f"label={loop_data.LABEL}",
            "--param", "hidden=", "--param", "epochs=3", "--param", f"monitoring_sample_rate={settings.sample_rate}",
            "--register", MODEL, "--alias", "baseline",
        )  # fmt: skip
        self.note("user", f"training job {baseline_id} submitted (built-in, linear)")
        job = self.follow_job(baseline_id)
        version = self.version_of(job)
        self.note("training-runner", f"version {version} registered from job {baseline_id}")
        self.weir("deploy", ENDPOINT, MODEL, str(version))
        self.note("user", f"endpoint {ENDPOINT} deployed: {MODEL} version {version}")
        traffic = self.traffic = Traffic(self, data)
        self.wait("the endpoint to serve by entity key", traffic.probe, 60)
        self.record_version(job, data, "deployed")
        traffic.start()
        try:
            return self._loop(data, traffic, monitoring_pb2, training_pb2)
        except LoopError:
            self.dump_state()
            raise
        finally:
            traffic.stop()

    def dump_state(self) -> None:
        """What the control plane saw, for a failed run (OUT/failure.json)."""
        from google.protobuf import json_format

        with contextlib.suppress(Exception):
            state = {
                "drift": json_format.MessageToDict(self.drift_report(), preserving_proto_field_name=True),
                "rollouts": self.rollouts,
                "events": [vars(event) for event in self.events],
            }
            (self.out / "failure.json").write_text(json.dumps(state, indent=1, default=str))
            self.say(f"state at the failure: {self.out / 'failure.json'}")

    def _loop(self, data: loop_data.LoopData, traffic: Traffic, monitoring_pb2: Any, training_pb2: Any) -> LoopResult:
        settings = self.settings
        # the MLP: registered with lineage and an alias, handed to a canary by the training runner
        mlp_id = "loop-mlp"
        if settings.canary_failure_limit != 1:  # thresholds: only through Training/SubmitJob's register.canary
            self.rpc("Training", "SubmitJob", training_pb2.SubmitJobRequest(
                id=mlp_id, spec=self.builtin_spec(data.entities, canary=True, hidden="32,16")
            ))  # fmt: skip
        else:
            self.weir(
                "train", "submit", mlp_id, "--builtin", "mlp", "--param", f"entities={data.entities}",
                "--param", f"feature_service={loop_data.SERVICE}", "--param", f"label={loop_data.LABEL}",
                "--param", "hidden=32,16", "--param", f"epochs={settings.epochs}", "--param", "patience=5",
                "--param", f"seed={settings.seed}", "--param", f"monitoring_sample_rate={settings.sample_rate}",
                "--register", MODEL, "--alias", CANDIDATE, "--canary-endpoint", ENDPOINT,
                "--canary-steps", ",".join(str(step) for step in settings.canary_steps),
                "--canary-interval", str(settings.canary_interval),
            )  # fmt: skip
        self.note("user", f"training job {mlp_id} submitted (built-in MLP, canary on {ENDPOINT})")
        job = self.follow_job(mlp_id)
        version = self.version_of(job)
        self.note(
            "training-runner", f"version {version} registered from job {mlp_id} (alias {CANDIDATE}), canary started"
        )
        outcome = self.follow_canary(version)
        self.record_version(job, data, outcome)
        if outcome != "promoted":
            raise LoopError(f"the canary of the first MLP was {outcome}: {self.rollouts[-1].get('reason')}")

        # drift: the reference is the serving version's training data (its predictions), then a policy that retrains
        summary = self.weir("drift", "reference", ENDPOINT, "--serving-lineage")
        self.note("user", f"drift reference: {summary.get('source')} ({summary.get('rows')} rows)")
        policy = monitoring_pb2.MonitoringPolicy(
            endpoint=ENDPOINT, window_seconds=settings.window_seconds, min_records=settings.min_records,
            retrain=True, cooldown_seconds=settings.cooldown,
        )  # fmt: skip
        if settings.bad_retrain:
            # a retraining spec of the policy's own that is worse: it reads a label table whose labels a
            # broken pipeline inverted (it serves fine; its answers are wrong, and the labels say so)
            policy.retrain_spec.CopyFrom(self.builtin_spec(data.inverted, canary=True))
            self.rpc("Monitoring", "SetMonitoringPolicy", policy)
        else:
            self.weir(
                "drift", "policy", ENDPOINT, "--window-seconds", str(settings.window_seconds),
                "--min-records", str(settings.min_records), "--retrain", "--cooldown", str(settings.cooldown),
            )  # fmt: skip
        policy_at = time.time()
        self.note(
            "user",
            f"drift policy: {settings.window_seconds:g} s windows, retrain on CRITICAL, "
            f"cool-down {settings.cooldown:g} s",
        )

        def judged_windows(what: str, since: float, count: int) -> list[Any]:
            """The first ``count`` windows judged (with features) that start at ``since`` or later, each
            noted on the timeline."""

            def judged() -> list[Any] | None:
                found = [
                    window for window in self.drift_report().windows
                    if window.start.ToNanoseconds() / 1e9 >= since - 1e-6 and window.features
                ]  # fmt: skip
                return found if len(found) >= count else None

            windows = self.wait(what, judged, count * settings.window_seconds + 40)
            for window in windows:
                self.note_window(window)
            return windows

        quiet = judged_windows(
            f"{settings.quiet_windows} judged windows of unshifted traffic", policy_at, settings.quiet_windows
        )
        alarms = [_describe(w) for w in quiet if w.severity == monitoring_pb2.CRITICAL]
        alarms += [f"{action.kind} for window {_clock(action.window.start)} on {', '.join(action.features)}"
                   for action in self.drift_report().actions]  # fmt: skip
        if alarms:
            raise LoopError("unshifted traffic raised an alarm: " + "; ".join(alarms))

        # the world moves: fresh labels for the training job's label table, then the shifted features
        data.write_labels("after")
        self.weir("features", "push", "--view", loop_data.VIEW, "--rows", str(data.shifted_rows))
        traffic.shifted = True
        shift_at = time.time()
        self.note("loop", f"shift: {loop_data.SHIFTED_FEATURE} +{loop_data.SHIFT_DAYS:g} for every customer (pushed), "
                          "the concept moved, fresh labels in the label table")  # fmt: skip

        def retraining() -> Any:
            report = self.drift_report()
            return report if any(action.kind == "retrain" for action in report.actions) else None

        report = self.wait("the drift monitor to find the shift CRITICAL and retrain", retraining, 60)
        action = next(action for action in report.actions if action.kind == "retrain")
        critical = next(
            (
                window
                for window in report.windows
                if window.severity == monitoring_pb2.CRITICAL and window.end.ToNanoseconds() / 1e9 > shift_at
            ),
            None,
        )
        if critical is not None:
            names = [feature.name for feature in critical.features if feature.severity == monitoring_pb2.CRITICAL]
            self.note("drift-monitor", f"window {_clock(critical.start)} CRITICAL: {', '.join(names)}",
                      at=critical.end.ToNanoseconds() / 1e9)  # fmt: skip
        retrain_id = action.job_id or action.detail
        self.note("drift-monitor", f"retraining job {retrain_id} submitted", at=action.at.ToNanoseconds() / 1e9)
        job = self.follow_job(retrain_id, timeout=180)
        version = self.version_of(job)
        self.note("training-runner", f"version {version} registered from job {retrain_id}, canary started")
        outcome = self.follow_canary(version)
        retrained = self.record_version(job, data, outcome)

        self.reference_after_at = 0.0
        if outcome == "promoted":
            # a reference taken from the serving lineage follows the serving version: the drift monitor
            # profiles the new version's training data once it serves
            def followed() -> Any:
                reference = self.drift_report().reference
                return reference if f"version {version} " in reference.source + " " else None

            reference = self.wait(f"the drift reference to follow version {version}", followed, 30)
            reference_at = self.reference_after_at = reference.set_at.ToNanoseconds() / 1e9
            self.note("drift-monitor", f"drift reference: {reference.source}")
            judged_windows(
                f"{settings.after_windows} windows against the new reference", reference_at, settings.after_windows
            )
        else:
            time.sleep(settings.window_seconds)
        traffic.stop()
        return self._result(data, traffic, quiet, shift_at, critical, retrained, outcome)

    def _result(
        self, data: loop_data.LoopData, traffic: Traffic, quiet: list[Any], shift_at: float, critical: Any,
        retrained: VersionInfo, outcome: str,
    ) -> LoopResult:  # fmt: skip
        from google.protobuf import json_format

        def as_dict(message: Any) -> dict[str, Any]:
            return json_format.MessageToDict(message, preserving_proto_field_name=True)

        report = self.drift_report()
        audit = self.weir("audit", "--limit", "1000")
        events = audit if isinstance(audit, list) else audit.get("events", [])
        events = sorted(events, key=lambda event: event.get("at", ""))
        jobs = self.weir("train", "list")
        jobs_list = jobs if isinstance(jobs, list) else jobs.get("jobs", [])
        retrain_jobs = [job["id"] for job in jobs_list if str(job.get("id", "")).startswith(f"retrain-{ENDPOINT}-")]
        result = LoopResult(
            settings=self.settings, started=self.started, finished=time.time(),
            events=timeline(self.events, events, report.windows),
            versions=dict(sorted(self.versions.items())), windows=[as_dict(w) for w in report.windows],
            reference=as_dict(report.reference),
            actions=[as_dict(a) for a in report.actions], rollouts=self.rollouts, audit=events, jobs=jobs_list,
            retrain_jobs=retrain_jobs, quiet=[as_dict(w) for w in quiet], shift_at=shift_at,
            shifted_feature=loop_data.SHIFTED_FEATURE, reference_after_at=self.reference_after_at,
            critical=as_dict(critical) if critical is not None else None, retrained=retrained, outcome=outcome,
            requests=traffic.sent, failures=list(traffic.failures), variants=dict(traffic.variants),
            report=self.out / "report.html",
        )  # fmt: skip
        loop_report.write(result, result.report)
        return result


def timeline(notes: list[Event], audit: list[dict[str, Any]], windows: Any) -> list[Event]:
    """The loop's own steps, every audited call (who made it: the loop's token, or one of Weir's
    controllers) but the labels, and every judged drift window, in time order."""
    from weir_proto.control.v1 import monitoring_pb2

    events = list(notes)
    for record in audit:
        if record.get("action") == "Monitoring/RecordFeedback":
            continue
        what = f"{record.get('action')} {record.get('target')}"
        if record.get("detail"):
            what += f": {record['detail']}"
        if record.get("outcome", "ok") != "ok":
            what += f" ({record.get('outcome')}: {record.get('result')})"
        events.append(Event(_stamp_seconds(record.get("at", "")), str(record.get("actor")), what))
    for window in windows:
        if not window.features:
            continue
        critical = [feature.name for feature in window.features if feature.severity == monitoring_pb2.CRITICAL]
        what = f"window {_clock(window.start)}: {window.records} records, {_severity(window.severity)}"
        if critical:
            what += f" on {', '.join(critical)}"
        events.append(Event(window.end.ToNanoseconds() / 1e9, "drift-monitor", what))
    return sorted(events, key=lambda event: event.at)


def _stamp_seconds(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else 0.0


def _describe(window: Any) -> str:
    """A window's severity and its features that are not NONE, with their scores."""
    parts = [
        f"{feature.name} {_severity(feature.severity)} psi={feature.psi:.3f} ({'; '.join(feature.reasons)})"
        for feature in window.features
        if _severity(feature.severity) not in ("NONE", "SEVERITY_UNSPECIFIED")
    ]
    return f"window {_clock(window.start)} ({window.records} records) {_severity(window.severity)}: {', '.join(parts)}"


def _severity(value: int) -> str:
    from weir_proto.control.v1 import monitoring_pb2

    return str(monitoring_pb2.Severity.Name(value))


def _clock(stamp: Any) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(stamp.ToNanoseconds() / 1e9))


class Traffic:
    """Closed-loop clients at a bounded rate, by entity key through tritonclient's typed path; labels
    (the customers' true churn under the concept of the moment) go to ``weir drift feedback``."""

    def __init__(self, loop: Loop, data: loop_data.LoopData) -> None:
        self.loop = loop
        self.data = data
        self.shifted = False
        self.sent = 0
        self.failures: list[str] = []
        self.variants: dict[str, int] = {}
        self._labels: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_probe = ""
        self.answers: list[tuple[float, str, bool]] = []  # (when, variant, right) of every answer

    def accuracy(self, start: float, end: float) -> dict[str, tuple[int, int]]:
        """Per variant, (right, answered) among the answers between ``start`` and ``end``: what the labels
        say of each variant (the client knows the truth and which variant answered)."""
        figures: dict[str, tuple[int, int]] = {}
        with self._lock:
            answers = list(self.answers)
        for when, variant, right in answers:
            if start < when <= end:
                correct, total = figures.get(variant, (0, 0))
                figures[variant] = (correct + int(right), total + 1)
        return figures

    def _infer(self, client: Any, customer: int, request_id: str) -> Any:
        return client.infer(
            ENDPOINT, [], parameters={"entity_key": str(customer)}, request_id=request_id, client_timeout=30
        )

    def probe(self) -> bool:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        with grpcclient.InferenceServerClient(self.loop.data_address) as client:
            try:
                self._infer(client, int(self.data.customers[0]), "probe")
            except InferenceServerException as error:
                if error.message() != self._last_probe:
                    self._last_probe = str(error.message())
                    self.loop.say(f"  ... not served yet: {error.message()}")
                return False
        return True

    def start(self) -> None:
        for number in range(self.loop.settings.clients):
            thread = threading.Thread(target=self._client, args=(number,), daemon=True)
            thread.start()
            self._threads.append(thread)
        feedback = threading.Thread(target=self._feedback, daemon=True)
        feedback.start()
        self._threads.append(feedback)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()

    def _client(self, number: int) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        settings = self.loop.settings
        interval = settings.clients / settings.rate
        customers = self.data.customers
        generator = np.random.default_rng(settings.seed + 100 + number)
        with grpcclient.InferenceServerClient(self.loop.data_address) as client:
            count = 0
            next_at = time.monotonic()
            while not self._stop.is_set():
                index = int(generator.integers(0, customers.size))
                shifted = self.shifted
                request_id = f"c{number}-{count}"
                count += 1
                try:
                    result = self._infer(client, int(customers[index]), request_id)
                except InferenceServerException as error:
                    with self._lock:
                        self.sent += 1
                        self.failures.append(f"{request_id}: {error.status()} {error.message()}")
                else:
                    variant = result.get_response().parameters["weir_variant"].string_param
                    label = int(self.data.label_after[index] if shifted else self.data.label_before[index])
                    predicted = int(np.argmax(result.as_numpy("PROBABILITIES")[0]))
                    with self._lock:
                        self.sent += 1
                        self.variants[variant] = self.variants.get(variant, 0) + 1
                        self.answers.append((time.time(), variant, predicted == label))
                        self._labels.append((request_id, label))
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_at = time.monotonic()

    def _feedback(self) -> None:
        """Labels arrive a little after their requests, in batches (Monitoring/RecordFeedback, what
        `weir drift feedback --file` sends; in-process: a CLI process every 2 s would take a good share of
        this machine's two cores)."""
        from weir_proto.control.v1 import monitoring_pb2

        while not self._stop.wait(2.0):
            with self._lock:
                batch, self._labels = self._labels, []
            if not batch:
                continue
            request = monitoring_pb2.RecordFeedbackRequest(endpoint=ENDPOINT)
            for request_id, label in batch:
                request.labels.add(request_id=request_id, number=float(label))
            try:
                self.loop.rpc("Monitoring", "RecordFeedback", request)
            except LoopError as error:
                self.loop.say(f"  feedback not recorded: {error}")


def run_loop(settings: LoopSettings) -> LoopResult:
    """Run the loop; the planes are stopped whatever happens (Ctrl-C and SIGTERM too)."""
    loop = Loop(settings)
    previous = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()

    def terminated(number: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if in_main:
        signal.signal(signal.SIGTERM, terminated)
    try:
        return loop.run()
    finally:
        loop.stop_planes()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def print_timeline(result: LoopResult) -> None:
    print("\ntimeline (seconds from the start; who made each transition):")
    for event in result.events:
        print(f"  {event.at - result.started:7.1f}  {event.actor:<18} {event.what}")
    print("\nheld-out accuracy per version (before the shift / after the shift):")
    for info in result.versions.values():
        print(
            f"  version {info.version:<3} {info.accuracy_before:.3f} / {info.accuracy_after:.3f}  "
            f"{info.outcome:<12} job {info.job}"
        )
    print(
        f"\n{result.requests} inference requests by entity key, {len(result.failures)} failed; "
        f"retraining jobs: {', '.join(result.retrain_jobs) or 'none'}; the retrained version was {result.outcome}"
    )
    print(f"report: {result.report}  ({result.finished - result.started:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/loop"), help="working directory and report")
    parser.add_argument(
        "--bad-retrain", action="store_true", help="the retraining reads inverted labels: a worse version, rolled back"
    )
    parser.add_argument("--fast", action="store_true", help="shorter windows and canary intervals")
    parser.add_argument("--customers", type=int, default=0)
    args = parser.parse_args(argv)
    settings = LoopSettings.fast(args.out) if args.fast else LoopSettings(out=args.out)
    settings.bad_retrain = args.bad_retrain
    if args.customers:
        settings.customers = args.customers
    try:
        result = run_loop(settings)
    except LoopError as error:
        print(f"mlops_loop: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlops_loop: interrupted; the planes were stopped", file=sys.stderr)
        return 130
    print_timeline(result)
    expected = "rolled back" if settings.bad_retrain else "promoted"
    if settings.bad_retrain and result.outcome == "promoted":
        figures = [analysis for rollout in result.rollouts[-1:] for analysis in rollout.get("analyses", [])]
        print(
            "mlops_loop: the canary PROMOTED the worse version: Weir's canary analysis judges errors and p99 "
            "latency, not accuracy; the labels during its canary said: "
            + "; ".join(loop_report.accuracy_figures(analysis) for analysis in figures),
            file=sys.stderr,
        )
        return 1
    if result.failures or result.outcome != expected:
        print(f"mlops_loop: error: expected the retrained version {expected} and no failed request", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
