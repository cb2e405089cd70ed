"""A succeeded job's exported model becomes a registry version with lineage (job id, parameters, final
metrics, dataset snapshot hash, code hash), through the same upload path as `weir models push`."""

from __future__ import annotations

import datetime
import functools
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from google.protobuf import json_format

from weir_control.artifacts import ArtifactStore
from weir_control.services import _Upload, summary
from weir_control.store import Store
from weir_control.training.jobfiles import open_inside
from weir_proto.control.v1 import audit_pb2, registry_pb2, training_pb2
from weir_proto.errors import FailedPreconditionError, NotFoundError, WeirError

ACTOR = "training-runner"
RETRAINING_ACTOR = "drift-monitor"  # weir_control.monitoring.service's audit of the jobs it submits
RETRAINING_ACTION = "Monitoring/SubmitRetraining"
CHUNK = 1 << 20
MAX_CONFIG_BYTES = 1024 * 1024
JOB_TAG = "weir.training_job"  # on the version a job registered: the job's id
READY = registry_pb2.ModelVersion.State.READY


def exported_model(job_dir: Path) -> tuple[str, str]:
    """(model file, config.pbtxt) the job wrote into its output directory, relative to ``job_dir``."""
    output_dir = job_dir / "output"
    found = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    model = next((name for name in ("model.pt", "model.pt2") if name in found), None)
    if model is None or "config.pbtxt" not in found:
        raise FailedPreconditionError(
            f"register: expected model.pt or model.pt2 and config.pbtxt in the job's output directory "
            f"({output_dir}), got {found or 'none'}"
        )
    return f"output/{model}", "output/config.pbtxt"


def _open(job_dir: Path, relative: str) -> BinaryIO:
    """A file the job wrote, opened without following links (the job owns its directory)."""
    try:
        return os.fdopen(open_inside(job_dir, relative), "rb")
    except OSError as error:
        raise FailedPreconditionError(
            f"register: expected {relative} in the job's directory to be a regular file, got {error.strerror or error}"
        ) from error


def register_job_output(
    store: Store, artifacts: ArtifactStore, job: training_pb2.Job, job_dir: Path
) -> registry_pb2.ModelVersion:
    spec = job.spec.register
    model_name, config_name = exported_model(job_dir)
    digest = hashlib.sha256()
    size = 0
    with _open(job_dir, model_name) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    with _open(job_dir, config_name) as handle:
        config_bytes = handle.read(MAX_CONFIG_BYTES + 1)
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise FailedPreconditionError(f"register: expected config.pbtxt of at most {MAX_CONFIG_BYTES} bytes, got more")
    existing = _registered_before(store, spec.model_name, job.id, digest.hexdigest())
    if existing is not None:
        # The job was settled before (a lease holder died after registering, and the next holder
        # settles it again): the version it registered stands; only what did not happen yet follows.
        return _move_aliases(store, spec.model_name, spec.aliases, existing, job)
    try:
        store.get_model(spec.model_name)
    except NotFoundError:
        store.create_model(spec.model_name, f"trained by Weir training jobs (first: {job.id})", {})
    header = registry_pb2.CreateModelVersionRequest.Header(
        model_name=spec.model_name,
        config_pbtxt=config_bytes.decode("utf-8", errors="replace"),
        artifact_filename=Path(model_name).name,
        artifact_sha256=digest.hexdigest(),
        artifact_size=size,
        description=f"trained by job {job.id}",
        tags={JOB_TAG: job.id},
        metrics={
            name: value for name, value in job.metrics.items() if math.isfinite(value)
        },  # the registry refuses NaN/inf
        lineage=registry_pb2.Lineage(
            source_job=job.id,
            parameters=dict(job.logged_params) or {key: _text(value) for key, value in job.spec.parameters.items()},
            dataset_hash=job.dataset_hash,
            code_version=job.code_hash,
            drift_trigger=drift_trigger(store, job),
        ),
    )
    upload = _Upload(store, artifacts, header)
    upload.begin()
    try:
        with _open(job_dir, model_name) as handle:  # the bytes hashed above, or the upload's check refuses them
            while chunk := handle.read(CHUNK):
                upload.write(chunk)
        version = upload.commit()
    except BaseException:
        if not upload.finished:
            upload.fail("registration from a training job did not complete")
        raise
    _audit(store, "Training/RegisterModelVersion", f"model/{spec.model_name}/version/{version.version}", job, version)
    return _move_aliases(store, spec.model_name, spec.aliases, version, job)


def _registered_before(store: Store, model_name: str, job_id: str, sha256: str) -> registry_pb2.ModelVersion | None:
    """The READY version this job's output was registered as already, if any."""
    try:
        versions, _ = store.search_versions(model_name, READY, {JOB_TAG: job_id}, 100, "")
    except WeirError:
        return None
    return next((version for version in versions if version.artifact_sha256 == sha256), None)


def _move_aliases(
    store: Store, model_name: str, aliases: Sequence[str], version: registry_pb2.ModelVersion, job: training_pb2.Job
) -> registry_pb2.ModelVersion:
    for alias in aliases:  # each move in the audit log, like a Registry/SetAlias call
        version = store.atomically(functools.partial(_move_alias, store, model_name, alias, version, job))
    return version


def _move_alias(
    store: Store,
    model_name: str,
    alias: str,
    version: registry_pb2.ModelVersion,
    job: training_pb2.Job,
    _connection: object,
) -> registry_pb2.ModelVersion:
    """One unit of work: the move, the desired-state revision bump that redeploys the endpoints
    following the alias (the store's), and the audit event."""
    try:
        before: registry_pb2.ModelVersion | None = store.get_version_by_alias(model_name, alias)
    except NotFoundError:
        before = None
    if before is not None and before.version == version.version:
        return before  # moved already (the job is settled again after a handover)
    moved = store.set_alias(model_name, alias, version.version)
    _audit(store, "Registry/SetAlias", f"model/{model_name}/alias/{alias}", job, moved, before)
    return moved


def _audit(
    store: Store,
    action: str,
    target: str,
    job: training_pb2.Job,
    after: registry_pb2.ModelVersion,
    before: registry_pb2.ModelVersion | None = None,
) -> None:
    event = audit_pb2.AuditEvent(
        actor=ACTOR, role="system", action=action, target=target, before=summary(before), after=summary(after),
        result="OK", outcome="ok", detail=f"job {job.id}",
    )  # fmt: skip
    event.at.FromDatetime(datetime.datetime.now(datetime.UTC))
    store.append_audit(event)


def drift_trigger(store: Store, job: training_pb2.Job) -> registry_pb2.Lineage.DriftTrigger | None:
    """The drift window that made the drift monitor submit ``job``, from the audit event of its
    submission (weir_control.monitoring.service); None for any other job. A trial's (a sweep's) is its
    sweep's."""
    job_id = job.parent_id or job.id
    if job.submitted_by != RETRAINING_ACTOR:
        return None
    request = audit_pb2.ListAuditEventsRequest(
        actor=RETRAINING_ACTOR, action=RETRAINING_ACTION, target_prefix=f"job/{job_id}", outcome="ok", page_size=20
    )
    events, _ = store.list_audit(request)
    for event in events:  # newest first; the prefix also finds longer ids
        if event.target == f"job/{job_id}" and event.after:
            trigger = registry_pb2.Lineage.DriftTrigger()
            try:
                json_format.Parse(event.after, trigger, ignore_unknown_fields=True)
            except json_format.ParseError:
                return None
            return trigger
    return None


def _text(value: training_pb2.ParamValue) -> str:
    kind = value.WhichOneof("kind")
    return "" if kind is None else str(getattr(value, kind))
