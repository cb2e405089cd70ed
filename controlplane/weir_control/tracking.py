"""Tracking for training code: parameters, step-wise metrics, progress, checkpoints, artifacts and the
exported model, reported to the control plane over gRPC when the code runs as a Weir job, and kept in
a local directory either way (so it also works for a plain local run)::

    from weir_control import tracking

    run = tracking.init()                      # reads the job's environment; local run: ./weir-run
    run.log_params({"lr": 0.01, "hidden": "64,32"})
    state = run.load_checkpoint()              # None on a first attempt; the last saved one on a retry
    start = state["epoch"] + 1 if state else 0
    for epoch in range(start, epochs):
        ...
        run.log_metrics({"loss": loss, "val_loss": val}, step=epoch)
        run.progress(epoch=epoch + 1, total_epochs=epochs)
        if run.should_checkpoint(epoch):
            run.save_checkpoint({"epoch": epoch, "model": model.state_dict()})
    run.output_dir / "model.pt"                # export the model (and config.pbtxt) here to register it

Under torchrun only rank 0 reports and writes checkpoints; every rank can load them. Reporting never
fails the training: a control plane that cannot be reached is logged once and the run goes on (the
local files still have everything); reports it missed are kept (bounded) and sent, in order, once it
answers again, and ``close()`` gives them a last chance. ``run.stop_requested`` turns true when the
control plane asks the job to end (cancel, or a sweep's median rule).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_JOB_ID = "WEIR_JOB_ID"
ENV_JOB_DIR = "WEIR_JOB_DIR"
ENV_CONTROL_PLANE = "WEIR_CONTROL_PLANE"
ENV_JOB_SECRET = "WEIR_JOB_SECRET"
ENV_PARAMS = "WEIR_JOB_PARAMS"
ENV_CHECKPOINT_EVERY = "WEIR_CHECKPOINT_EVERY"
ENV_ATTEMPT = "WEIR_JOB_ATTEMPT"
SECRET_HEADER = "x-weir-job-secret"
KEEP_CHECKPOINTS = 3
MAX_PENDING_REPORTS = 10_000
# Reconnect quickly after a control plane restart (gRPC's default backoff grows to minutes).
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


class Run:
    def __init__(self, directory: Path, job_id: str = "", control_plane: str = "", secret: str = "") -> None:
        self.directory = directory
        self.job_id = job_id
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.attempt = int(os.environ.get(ENV_ATTEMPT, "1"))
        self.checkpoint_every = max(1, int(os.environ.get(ENV_CHECKPOINT_EVERY, "1")))
        self.parameters: dict[str, Any] = json.loads(os.environ.get(ENV_PARAMS, "{}"))
        self.stop_requested = False
        self.checkpoint_dir = directory / "checkpoints"
        self.output_dir = directory / "output"
        self.artifact_dir = directory / "artifacts"
        if self.rank == 0:
            for path in (self.checkpoint_dir, self.output_dir, self.artifact_dir):
                path.mkdir(parents=True, exist_ok=True)
        self._stub: Any = None
        self._channel: Any = None
        self._metadata = ((SECRET_HEADER, secret),)
        self._warned = False
        self._pending: collections.deque[tuple[str, Any]] = collections.deque(maxlen=MAX_PENDING_REPORTS)
        if control_plane and job_id and self.rank == 0:
            import grpc

            from weir_proto.control.v1 import training_pb2_grpc

            self._channel = grpc.insecure_channel(control_plane, options=_CHANNEL_OPTIONS)
            self._stub = training_pb2_grpc.TrainingStub(self._channel)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- reporting -------------------------------------------------------------------------------

    def _send(self, method: str, request: Any) -> None:
        if self._stub is None:
            return
        self._pending.append((method, request))
        self._flush(timeout=5, wait_for_ready=False)

    def _flush(self, timeout: float, wait_for_ready: bool) -> None:
        """Send the pending reports in order; stop at the first that does not go through."""
        while self._pending:
            method, request = self._pending[0]
            try:
                ack = getattr(self._stub, method)(
                    request, metadata=self._metadata, timeout=timeout, wait_for_ready=wait_for_ready
                )
            except Exception as error:  # reporting must never end the training
                if not self._warned:
                    log.warning("the control plane did not take a report; continuing, will resend: %s", error)
                    self._warned = True
                return
            self._pending.popleft()
            self.stop_requested = self.stop_requested or ack.stop

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with (self.directory / name).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_params(self, params: dict[str, Any], dataset_hash: str = "") -> None:
        if not self.is_main:
            return
        text = {key: str(value) for key, value in params.items()}
        self._append("params.jsonl", {"params": text, "dataset_hash": dataset_hash})
        from weir_proto.control.v1 import training_pb2

        self._send(
            "LogParams", training_pb2.LogParamsRequest(job_id=self.job_id, params=text, dataset_hash=dataset_hash)
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        now = time.time()
        self._append(
            "metrics.jsonl", {"step": step, "at": now, **{key: float(value) for key, value in metrics.items()}}
        )
        from weir_proto.control.v1 import training_pb2

        request = training_pb2.LogMetricsRequest(job_id=self.job_id)
        for key, value in metrics.items():
            point = request.points.add(key=key, step=step, value=float(value))
            point.at.FromNanoseconds(int(now * 1e9))
        self._send("LogMetrics", request)

    def log_metric(self, key: str, value: float, step: int) -> None:
        self.log_metrics({key: value}, step)

    def progress(self, epoch: int = 0, total_epochs: int = 0, step: int = 0, message: str = "") -> None:
        if not self.is_main:
            return
        from weir_proto.control.v1 import training_pb2

        progress = training_pb2.Progress(epoch=epoch, total_epochs=total_epochs, step=step, message=message)
        self._send("ReportProgress", training_pb2.ReportProgressRequest(job_id=self.job_id, progress=progress))

    # --- checkpoints and artifacts ---------------------------------------------------------------

    def should_checkpoint(self, epoch: int) -> bool:
        return (epoch + 1) % self.checkpoint_every == 0

    def save_checkpoint(self, state: dict[str, Any]) -> Path | None:
        """Rank 0 writes ``state`` atomically as the newest checkpoint (the last few are kept)."""
        if not self.is_main:
            return None
        import torch

        number = 1 + max((_number(path) for path in self.checkpoint_dir.glob("checkpoint-*.pt")), default=0)
        target = self.checkpoint_dir / f"checkpoint-{number:06d}.pt"
        staged = target.with_suffix(".tmp")
        torch.save(state, staged)
        with staged.open("rb") as handle:
            os.fsync(handle.fileno())
        staged.rename(target)  # a retry never sees a half-written checkpoint
        for old in sorted(self.checkpoint_dir.glob("checkpoint-*.pt"), key=_number)[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return target

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint, or None (a first attempt). Loaded with ``weights_only``: a checkpoint
        holds tensors, containers and numbers, and nothing in one is ever unpickled as code (a file in
        the checkpoint directory may come from elsewhere)."""
        checkpoints = sorted(self.checkpoint_dir.glob("checkpoint-*.pt"), key=_number)
        if not checkpoints:
            return None
        import torch

        state: dict[str, Any] = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
        return state

    def log_artifact(self, path: Path, name: str = "") -> Path | None:
        if not self.is_main:
            return None
        import shutil

        target = self.artifact_dir / (name or path.name)
        shutil.copyfile(path, target)
        return target

    def close(self) -> None:
        """Give reports still pending a last chance (a control plane restarting), then disconnect."""
        if self._channel is not None:
            if self._pending:
                self._flush(timeout=15, wait_for_ready=True)
            self._channel.close()
            self._channel = None


def _number(path: Path) -> int:
    try:
        return int(path.stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def init(directory: Path | None = None) -> Run:
    """The run of this process: a Weir job's (from its environment) or a local one in ``directory``
    (default ./weir-run)."""
    job_dir = os.environ.get(ENV_JOB_DIR)
    if job_dir:
        return Run(
            Path(job_dir),
            os.environ.get(ENV_JOB_ID, ""),
            os.environ.get(ENV_CONTROL_PLANE, ""),
            os.environ.get(ENV_JOB_SECRET, ""),
        )
    local = directory or Path("weir-run")
    local.mkdir(parents=True, exist_ok=True)
    return Run(local)
