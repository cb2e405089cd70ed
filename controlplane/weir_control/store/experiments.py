"""A/B test records: one test per endpoint and the outcomes it collects."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, insert, select

from weir_control.store.db import Database, now, retried
from weir_control.store.schema import AB_OUTCOMES, AB_TESTS
from weir_proto.control.v1 import experiments_pb2
from weir_proto.errors import NotFoundError


class ExperimentRecords(Database):
    # --- A/B tests -------------------------------------------------------------------------------

    @retried
    def save_ab_test(self, test: experiments_pb2.ABTest) -> None:
        stored = experiments_pb2.ABTest()
        stored.CopyFrom(test)
        del stored.results[:]
        with self._transaction() as connection:
            values = {"test": stored.SerializeToString(), "updated_at": now()}
            self._upsert(connection, AB_TESTS, {"endpoint": test.endpoint}, values)

    def get_ab_test(self, endpoint: str) -> experiments_pb2.ABTest:
        with self._transaction() as connection:
            row = connection.execute(select(AB_TESTS.c.test).where(AB_TESTS.c.endpoint == endpoint)).first()
        if row is None:
            raise NotFoundError(f"endpoint: no A/B test for '{endpoint}'")
        return experiments_pb2.ABTest.FromString(row.test)

    def reset_outcomes(self, endpoint: str) -> None:
        with self._transaction() as connection:
            connection.execute(delete(AB_OUTCOMES).where(AB_OUTCOMES.c.endpoint == endpoint))

    def record_outcome(self, endpoint: str, variant: str, metric: str, key: str, value: float) -> None:
        with self._transaction() as connection:
            connection.execute(
                insert(AB_OUTCOMES).values(
                    endpoint=endpoint, variant=variant, metric=metric, routing_key=key, value=value, at=now()
                )
            )

    def record_outcomes(self, endpoint: str, metric: str, rows: Sequence[tuple[str, str, float]]) -> None:
        """Many outcomes, ``(variant, routing key, value)`` each, in one transaction (all or none)."""
        at = now()
        values = [
            {"endpoint": endpoint, "variant": variant, "metric": metric, "routing_key": key, "value": value, "at": at}
            for variant, key, value in rows
        ]
        with self._transaction() as connection:
            connection.execute(insert(AB_OUTCOMES), values)

    def outcome_sums(self, endpoint: str, metric: str) -> dict[str, tuple[int, float, float]]:
        """Per variant: (count, sum, sum of squares) of the metric's outcomes."""
        columns = AB_OUTCOMES.c
        query = (
            select(columns.variant, func.count(), func.sum(columns.value), func.sum(columns.value * columns.value))
            .where(columns.endpoint == endpoint, columns.metric == metric)
            .group_by(columns.variant)
        )
        with self._transaction() as connection:
            return {row[0]: (int(row[1]), float(row[2] or 0), float(row[3] or 0)) for row in connection.execute(query)}
