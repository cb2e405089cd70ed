"""Rollout records: one rollout per endpoint, stored whole."""

from __future__ import annotations

from sqlalchemy import select

from weir_control.store.db import Database, now, retried
from weir_control.store.schema import ROLLOUTS
from weir_proto.control.v1 import rollouts_pb2
from weir_proto.errors import NotFoundError


class RolloutRecords(Database):
    # --- rollouts --------------------------------------------------------------------------------

    @retried
    def save_rollout(self, rollout: rollouts_pb2.Rollout) -> None:
        state = rollouts_pb2.Rollout.State.Name(rollout.state)
        with self._transaction() as connection:
            values = {"state": state, "rollout": rollout.SerializeToString(), "updated_at": now()}
            self._upsert(connection, ROLLOUTS, {"endpoint": rollout.endpoint}, values)

    def get_rollout(self, endpoint: str) -> rollouts_pb2.Rollout:
        with self._transaction() as connection:
            row = connection.execute(select(ROLLOUTS.c.rollout).where(ROLLOUTS.c.endpoint == endpoint)).first()
        if row is None:
            raise NotFoundError(f"endpoint: no rollout for '{endpoint}'")
        return rollouts_pb2.Rollout.FromString(row.rollout)

    def active_rollouts(self) -> list[rollouts_pb2.Rollout]:
        with self._transaction() as connection:
            rows = connection.execute(
                select(ROLLOUTS.c.rollout)
                .where(ROLLOUTS.c.state.in_(["RUNNING", "PAUSED"]))
                .order_by(ROLLOUTS.c.endpoint)
            )
            return [rollouts_pb2.Rollout.FromString(row.rollout) for row in rows]
