"""The Training control service: submit (idempotent ids), get, list, cancel, logs and metrics streamed
(optionally following the job to its end), and the reporting RPCs the training code calls through
``weir_control.tracking``, authenticated by the job's own secret."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from weir_control.services import Auditor, _read, abort_with
from weir_control.store import Store
from weir_control.store.store import TERMINAL_JOB_STATES
from weir_control.tracking import SECRET_HEADER
from weir_control.training.jobfiles import read_inside
from weir_control.training.runner import JobRunner
from weir_proto.auth import Identity, Role
from weir_proto.control.v1 import training_pb2, training_pb2_grpc
from weir_proto.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError, UnauthenticatedError

Job = training_pb2.Job
LOG_CHUNK = 64 * 1024
FOLLOW_POLL_SECONDS = 0.5
REPORTING_METHODS = frozenset({"LogParams", "LogMetrics", "ReportProgress"})


class TrainingService(training_pb2_grpc.TrainingServicer):
    def __init__(self, store: Store, auditor: Auditor, runner: JobRunner) -> None:
        self._store = store
        self._auditor = auditor
        self._runner = runner

    # --- jobs ------------------------------------------------------------------------------------

    async def SubmitJob(self, request: training_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext) -> Job:
        actor = self._auditor.identity(context).name
        return await self._auditor.run(
            context, "Training/SubmitJob", f"job/{request.id}", lambda: None,
            lambda: self._runner.submit(request.id, request.spec, actor),
        )  # fmt: skip

    async def SubmitSweep(self, request: training_pb2.SubmitSweepRequest, context: grpc.aio.ServicerContext) -> Job:
        actor = self._auditor.identity(context).name
        return await self._auditor.run(
            context, "Training/SubmitSweep", f"job/{request.id}", lambda: None,
            lambda: self._runner.submit_sweep(request.id, request.sweep, actor),
        )  # fmt: skip

    async def GetJob(self, request: training_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> Job:
        return await _read(context, lambda: self._store.get_job(request.id))

    async def ListJobs(
        self, request: training_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.ListJobsResponse:
        jobs, token = await _read(context, lambda: self._store.list_jobs(request))
        return training_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(self, request: training_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> Job:
        return await self._auditor.run(
            context, "Training/CancelJob", f"job/{request.id}", lambda: self._store.get_job(request.id),
            lambda: self._runner.cancel(request.id, f"cancelled by {self._auditor.identity(context).name}"),
        )  # fmt: skip

    async def StreamLogs(
        self, request: training_pb2.StreamLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[training_pb2.LogChunk]:
        try:
            job = await asyncio.to_thread(self._store.get_job, request.id)
        except Exception as error:
            await abort_with(context, error)
        identity = self._auditor.identity(context)
        if not may_read_logs(identity, job):
            # a job's log carries whatever its code printed: its submitter's business and the admins'
            await self._auditor.refuse(context, "Training/StreamLogs", f"job/{job.id}", PermissionDeniedError(
                f"id: the log of job '{job.id}' is readable by its submitter and by admins; "
                f"'{identity.name}' ({identity.role.name.lower()}) is neither"
            ))  # fmt: skip
        try:
            if request.offset < 0:
                raise InvalidArgumentError(f"offset: expected 0 or more, got {request.offset}")
            path = self._runner.jobs_dir / job.id / "job.log"
            offset = request.offset
            while True:
                data = await asyncio.to_thread(_read_from, path, offset)
                if data:
                    yield training_pb2.LogChunk(data=data, offset=offset)
                    offset += len(data)
                    continue
                if not request.follow or job.state in TERMINAL_JOB_STATES:
                    return
                await self._wait()
                job = await asyncio.to_thread(self._store.get_job, request.id)
        except Exception as error:
            await abort_with(context, error)

    async def StreamMetrics(
        self, request: training_pb2.StreamMetricsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[training_pb2.JobEvent]:
        try:
            job = await asyncio.to_thread(self._store.get_job, request.id)
            last_id = 0
            progress = training_pb2.Progress()
            state = Job.STATE_UNSPECIFIED
            while True:
                for point_id, point in await asyncio.to_thread(self._store.job_metrics, job.id, last_id):
                    last_id = point_id
                    yield training_pb2.JobEvent(metric=point)
                if job.progress != progress:
                    progress.CopyFrom(job.progress)
                    yield training_pb2.JobEvent(progress=progress)
                if job.state != state:
                    state = job.state
                    yield training_pb2.JobEvent(state=state)
                if not request.follow or job.state in TERMINAL_JOB_STATES:
                    return
                await self._wait()
                job = await asyncio.to_thread(self._store.get_job, request.id)
        except Exception as error:
            await abort_with(context, error)

    async def _wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._runner.changed.wait(), FOLLOW_POLL_SECONDS)

    # --- reporting from the training code ---------------------------------------------------------

    async def LogParams(
        self, request: training_pb2.LogParamsRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.TrackingAck:
        def log_params() -> training_pb2.TrackingAck:
            self._authenticate(request.job_id, context)

            def change(job: Job) -> None:
                job.logged_params.update(request.params)
                if request.dataset_hash:
                    job.dataset_hash = request.dataset_hash

            return _ack(self._store.update_job(request.job_id, change))

        return await self._report(context, log_params)

    async def LogMetrics(
        self, request: training_pb2.LogMetricsRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.TrackingAck:
        def log_metrics() -> training_pb2.TrackingAck:
            self._authenticate(request.job_id, context)
            if self._store.get_job(request.job_id).state in TERMINAL_JOB_STATES:
                return training_pb2.TrackingAck(stop=True)
            points = list(request.points)
            self._store.append_metrics(request.job_id, points)

            def change(job: Job) -> None:
                for point in points:
                    job.metrics[point.key] = point.value

            job = self._store.update_job(request.job_id, change)
            stopped = self._runner.after_metrics(job, points)
            return training_pb2.TrackingAck(stop=stopped or job.state in TERMINAL_JOB_STATES)

        return await self._report(context, log_metrics)

    async def ReportProgress(
        self, request: training_pb2.ReportProgressRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.TrackingAck:
        def report() -> training_pb2.TrackingAck:
            self._authenticate(request.job_id, context)
            return _ack(self._store.update_job(request.job_id, lambda job: job.progress.CopyFrom(request.progress)))

        return await self._report(context, report)

    async def _report(self, context: grpc.aio.ServicerContext, call: object) -> training_pb2.TrackingAck:
        ack: training_pb2.TrackingAck = await _read(context, call)  # type: ignore[arg-type]
        self._runner.notify()  # followers see the report at once
        return ack

    def _authenticate(self, job_id: str, context: grpc.aio.ServicerContext) -> None:
        """The job's own secret, or UNAUTHENTICATED: the same answer for an unknown job id as for a wrong
        secret, so that reporting reveals nothing about which jobs exist."""
        secret = dict(context.invocation_metadata() or ()).get(SECRET_HEADER, "")
        try:
            _, expected = self._store.job_process(job_id)
        except NotFoundError:
            expected = ""
        given = hashlib.sha256(str(secret).encode()).hexdigest()
        if not secret or not expected or not hmac.compare_digest(given, expected):
            raise UnauthenticatedError(f"{SECRET_HEADER}: expected the secret of job {job_id[:120]!r}, got another")


def may_read_logs(identity: Identity, job: Job) -> bool:
    """A job's log is its submitter's and the admins' to read (a sweep's trials were submitted by the
    sweep's submitter)."""
    return identity.role is Role.ADMIN or (bool(job.submitted_by) and identity.name == job.submitted_by)


def _ack(job: Job) -> training_pb2.TrackingAck:
    return training_pb2.TrackingAck(stop=job.state in TERMINAL_JOB_STATES)


def _read_from(path: Path, offset: int) -> bytes:
    """The log from ``offset``, never through a link the job put in its place (it owns the directory)."""
    try:
        return read_inside(path.parent, path.name, LOG_CHUNK, offset)
    except OSError:  # not written yet, or not a regular file any more
        return b""
