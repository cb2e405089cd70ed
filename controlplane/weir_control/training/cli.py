"""`weir train ...` and `weir sweep ...`: training jobs on the control plane.

    weir train submit ID (--builtin mlp | --module pkg.train | --script train.py) [--code DIR]
        [--param KEY=VALUE ...] [--processes N] [--max-retries N] [--timeout S] [--checkpoint-every N]
        [--register MODEL [--alias A ...] [--canary-endpoint E [--canary-steps 10,50,100] [--canary-interval S]]]
        [--follow]
    weir train status ID [--follow]          # state, latest metrics and every step's metrics;
                                             # --follow: progress lines (state, epoch metrics) until the end
    weir train logs ID [--follow]
    weir train cancel ID
    weir train list [--state S] [--kind K] [--parent ID]
    weir sweep submit ID (same job options) --space NAME=v1,v2,... | --space NAME=range:LOW:HIGH[:log][:int]
        [--method grid|random] [--trials N] [--parallelism N] --metric M [--maximize] [--median-stopping]
    weir sweep status ID

A VALUE is typed as it reads: true/false, an integer, a number, else text. The built-in trainer's
``entities`` and ``definitions`` are files: a relative path is taken from the directory the command runs
in and sent as an absolute one (the control plane checks it at submission: inside its feature root,
readable, with the label and join-key columns). Submitting a known ID with the same spec answers that
job (and says so on stderr); with another spec it is refused (ALREADY_EXISTS, naming the job and its
state). The code directory is sent as a tar.gz and hashed by the control plane. Every command prints
JSON with --json (--follow's progress lines then go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from weir_control.cli_common import channel_of, report_error, token_of
from weir_proto.errors import InvalidArgumentError, WeirError, error_for_status

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
PATH_PARAMETERS = ("entities", "definitions")  # the built-in trainer's files: sent as absolute paths
HISTORY_STEPS = 50  # `train status` prints at most this many of the latest steps' metrics


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control-plane", default=os.environ.get("WEIR_CONTROL_PLANE", "127.0.0.1:8011"))
    parser.add_argument("--token", default=os.environ.get("WEIR_TOKEN"), help="bearer token [env WEIR_TOKEN]")
    parser.add_argument("--tls-ca", type=Path, help="CA bundle: talk TLS to the control plane")
    parser.add_argument("--json", action="store_true")


def _job_options(parser: argparse.ArgumentParser) -> None:
    entry = parser.add_mutually_exclusive_group(required=True)
    entry.add_argument("--builtin", choices=["mlp"], help="Weir's built-in trainer")
    entry.add_argument("--module", help="python -m MODULE from the code directory")
    entry.add_argument("--script", help="a script inside the code directory")
    parser.add_argument("--code", type=Path, help="the code directory (sent with the job)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--processes", type=int, default=1, help="processes per node (torchrun)")
    parser.add_argument("--max-retries", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds (0: none)")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    parser.add_argument("--register", default="", metavar="MODEL", help="register the result as a version of MODEL")
    parser.add_argument("--alias", action="append", default=[], help="with --register: set this alias")
    parser.add_argument("--canary-endpoint", default="", help="with --register: start a canary rollout there")
    parser.add_argument(
        "--canary-steps", default="", metavar="P1,P2,...,100", help="with --canary-endpoint: its weights [5,25,50,100]"
    )
    parser.add_argument(
        "--canary-interval", type=float, default=0.0, metavar="SECONDS",
        help="with --canary-endpoint: seconds between its analyses [60]",
    )  # fmt: skip


def add_commands(subcommands: Any) -> None:
    train = subcommands.add_parser("train", help="training jobs: submit, status, logs, cancel, list")
    actions = train.add_subparsers(dest="train_command", required=True)
    submit = actions.add_parser("submit", help="submit a job (a known ID with the same spec returns that job)")
    submit.add_argument("id")
    _job_options(submit)
    submit.add_argument(
        "--follow", action="store_true", help="print progress as it happens (state changes, each epoch's metrics)"
    )
    _connection(submit)
    for name, text in (
        ("status", "a job's state, metrics and lineage"),
        ("logs", "a job's log"),
        ("cancel", "end a job"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("id")
        if name in ("status", "logs"):
            action.add_argument(
                "--follow",
                action="store_true",
                help="progress lines (state changes, each epoch's metrics) until the job ends"
                if name == "status"
                else "the log as it is written, until the job ends",
            )
        _connection(action)
    listing = actions.add_parser("list", help="jobs, newest first")
    listing.add_argument("--state", default="", choices=["", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"])
    listing.add_argument("--kind", default="", choices=["", "job", "sweep", "trial"])
    listing.add_argument("--parent", default="")
    listing.add_argument("--page-size", type=int, default=50)
    _connection(listing)

    sweep = subcommands.add_parser("sweep", help="hyperparameter sweeps: submit, status")
    sweep_actions = sweep.add_subparsers(dest="sweep_command", required=True)
    sweep_submit = sweep_actions.add_parser("submit", help="a parent job with one trial per parameter set")
    sweep_submit.add_argument("id")
    _job_options(sweep_submit)
    sweep_submit.add_argument(
        "--space", action="append", required=True, metavar="NAME=V1,V2|range:LOW:HIGH[:log][:int]"
    )
    sweep_submit.add_argument("--method", choices=["grid", "random"], default="grid")
    sweep_submit.add_argument("--trials", type=int, default=0, help="random search: how many")
    sweep_submit.add_argument("--parallelism", type=int, default=2)
    sweep_submit.add_argument("--metric", required=True, help="ranks the trials (its last value)")
    sweep_submit.add_argument("--maximize", action="store_true")
    sweep_submit.add_argument("--median-stopping", action="store_true")
    sweep_submit.add_argument("--median-min-steps", type=int, default=1)
    sweep_submit.add_argument("--seed", type=int, default=0)
    sweep_submit.add_argument("--follow", action="store_true")
    _connection(sweep_submit)
    sweep_status = sweep_actions.add_parser("status", help="the sweep and its trials")
    sweep_status.add_argument("id")
    _connection(sweep_status)


def typed_value(text: str) -> Any:
    from weir_proto.control.v1 import training_pb2

    lowered = text.lower()
    if lowered in ("true", "false"):
        return training_pb2.ParamValue(flag=lowered == "true")
    try:
        return training_pb2.ParamValue(integer=int(text))
    except ValueError:
        pass
    try:
        return training_pb2.ParamValue(number=float(text))
    except ValueError:
        return training_pb2.ParamValue(text=text)


def code_archive(directory: Path) -> bytes:
    from weir_control.training.runner import archive_directory

    if not directory.is_dir():
        raise InvalidArgumentError(f"--code: expected a directory, got {directory}")
    return archive_directory(directory)


def job_spec(args: argparse.Namespace) -> Any:
    from weir_proto.control.v1 import training_pb2

    if args.builtin:
        entrypoint = f"builtin:{args.builtin}"
    elif args.module:
        entrypoint = f"module:{args.module}"
    else:
        entrypoint = f"script:{args.script}"
    spec = training_pb2.JobSpec(
        entrypoint=entrypoint,
        processes_per_node=args.processes,
        max_retries=args.max_retries,
        timeout_seconds=args.timeout,
        checkpoint_every_epochs=args.checkpoint_every,
    )
    if args.code:
        spec.code_archive = code_archive(args.code)
    for item in args.param:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise InvalidArgumentError(f"--param: expected KEY=VALUE, got {item!r}")
        if args.builtin and key in PATH_PARAMETERS and value.strip():
            # the control plane runs the job elsewhere: a relative path means one from here
            value = str(Path(value.strip()).expanduser().absolute())
        spec.parameters[key].CopyFrom(typed_value(value))
    if (args.canary_steps or args.canary_interval) and not args.canary_endpoint:
        flag = "--canary-steps" if args.canary_steps else "--canary-interval"
        raise InvalidArgumentError(f"{flag}: goes with --canary-endpoint (and --register), got no endpoint")
    if args.canary_endpoint and not args.register:
        raise InvalidArgumentError("--canary-endpoint: goes with --register MODEL (the version it starts), got none")
    if args.register:
        spec.register.model_name = args.register
        spec.register.aliases.extend(args.alias)
        if args.canary_endpoint:
            spec.register.canary.endpoint = args.canary_endpoint
            if args.canary_steps:
                try:
                    steps = [int(step) for step in args.canary_steps.split(",")]
                except ValueError:
                    raise InvalidArgumentError(
                        f"--canary-steps: expected percentages like 10,50,100, got {args.canary_steps!r}"
                    ) from None
                if any(step < 0 for step in steps):
                    raise InvalidArgumentError(f"--canary-steps: expected percentages in 1..100, got {steps}")
                spec.register.canary.steps.extend(steps)
            spec.register.canary.interval_seconds = args.canary_interval
    return spec


def parameter_space(items: list[str]) -> dict[str, Any]:
    from weir_proto.control.v1 import training_pb2

    space = {}
    for item in items:
        name, separator, text = item.partition("=")
        if not separator or not name or not text:
            raise InvalidArgumentError(f"--space: expected NAME=V1,V2 or NAME=range:LOW:HIGH, got {item!r}")
        if text.startswith("range:"):
            parts = text.split(":")
            try:
                low, high = float(parts[1]), float(parts[2])
            except (IndexError, ValueError):
                raise InvalidArgumentError(
                    f"--space {name}: expected range:LOW:HIGH[:log][:int], got {text!r}"
                ) from None
            space[name] = training_pb2.ParamSpace(
                low=low, high=high, log="log" in parts[3:], integer="int" in parts[3:]
            )
        else:
            space[name] = training_pb2.ParamSpace(values=[typed_value(value) for value in text.split(",")])
    return space


class _Client:
    def __init__(self, args: argparse.Namespace) -> None:
        from weir_proto.auth import client_metadata
        from weir_proto.control.v1 import training_pb2_grpc

        self.channel = channel_of(args)
        self.stub = training_pb2_grpc.TrainingStub(self.channel)
        self.metadata = client_metadata(token_of(args))

    def call(self, method: str, request: Any, timeout: float | None = 60) -> Any:
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise error_for_status(error.code(), error.details() or "") from error


def _document(job: Any) -> dict[str, Any]:
    return json_format.MessageToDict(job, preserving_proto_field_name=True)


def _summary(job: Any) -> str:
    from weir_proto.control.v1 import training_pb2

    state = training_pb2.Job.State.Name(job.state)
    lines = [f"{job.kind} {job.id}: {state} (attempt {job.attempt})" + (f" - {job.reason}" if job.reason else "")]
    if job.metrics:
        lines.append("metrics: " + ", ".join(f"{key}={value:.4g}" for key, value in sorted(job.metrics.items())))
    if job.registered.model_name:
        lines.append(f"registered: {job.registered.model_name} version {job.registered.version}")
    if job.best_trial:
        lines.append(f"best trial: {job.best_trial} ({job.sweep.metric} = {job.best_value:.6g})")
    return "\n".join(lines)


def _metrics_line(step: int, values: dict[str, float], progress: Any) -> str:
    where = f"epoch {progress.epoch}/{progress.total_epochs}" if progress is not None else f"step {step}"
    return f"{where}: " + " ".join(f"{key}={value:.4g}" for key, value in sorted(values.items()))


def _follow(client: _Client, job_id: str, out: Any) -> Any:
    """Progress as it happens, one line each (state changes, and every step's metrics once its epoch's
    progress arrives or the next step begins), until the job ends; returns the final job."""
    from weir_proto.control.v1 import training_pb2

    request = training_pb2.StreamMetricsRequest(id=job_id, follow=True)
    step: int | None = None
    values: dict[str, float] = {}

    def flush(progress: Any = None) -> None:
        nonlocal step
        if step is not None and values:
            print(f"{job_id}: " + _metrics_line(step, values, progress), file=out, flush=True)
        values.clear()
        step = None

    try:
        for event in client.stub.StreamMetrics(request, metadata=client.metadata):
            kind = event.WhichOneof("event")
            if kind == "metric":
                if step is not None and event.metric.step != step:
                    flush()
                step = event.metric.step
                values[event.metric.key] = event.metric.value
            elif kind == "progress":
                flush(event.progress if event.progress.total_epochs else None)
            elif kind == "state":
                flush()
                print(f"{job_id}: {training_pb2.Job.State.Name(event.state)}", file=out, flush=True)
    except grpc.RpcError as error:
        raise error_for_status(error.code(), error.details() or "") from error
    flush()
    return client.call("GetJob", training_pb2.GetJobRequest(id=job_id))


def _history(client: _Client, job_id: str) -> list[dict[str, Any]]:
    """Every reported step's metrics, oldest first: [{"step": 0, "loss": ...}, ...]."""
    from weir_proto.control.v1 import training_pb2

    steps: dict[int, dict[str, Any]] = {}
    try:
        events = client.stub.StreamMetrics(
            training_pb2.StreamMetricsRequest(id=job_id), metadata=client.metadata, timeout=60
        )
        for event in events:
            if event.WhichOneof("event") == "metric":
                steps.setdefault(event.metric.step, {"step": event.metric.step})[event.metric.key] = event.metric.value
    except grpc.RpcError as error:
        raise error_for_status(error.code(), error.details() or "") from error
    return [steps[step] for step in sorted(steps)]


def _history_lines(history: list[dict[str, Any]]) -> list[str]:
    if not history:
        return []
    keys = sorted({key for point in history for key in point if key != "step"})
    shown = history[-HISTORY_STEPS:]
    clipped = f" (the last {len(shown)} of {len(history)} steps)" if len(shown) < len(history) else ""
    lines = [f"metric history{clipped}:"]
    lines.append("  " + "\t".join(["step", *keys]))
    for point in shown:
        cells = [f"{point[key]:.4g}" if key in point else "-" for key in keys]
        lines.append("  " + "\t".join([str(point["step"]), *cells]))
    return lines


def param_value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind is None else getattr(value, kind)


def _hyperparameters(trial: Any, names: list[str]) -> str:
    shown = [f"{name}={param_value(trial.spec.parameters[name])}" for name in names if name in trial.spec.parameters]
    return ", ".join(shown)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except WeirError as error:
        return report_error(args, error)


def _run(args: argparse.Namespace) -> int:
    from weir_proto.control.v1 import training_pb2

    client = _Client(args)
    try:
        action = args.train_command if args.command == "train" else f"sweep-{args.sweep_command}"
        if action == "logs":
            request = training_pb2.StreamLogsRequest(id=args.id, follow=args.follow)
            try:
                for chunk in client.stub.StreamLogs(request, metadata=client.metadata):
                    sys.stdout.buffer.write(chunk.data)
                    sys.stdout.flush()
            except grpc.RpcError as error:
                raise error_for_status(error.code(), error.details() or "") from error
            return 0
        if action == "list":
            listing = training_pb2.ListJobsRequest(kind=args.kind, parent_id=args.parent, page_size=args.page_size)
            if args.state:
                listing.state = training_pb2.Job.State.Value(args.state)
            jobs = client.call("ListJobs", listing).jobs
            if args.json:
                print(json.dumps([_document(job) for job in jobs], indent=2))
            else:
                for job in jobs:
                    print(f"{job.id}\t{job.kind}\t{training_pb2.Job.State.Name(job.state)}\t{job.reason}")
            return 0
        existing = None
        if action in ("submit", "sweep-submit"):
            try:  # to tell the user when the answer is a job submitted before (same id, same spec)
                existing = client.call("GetJob", training_pb2.GetJobRequest(id=args.id))
            except WeirError as error:
                if error.kind.name != "NOT_FOUND":
                    raise
        if action == "submit":
            job = client.call("SubmitJob", training_pb2.SubmitJobRequest(id=args.id, spec=job_spec(args)))
        elif action == "sweep-submit":
            sweep = training_pb2.SweepSpec(
                template=job_spec(args), method=args.method, trials=args.trials, parallelism=args.parallelism,
                metric=args.metric, maximize=args.maximize, median_stopping=args.median_stopping,
                median_min_steps=args.median_min_steps, seed=args.seed,
            )  # fmt: skip
            for name, space in parameter_space(args.space).items():
                sweep.space[name].CopyFrom(space)
            job = client.call("SubmitSweep", training_pb2.SubmitSweepRequest(id=args.id, sweep=sweep))
        elif action == "cancel":
            job = client.call("CancelJob", training_pb2.GetJobRequest(id=args.id))
        else:  # status, sweep-status
            job = client.call("GetJob", training_pb2.GetJobRequest(id=args.id))
        if existing is not None:
            state = training_pb2.Job.State.Name(job.state)
            print(
                f"weir {args.command}: {job.kind} '{job.id}' already exists ({state}) with this spec: this is "
                "that job, not a new submission",
                file=sys.stderr,
            )
        if getattr(args, "follow", False) and training_pb2.Job.State.Name(job.state) not in TERMINAL:
            job = _follow(client, job.id, sys.stderr if args.json else sys.stdout)
        if action == "sweep-status" or (job.kind == "sweep" and not args.json):
            trials = [client.call("GetJob", training_pb2.GetJobRequest(id=trial_id)) for trial_id in job.trials]
        else:
            trials = []
        history = _history(client, job.id) if action == "status" and job.kind != "sweep" else []
        space = sorted(job.sweep.space) if job.kind == "sweep" else []
        if args.json:
            document = _document(job)
            if trials:
                document["trial_jobs"] = [_document(trial) for trial in trials]
                for trial_document, trial in zip(document["trial_jobs"], trials, strict=True):
                    trial_document["hyperparameters"] = {
                        name: param_value(trial.spec.parameters[name])
                        for name in space
                        if name in trial.spec.parameters
                    }
            if action == "status":
                document["metric_history"] = history
            print(json.dumps(document, indent=2))
        else:
            print(_summary(job))
            for line in _history_lines(history):
                print(line)
            for trial in trials:
                summary = _summary(trial).split("\n")
                hyperparameters = _hyperparameters(trial, space)
                if hyperparameters:
                    summary.insert(1, f"hyperparameters: {hyperparameters}")
                print("  " + "\n    ".join(summary))
        # following a job to its end makes the command's status the job's (for scripts and CI)
        failed = training_pb2.Job.State.Name(job.state) in ("FAILED", "CANCELLED")
        return 1 if getattr(args, "follow", False) and failed else 0
    finally:
        client.channel.close()
