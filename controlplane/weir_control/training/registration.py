"""A succeeded job's exported model becomes a registry version with lineage (job id, parameters, final
metrics, dataset snapshot hash, code hash), through the same upload path as `weir models push`."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from weir_control.artifacts import ArtifactStore
from weir_control.services import _Upload, summary
from weir_control.store import Store
from weir_proto.control.v1 import audit_pb2, registry_pb2, training_pb2
from weir_proto.errors import FailedPreconditionError, NotFoundError

ACTOR = "training-runner"
CHUNK = 1 << 20


def exported_model(output_dir: Path) -> tuple[Path, Path]:
    """(model file, config.pbtxt) the job wrote into its output directory."""
    config = output_dir / "config.pbtxt"
    model = next((output_dir / name for name in ("model.pt", "model.pt2") if (output_dir / name).is_file()), None)
    if model is None or not config.is_file():
        found = sorted(path.name for path in output_dir.glob("*")) if output_dir.is_dir() else "none"
        raise FailedPreconditionError(
            f"register: expected model.pt or model.pt2 and config.pbtxt in the job's output directory "
            f"({output_dir}), got {found}"
        )
    return model, config


def register_job_output(
    store: Store, artifacts: ArtifactStore, job: training_pb2.Job, output_dir: Path
) -> registry_pb2.ModelVersion:
    spec = job.spec.register
    model_file, config_file = exported_model(output_dir)
    digest = hashlib.sha256()
    with model_file.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    try:
        store.get_model(spec.model_name)
    except NotFoundError:
        store.create_model(spec.model_name, f"trained by Weir training jobs (first: {job.id})", {})
    header = registry_pb2.CreateModelVersionRequest.Header(
        model_name=spec.model_name,
        config_pbtxt=config_file.read_text(encoding="utf-8"),
        artifact_filename=model_file.name,
        artifact_sha256=digest.hexdigest(),
        artifact_size=model_file.stat().st_size,
        description=f"trained by job {job.id}",
        tags={"weir.training_job": job.id},
        metrics=dict(job.metrics),
        lineage=registry_pb2.Lineage(
            source_job=job.id,
            parameters=dict(job.logged_params) or {key: _text(value) for key, value in job.spec.parameters.items()},
            dataset_hash=job.dataset_hash,
            code_version=job.code_hash,
        ),
    )
    upload = _Upload(store, artifacts, header)
    upload.begin()
    try:
        with model_file.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                upload.write(chunk)
        version = upload.commit()
    except BaseException:
        if not upload.finished:
            upload.fail("registration from a training job did not complete")
        raise
    for alias in spec.aliases:
        version = store.set_alias(spec.model_name, alias, version.version)
    event = audit_pb2.AuditEvent(
        actor=ACTOR, role="system", action="Training/RegisterModelVersion",
        target=f"model/{spec.model_name}/version/{version.version}", after=summary(version), result="OK",
        detail=f"job {job.id}",
    )  # fmt: skip
    event.at.FromDatetime(datetime.datetime.now(datetime.UTC))
    store.append_audit(event)
    return version


def _text(value: training_pb2.ParamValue) -> str:
    kind = value.WhichOneof("kind")
    return "" if kind is None else str(getattr(value, kind))
