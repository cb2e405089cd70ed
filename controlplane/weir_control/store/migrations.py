"""Schema versions and the steps between them.

The store records its schema version in ``weir_schema_version``. Opening a store runs, each in its
own transaction, every step above the recorded version, so a store made by an older Weir opens in a
newer one. A step never changes: it builds its tables from its own definition function in
``schema``; a later change to a table is a new step (ALTER), never an edit of an old one.

Why not Alembic: the store is embedded and migrates itself when it opens, inside the process, on
SQLite and PostgreSQL alike; a list of steps in code does that without Alembic's script directory and
environment files, which a pip-installed sidecar would have to ship and locate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, MetaData, insert, inspect, select, text, update

from weir_control.store import schema


def _create(tables: Callable[[MetaData], dict[str, Any]]) -> Callable[[Connection], None]:
    def step(connection: Connection) -> None:
        metadata = MetaData()
        tables(metadata)
        metadata.create_all(connection)

    return step


def _add_traffic_columns(connection: Connection) -> None:
    for column in schema.traffic_columns():
        kind = column.type.compile(dialect=connection.dialect)
        connection.execute(text(f"ALTER TABLE deployments ADD COLUMN {column.name} {kind} NOT NULL DEFAULT '{{}}'"))


def _add_audit_outcome_columns(connection: Connection) -> None:
    for column in schema.audit_outcome_columns():
        kind = column.type.compile(dialect=connection.dialect)
        default = column.server_default.arg  # type: ignore[union-attr]
        connection.execute(
            text(f"ALTER TABLE audit_events ADD COLUMN {column.name} {kind} NOT NULL DEFAULT '{default}'")
        )


def _add_validation_columns(connection: Connection) -> None:
    for column in schema.validation_columns():
        kind = column.type.compile(dialect=connection.dialect)
        default = column.server_default.arg  # type: ignore[union-attr]
        connection.execute(
            text(f"ALTER TABLE model_versions ADD COLUMN {column.name} {kind} NOT NULL DEFAULT '{default}'")
        )


STEPS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "registry: registered models, versions, tags, aliases", _create(schema.registry_tables)),
    (2, "deployments, desired-state revision, audit log", _create(schema.deployment_tables)),
    (3, "deployments: flags and routing policy", _add_traffic_columns),
    (4, "rollouts", _create(schema.rollout_tables)),
    (5, "A/B tests and outcomes", _create(schema.experiment_tables)),
    (6, "feature definitions", _create(schema.feature_tables)),
    (7, "training jobs and metrics", _create(schema.training_tables)),
    (8, "drift monitoring", _create(schema.monitoring_tables)),
    (9, "audit events: outcome and count", _add_audit_outcome_columns),
    (10, "model versions: validation inputs", _add_validation_columns),
    (11, "leases, data-plane reports and control-plane replicas", _create(schema.lease_tables)),
    (12, "drift window partials of several replicas", _create(schema.drift_partial_tables)),
]
LATEST = STEPS[-1][0]
_MIGRATION_LOCK = 0x7765697200  # "weir\0": the advisory lock key migrations take on PostgreSQL


def current_version(connection: Connection) -> int:
    if not inspect(connection).has_table(schema.SCHEMA_VERSION.name):
        return 0
    version = connection.execute(select(schema.SCHEMA_VERSION.c.version)).scalar()
    return int(version or 0)


def migrate(connection_factory: Callable[[], object], target: int = LATEST) -> list[int]:
    """Run the steps above the store's version up to ``target``; returns the versions applied.
    ``connection_factory`` is ``engine.begin``: one transaction per step."""
    applied: list[int] = []
    for version, _, step in STEPS:
        if version > target:
            break
        with connection_factory() as connection:  # type: ignore[attr-defined]
            if connection.dialect.name == "postgresql":
                # Two control planes opening one database at once: the second waits, then finds the
                # step done. (SQLite's BEGIN IMMEDIATE already serialises writers.)
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            found = current_version(connection)
            if found > LATEST:
                raise RuntimeError(
                    f"the store has schema version {found}, newer than this Weir knows ({LATEST}): upgrade Weir"
                )
            if version <= found:
                continue
            step(connection)
            if found == 0:
                schema.SCHEMA_VERSION.create(connection, checkfirst=True)
                connection.execute(insert(schema.SCHEMA_VERSION).values(version=version))
            else:
                connection.execute(update(schema.SCHEMA_VERSION).values(version=version))
            applied.append(version)
    return applied
