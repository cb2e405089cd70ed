"""A training job's spec and code: the checks a submission passes before anything is stored, the
code archive's hash and packing, and the command an attempt runs (torchrun over the entrypoint)."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

from weir_control.store.store import check_name
from weir_control.training.archive import check_archive
from weir_control.training.jobfiles import open_inside
from weir_proto.control.v1 import training_pb2
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError

BUILTIN = {"builtin:mlp": "weir_control.training.builtin"}


def code_hash(archive: bytes) -> str:
    """The archive's code hash, once it passed every check (see ``archive.check_archive``)."""
    return check_archive(archive)


CODE_SKIP = {"__pycache__", ".git", ".venv", "weir-run"}


def archive_directory(directory: Path, follow_links: bool = True) -> bytes:
    """A code directory as tar.gz (caches and VCS folders left out), the form jobs carry their code in.
    ``follow_links=False`` for a directory a job could change (the control plane packing a job's code
    again): links are left out and nothing is opened through one."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.rglob("*")) if follow_links else ():
            if path.is_file() and not CODE_SKIP.intersection(path.relative_to(directory).parts):
                tar.add(path, arcname=str(path.relative_to(directory)))
        for root, folders, names in () if follow_links else os.walk(directory, followlinks=False):
            folders[:] = sorted(folder for folder in folders if folder not in CODE_SKIP)
            for name in sorted(names):
                relative = str((Path(root) / name).relative_to(directory))
                try:
                    descriptor = open_inside(directory, relative)
                except OSError:
                    continue  # a link, a fifo, a device: not code
                with os.fdopen(descriptor, "rb") as handle:
                    info = tar.gettarinfo(arcname=relative, fileobj=handle)
                    tar.addfile(info, handle)
    return buffer.getvalue()


def version_ref(model_name: str, version: int) -> Any:
    from weir_proto.common.v1 import types_pb2

    return types_pb2.ModelVersionRef(model_name=model_name, version=version)


def check_spec(spec: training_pb2.JobSpec) -> str:
    """Refuse a spec the runner cannot run (naming the field); returns its code hash (reading the
    archive is the check that it is one)."""
    kind, _, target = spec.entrypoint.partition(":")
    if kind not in ("module", "script", "builtin") or not target:
        raise InvalidArgumentError(
            "spec.entrypoint: expected 'module:package.name', 'script:path.py' or 'builtin:mlp', "
            f"got {spec.entrypoint!r}"
        )
    if kind == "builtin" and spec.entrypoint not in BUILTIN:
        raise InvalidArgumentError(
            f"spec.entrypoint: expected one of the built-in trainers {sorted(BUILTIN)}, got {spec.entrypoint!r}"
        )
    if kind != "builtin" and not spec.code_archive:
        raise InvalidArgumentError(
            f"spec.code_archive: a {kind} entrypoint needs the code directory (tar.gz), got none"
        )
    if spec.nodes > 1:
        raise FailedPreconditionError(
            f"spec.nodes: the local executor runs one node, got {spec.nodes} (a cluster executor is needed for more)"
        )
    if not 0 <= spec.processes_per_node <= 64:
        raise InvalidArgumentError(f"spec.processes_per_node: expected 1 to 64 (0: 1), got {spec.processes_per_node}")
    for field in ("max_retries", "checkpoint_every_epochs"):
        if getattr(spec, field) < 0:
            raise InvalidArgumentError(f"spec.{field}: expected 0 or more, got {getattr(spec, field)}")
    if spec.timeout_seconds < 0:
        raise InvalidArgumentError(f"spec.timeout_seconds: expected 0 (none) or more, got {spec.timeout_seconds}")
    if spec.HasField("register") and spec.register.model_name:
        # the registry would refuse these only when the job ends, after all its compute
        check_name("spec.register.model_name", spec.register.model_name)
        for alias in spec.register.aliases:
            check_name("spec.register.aliases", alias)
        check_canary(spec.register.canary)
    return code_hash(spec.code_archive)


def check_canary(canary: Any) -> None:
    """The canary a job hands its version to, checked now as the rollouts controller would at the end."""
    from weir_control.rollouts import DEFAULT_STEPS, MAX_INTERVAL_SECONDS, MIN_INTERVAL_SECONDS, check_number

    if not canary.endpoint:
        return
    check_name("spec.register.canary.endpoint", canary.endpoint)
    steps = list(canary.steps) or list(DEFAULT_STEPS)
    if any(not 1 <= step <= 100 for step in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
        raise InvalidArgumentError(
            f"spec.register.canary.steps: expected increasing percentages in 1..100 ending at 100, got {steps}"
        )
    if canary.interval_seconds:
        check_number(
            "spec.register.canary.interval_seconds", canary.interval_seconds, MIN_INTERVAL_SECONDS, MAX_INTERVAL_SECONDS
        )


def attempt_command(spec: training_pb2.JobSpec, job_dir: Path) -> list[str]:
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={spec.processes_per_node or 1}", "--max-restarts=0",
    ]  # fmt: skip
    kind, _, target = spec.entrypoint.partition(":")
    if kind == "builtin":
        return [*torchrun, "-m", BUILTIN[spec.entrypoint]]
    if kind == "module":
        return [*torchrun, "-m", target]
    return [*torchrun, str(job_dir / "code" / target)]
