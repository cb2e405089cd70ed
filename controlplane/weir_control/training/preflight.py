"""Checks a ``builtin:mlp`` job's data parameters at submission, on the control plane, so that a bad
one is refused at once with INVALID_ARGUMENT naming it (``spec.parameters['entities']: ...``) instead of
ending the job with "exited with code 2" minutes later:

- every parameter as the trainer parses it (``builtin_params.parse_parameters``);
- ``entities`` (and ``definitions``, when given): an absolute path (the CLI resolves a relative one against
  the directory it runs in), inside the feature root the jobs may read (``weir control --feature-root``),
  a file the control plane can read, a Parquet file with ``event_timestamp``, the label column and the
  feature service's join keys;
- ``feature_service``: a service of the definitions the job will use (the applied ones unless the job
  names its own ``definitions`` file), and a ``label`` that is not one of its join keys.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from weir_control.features.paths import ROOT_FLAG, inside
from weir_control.training.builtin_params import ParameterError, parse_parameters
from weir_proto.control.v1 import training_pb2
from weir_proto.errors import InvalidArgumentError, WeirError
from weir_proto.feature_definitions import Definitions, load_definitions, parse_definitions

ENTITY_TIMESTAMP = "event_timestamp"
JOB_DIRECTORY = Path("/job-directory")  # parse_parameters' default definitions live there; not read here


def field(name: str) -> str:
    return f"spec.parameters['{name}']"


def _value(value: training_pb2.ParamValue) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind is None else getattr(value, kind)


def _readable_file(name: str, path: Path, roots: list[Path], what: str) -> None:
    if not path.is_absolute():
        raise InvalidArgumentError(
            f"{field(name)}: expected an absolute path to {what} (weir train submit resolves a relative one "
            f"against the directory it runs in), got '{path}'"
        )
    if roots and not any(inside(path, root) for root in roots):
        raise InvalidArgumentError(
            f"{field(name)}: expected {what} inside the feature root {', '.join(map(str, roots))} ({ROOT_FLAG}; "
            f"jobs read nothing else), got '{path}'"
        )
    if not path.is_file():
        raise InvalidArgumentError(f"{field(name)}: expected {what}, '{path}' does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise InvalidArgumentError(f"{field(name)}: expected {what}, '{path}' is not readable by the control plane")


def check_builtin_job(spec: training_pb2.JobSpec, roots: list[Path], applied_definitions: str) -> None:
    """Raise InvalidArgumentError naming the first bad parameter of a ``builtin:mlp`` spec."""
    parameters = {key: _value(value) for key, value in spec.parameters.items()}
    try:
        settings = parse_parameters(parameters, JOB_DIRECTORY)
    except ParameterError as error:
        raise InvalidArgumentError(f"{field(error.parameter)}: {error.detail}") from None
    _readable_file("entities", settings.entities, roots, "the entity rows' Parquet file")
    try:
        schema = pq.read_schema(settings.entities)
    except (OSError, pa.ArrowException) as error:
        raise InvalidArgumentError(
            f"{field('entities')}: expected a Parquet file, cannot read '{settings.entities}': {error}"
        ) from None
    columns = list(schema.names)
    if ENTITY_TIMESTAMP not in columns:
        raise InvalidArgumentError(
            f"{field('entities')}: expected a column '{ENTITY_TIMESTAMP}' in '{settings.entities}', got {columns}"
        )
    if settings.label not in columns:
        raise InvalidArgumentError(
            f"{field('label')}: expected a column of '{settings.entities}' ({columns}), got '{settings.label}'"
        )
    definitions = _definitions(parameters, settings.definitions, roots, applied_definitions, settings.feature_service)
    service = definitions.services.get(settings.feature_service)
    if service is None:
        raise InvalidArgumentError(
            f"{field('feature_service')}: expected one of the feature services {sorted(definitions.services)}, "
            f"got '{settings.feature_service}'"
        )
    keys = sorted({key for view, _ in service.features for key in definitions.join_keys(definitions.views[view])})
    if settings.label in {*keys, ENTITY_TIMESTAMP}:
        raise InvalidArgumentError(
            f"{field('label')}: expected a label column, got '{settings.label}', a join key of "
            f"'{settings.feature_service}' ({keys}) or the event timestamp"
        )
    missing = [key for key in keys if key not in columns]
    if missing:
        raise InvalidArgumentError(
            f"{field('entities')}: expected the join keys {keys} of feature service '{settings.feature_service}' "
            f"as columns of '{settings.entities}', got {columns} (missing: {missing})"
        )


def _definitions(parameters: dict[str, Any], path: Path, roots: list[Path], applied: str, service: str) -> Definitions:
    if "definitions" in parameters:  # the job's own file
        _readable_file("definitions", path, roots, "a feature definitions TOML file")
        try:
            return load_definitions(path)
        except WeirError as error:
            raise InvalidArgumentError(f"{field('definitions')}: {error.message}") from None
    if not applied:
        raise InvalidArgumentError(
            f"{field('feature_service')}: expected a service of the applied feature definitions, got '{service}' "
            "but none are applied (weir features apply FILE)"
        )
    try:
        return parse_definitions(tomllib.loads(applied), "the applied feature definitions")
    except (tomllib.TOMLDecodeError, WeirError) as error:  # applied definitions were checked: not expected
        message = error.message if isinstance(error, WeirError) else str(error)
        raise InvalidArgumentError(
            f"{field('feature_service')}: the applied definitions do not parse: {message}"
        ) from None
