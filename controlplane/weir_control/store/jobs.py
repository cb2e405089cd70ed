"""Training job records: jobs (the run queue) and the metric points they report."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, insert, select, update

from weir_control.store.db import Database, _decode_token, _encode_token, _page_size, _utc, now
from weir_control.store.schema import TRAINING_JOBS, TRAINING_METRICS
from weir_proto.control.v1 import training_pb2
from weir_proto.errors import InvalidArgumentError, NotFoundError

TERMINAL_JOB_STATES = (training_pb2.Job.SUCCEEDED, training_pb2.Job.FAILED, training_pb2.Job.CANCELLED)


class JobRecords(Database):
    # --- training jobs ---------------------------------------------------------------------------

    def insert_job(self, job: training_pb2.Job, secret_sha256: str) -> tuple[training_pb2.Job, bool]:
        """Insert a new job; a known id returns the stored job and False (submission is idempotent)."""
        _check_job_id(job.id)
        with self._transaction() as connection:
            row = connection.execute(select(TRAINING_JOBS.c.job).where(TRAINING_JOBS.c.id == job.id)).first()
            if row is not None:
                return training_pb2.Job.FromString(row.job), False
            job.created_at.FromDatetime(now())
            connection.execute(
                insert(TRAINING_JOBS).values(
                    id=job.id,
                    kind=job.kind,
                    parent_id=job.parent_id,
                    state=training_pb2.Job.State.Name(job.state),
                    created_at=job.created_at.ToDatetime(datetime.UTC),
                    job=job.SerializeToString(),
                    secret_sha256=secret_sha256,
                    pid=0,
                )
            )
            return job, True

    def get_job(self, job_id: str) -> training_pb2.Job:
        with self._transaction() as connection:
            return self._job(connection, job_id)

    def _job(self, connection: Connection, job_id: str) -> training_pb2.Job:
        row = connection.execute(select(TRAINING_JOBS.c.job).where(TRAINING_JOBS.c.id == job_id)).first()
        if row is None:
            raise NotFoundError(f"id: no training job '{job_id}'")
        return training_pb2.Job.FromString(row.job)

    def update_job(
        self, job_id: str, change: Callable[[training_pb2.Job], None], pid: int | None = None
    ) -> training_pb2.Job:
        """Apply ``change`` to the stored job in one transaction. A job in a terminal state never
        changes again: it is returned as it is and ``change`` is not called."""
        with self._transaction() as connection:
            job = self._job(connection, job_id)
            if job.state in TERMINAL_JOB_STATES:
                return job
            change(job)
            values: dict[str, Any] = {"state": training_pb2.Job.State.Name(job.state), "job": job.SerializeToString()}
            if pid is not None:
                values["pid"] = pid
            connection.execute(update(TRAINING_JOBS).where(TRAINING_JOBS.c.id == job_id).values(**values))
            return job

    def job_process(self, job_id: str) -> tuple[int, str]:
        """(launcher pid, secret sha256) of a job."""
        with self._transaction() as connection:
            row = connection.execute(
                select(TRAINING_JOBS.c.pid, TRAINING_JOBS.c.secret_sha256).where(TRAINING_JOBS.c.id == job_id)
            ).first()
        if row is None:
            raise NotFoundError(f"id: no training job '{job_id}'")
        return int(row.pid), row.secret_sha256

    def jobs_in_states(self, *states: int) -> list[training_pb2.Job]:
        """Jobs in any of ``states``, oldest first (the run queue)."""
        names = [training_pb2.Job.State.Name(state) for state in states]
        with self._transaction() as connection:
            rows = connection.execute(
                select(TRAINING_JOBS.c.job)
                .where(TRAINING_JOBS.c.state.in_(names))
                .order_by(TRAINING_JOBS.c.created_at, TRAINING_JOBS.c.id)
            )
            return [training_pb2.Job.FromString(row.job) for row in rows]

    def list_jobs(self, request: training_pb2.ListJobsRequest) -> tuple[list[training_pb2.Job], str]:
        limit = _page_size(request.page_size)
        columns = TRAINING_JOBS.c
        query = select(columns.job, columns.created_at, columns.id).order_by(
            columns.created_at.desc(), columns.id.desc()
        )
        if request.state:
            query = query.where(columns.state == training_pb2.Job.State.Name(request.state))
        if request.kind:
            query = query.where(columns.kind == request.kind)
        if request.parent_id:
            query = query.where(columns.parent_id == request.parent_id)
        after = _decode_token(request.page_token)
        if after is not None:
            moment = datetime.datetime.fromisoformat(after[0])
            query = query.where(
                (columns.created_at < moment) | ((columns.created_at == moment) & (columns.id < after[1]))
            )
        with self._transaction() as connection:
            rows = list(connection.execute(query.limit(limit + 1)))
        jobs = [training_pb2.Job.FromString(row.job) for row in rows[:limit]]
        if len(rows) <= limit:
            return jobs, ""
        last = rows[limit - 1]
        return jobs, _encode_token([_utc(last.created_at).isoformat(), last.id])

    def append_metrics(self, job_id: str, points: Sequence[training_pb2.MetricPoint]) -> None:
        if not points:
            return
        with self._transaction() as connection:
            connection.execute(
                insert(TRAINING_METRICS),
                [
                    {
                        "job_id": job_id,
                        "key": point.key,
                        "step": point.step,
                        "value": point.value,
                        "at": point.at.ToDatetime(datetime.UTC) if point.HasField("at") else now(),
                    }
                    for point in points
                ],
            )

    def job_metrics(self, job_id: str, after_id: int = 0) -> list[tuple[int, training_pb2.MetricPoint]]:
        """Metric points of a job in the order they came, after the point ``after_id``."""
        columns = TRAINING_METRICS.c
        with self._transaction() as connection:
            rows = connection.execute(
                select(TRAINING_METRICS).where(columns.job_id == job_id, columns.id > after_id).order_by(columns.id)
            )
            result = []
            for row in rows:
                point = training_pb2.MetricPoint(key=row.key, step=row.step, value=row.value)
                point.at.FromDatetime(_utc(row.at))
                result.append((int(row.id), point))
            return result

    def step_values(self, parent_id: str, key: str, step: int) -> dict[str, float]:
        """Per trial of a sweep that reached ``step``, its value of ``key`` there."""
        jobs, metrics = TRAINING_JOBS.c, TRAINING_METRICS.c
        query = (
            select(metrics.job_id, metrics.value)
            .join(TRAINING_JOBS, jobs.id == metrics.job_id)
            .where(jobs.parent_id == parent_id, metrics.key == key, metrics.step == step)
            .order_by(metrics.id)
        )
        with self._transaction() as connection:
            latest: dict[str, float] = {}
            for row in connection.execute(query):
                latest[row.job_id] = float(row.value)  # a retried trial may report a step twice: the last counts
            return latest

    def sibling_metrics(self, parent_id: str, key: str, step: int, exclude: str) -> list[float]:
        """The value of ``key`` at ``step`` for each other trial of a sweep that reached it."""
        return [value for job_id, value in self.step_values(parent_id, key, step).items() if job_id != exclude]


def _check_job_id(value: str) -> None:
    if not value or len(value) > 128 or not all(c.isalnum() or c in "-_." for c in value) or value[0] == ".":
        raise InvalidArgumentError(
            f"id: expected 1-128 letters, digits, '-', '_' or '.' (not starting with '.'), got {value!r}"
        )
