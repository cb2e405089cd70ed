"""The metadata store: every registry, deployment, rollout, experiment, job, monitoring, feature and
audit read or write, over one engine.

One class per aggregate (``registry``, ``deployments``, ``rollouts``, ``experiments``, ``jobs``,
``monitoring``, ``features``, ``audit``), all deriving from ``db.Database`` (engine, units of work,
revision); ``Store`` combines them. Synchronous SQLAlchemy Core; the gRPC services call it through
``asyncio.to_thread`` so the event loop never waits on the database. Methods return the
``weir.control.v1`` messages the services send, so nothing converts twice. Errors are Weir's kinds
(NOT_FOUND, FAILED_PRECONDITION, ...) with messages that name what was asked for.
"""

from __future__ import annotations

from pathlib import Path

from weir_control.domain.deployments import KILL_SWITCH, MAX_VARIANTS
from weir_control.store.audit import REFUSED_RESULTS, AuditRecords
from weir_control.store.db import (
    DEFAULT_PAGE_SIZE,
    DESIRED_STATE_REVISION,
    MAX_NAME_LENGTH,
    MAX_PAGE_SIZE,
    MAX_SEARCH_TEXT,
    check_name,
    create_store_engine,
    now,
)
from weir_control.store.deployments import DeploymentRecords
from weir_control.store.experiments import ExperimentRecords
from weir_control.store.features import FeatureRecords
from weir_control.store.jobs import TERMINAL_JOB_STATES, JobRecords, _check_job_id
from weir_control.store.monitoring import MonitoringRecords
from weir_control.store.registry import FAILED, PENDING, READY
from weir_control.store.rollouts import RolloutRecords

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DESIRED_STATE_REVISION",
    "FAILED",
    "KILL_SWITCH",
    "MAX_NAME_LENGTH",
    "MAX_PAGE_SIZE",
    "MAX_SEARCH_TEXT",
    "MAX_VARIANTS",
    "PENDING",
    "READY",
    "REFUSED_RESULTS",
    "TERMINAL_JOB_STATES",
    "Store",
    "_check_job_id",
    "check_name",
    "create_store_engine",
    "now",
    "open_store",
]


class Store(
    DeploymentRecords,  # and, beneath it, RegistryRecords (a deployment resolves registry versions)
    RolloutRecords,
    ExperimentRecords,
    JobRecords,
    MonitoringRecords,
    FeatureRecords,
    AuditRecords,
):
    """Every aggregate's records over one engine (``weir_control.store.db.Database``)."""


def open_store(url: str) -> Store:
    """``url``: a SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``) or a plain file
    path (SQLite). The schema is created or migrated to the latest version."""
    if "://" not in url:
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    return Store(create_store_engine(url))
