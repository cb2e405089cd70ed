"""Drift monitoring records: policies, references, closed windows, actions and per-endpoint state."""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update

from weir_control.store.db import Database, now
from weir_control.store.schema import (
    DRIFT_ACTIONS,
    DRIFT_REFERENCES,
    DRIFT_WINDOWS,
    MONITORING_POLICIES,
    MONITORING_STATE,
)
from weir_proto.control.v1 import monitoring_pb2


class MonitoringRecords(Database):
    # --- drift monitoring ---

    def save_monitoring_policy(self, policy: monitoring_pb2.MonitoringPolicy) -> None:
        with self._transaction() as connection:
            self._upsert(
                connection, MONITORING_POLICIES, {"endpoint": policy.endpoint},
                {"policy": policy.SerializeToString(), "updated_at": now()},
            )  # fmt: skip

    def monitoring_policies(self) -> list[monitoring_pb2.MonitoringPolicy]:
        with self._transaction() as connection:
            rows = connection.execute(select(MONITORING_POLICIES.c.policy))
            return [monitoring_pb2.MonitoringPolicy.FromString(row.policy) for row in rows]

    def save_drift_reference(self, summary: monitoring_pb2.ReferenceSummary, profile: bytes) -> None:
        with self._transaction() as connection:
            self._upsert(
                connection, DRIFT_REFERENCES, {"endpoint": summary.endpoint},
                {"summary": summary.SerializeToString(), "profile": profile},
            )  # fmt: skip

    def drift_references(self) -> list[tuple[monitoring_pb2.ReferenceSummary, bytes]]:
        with self._transaction() as connection:
            rows = connection.execute(select(DRIFT_REFERENCES.c.summary, DRIFT_REFERENCES.c.profile))
            return [(monitoring_pb2.ReferenceSummary.FromString(row.summary), row.profile) for row in rows]

    def append_drift_window(self, endpoint: str, window: monitoring_pb2.DriftWindow, profile: bytes, keep: int) -> None:
        """Store a closed window and keep only the newest ``keep`` of the endpoint's."""
        columns = DRIFT_WINDOWS.c
        with self._transaction() as connection:
            connection.execute(
                insert(DRIFT_WINDOWS).values(
                    endpoint=endpoint,
                    start=window.start.ToDatetime(datetime.UTC),
                    end=window.end.ToDatetime(datetime.UTC),
                    report=window.SerializeToString(),
                    profile=profile,
                )
            )
            newest = select(columns.id).where(columns.endpoint == endpoint).order_by(columns.id.desc()).limit(keep)
            kept = [row.id for row in connection.execute(newest)]
            if kept:
                connection.execute(delete(DRIFT_WINDOWS).where(columns.endpoint == endpoint, columns.id < min(kept)))

    def drift_windows(self, endpoint: str, latest: int = 0) -> list[monitoring_pb2.DriftWindow]:
        """The endpoint's windows, oldest first (the latest ``latest`` when given)."""
        columns = DRIFT_WINDOWS.c
        query = select(columns.report).where(columns.endpoint == endpoint).order_by(columns.id.desc())
        if latest:
            query = query.limit(latest)
        with self._transaction() as connection:
            rows = list(connection.execute(query))
        return [monitoring_pb2.DriftWindow.FromString(row.report) for row in reversed(rows)]

    def drift_window_profiles(self, endpoint: str, start: datetime.datetime, end: datetime.datetime) -> list[bytes]:
        """Profiles of the windows lying within [start, end]."""
        columns = DRIFT_WINDOWS.c
        query = (
            select(columns.profile)
            .where(columns.endpoint == endpoint, columns.start >= start, columns.end <= end)
            .order_by(columns.id)
        )
        with self._transaction() as connection:
            return [row.profile for row in connection.execute(query)]

    def drift_window_at(self, endpoint: str, start: datetime.datetime) -> monitoring_pb2.DriftWindow | None:
        """The kept window of the endpoint that starts at ``start`` (None: none, or no longer kept)."""
        columns = DRIFT_WINDOWS.c
        query = select(columns.report).where(columns.endpoint == endpoint, columns.start == start)
        with self._transaction() as connection:
            row = connection.execute(query.order_by(columns.id.desc()).limit(1)).first()
        return None if row is None else monitoring_pb2.DriftWindow.FromString(row.report)

    def replace_drift_window(self, endpoint: str, window: monitoring_pb2.DriftWindow) -> None:
        """Rewrite a kept window's report (late feedback labels update its concept drift)."""
        columns = DRIFT_WINDOWS.c
        start = window.start.ToDatetime(datetime.UTC)
        query = select(columns.id).where(columns.endpoint == endpoint, columns.start == start)
        with self._transaction() as connection:
            newest = connection.execute(query.order_by(columns.id.desc()).limit(1)).scalar()
            report = window.SerializeToString()
            connection.execute(update(DRIFT_WINDOWS).where(columns.id == newest).values(report=report))

    def append_drift_action(self, endpoint: str, action: monitoring_pb2.Action) -> None:
        with self._transaction() as connection:
            connection.execute(insert(DRIFT_ACTIONS).values(endpoint=endpoint, action=action.SerializeToString()))

    def drift_actions(self, endpoint: str) -> list[monitoring_pb2.Action]:
        columns = DRIFT_ACTIONS.c
        with self._transaction() as connection:
            rows = connection.execute(select(columns.action).where(columns.endpoint == endpoint).order_by(columns.id))
            return [monitoring_pb2.Action.FromString(row.action) for row in rows]

    def save_monitoring_state(self, endpoint: str, state: dict[str, Any]) -> None:
        with self._transaction() as connection:
            self._upsert(connection, MONITORING_STATE, {"endpoint": endpoint}, {"state": state})

    def monitoring_states(self) -> dict[str, dict[str, Any]]:
        with self._transaction() as connection:
            rows = connection.execute(select(MONITORING_STATE.c.endpoint, MONITORING_STATE.c.state))
            return {row.endpoint: dict(row.state) for row in rows}
