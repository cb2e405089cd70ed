"""Forward-only migrations: a store created at EVERY earlier schema version, with data in each of its
tables, opens migrated to the latest version with that data readable (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import insert, inspect

from weir_control.model_config import signature_from_config
from weir_control.store import Store, migrations, schema
from weir_control.store.store import create_store_engine, now
from weir_proto.control.v1 import (
    audit_pb2,
    experiments_pb2,
    monitoring_pb2,
    rollouts_pb2,
    training_pb2,
)

CONFIG = """
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""
SHA = "ef" * 32


def rows_of_every_table() -> list[tuple[Any, dict[str, Any]]]:
    """One row per table, with the columns of the latest schema; a table or column an older version
    lacks is left out when that version is seeded."""
    at = now()
    return [
        (schema.REGISTERED_MODELS, {"name": "old", "description": "from before", "created_at": at, "updated_at": at}),
        (schema.REGISTERED_MODEL_TAGS, {"model_name": "old", "key": "team", "value": "search"}),
        (
            schema.MODEL_VERSIONS,
            {
                "model_name": "old",
                "version": 1,
                "state": "READY",
                "failure_reason": "",
                "artifact_sha256": SHA,
                "artifact_size": 10,
                "artifact_filename": "model.pt",
                "config_pbtxt": CONFIG,
                "signature": signature_from_config(CONFIG).SerializeToString(),
                "metrics": {"accuracy": 0.9},
                "description": "v1",
                "lineage": {"source_job": "job-1"},
                "created_at": at,
                "updated_at": at,
                "validation_sha256": "",
                "validation_size": 0,
            },
        ),
        (schema.MODEL_VERSION_TAGS, {"model_name": "old", "version": 1, "key": "stage", "value": "prod"}),
        (schema.MODEL_ALIASES, {"model_name": "old", "alias": "champion", "version": 1}),
        (
            schema.DEPLOYMENTS,
            {
                "endpoint": "search",
                "variants": [{"name": "main", "model_name": "old", "alias": "champion", "weight": 1}],
                "revision": 7,
                "updated_by": "alice",
                "created_at": at,
                "updated_at": at,
                "flags": {"colour": "blue"},
                "routing": {"key_parameter": "user", "key_header": ""},
            },
        ),
        (schema.COUNTERS, {"name": "desired_state_revision", "value": 7}),
        (
            schema.AUDIT_EVENTS,
            {
                "at": at,
                "actor": "alice",
                "role": "admin",
                "action": "Deploy",
                "target": "search",
                "before": "",
                "after": "",
                "result": "OK",
                "detail": "",
                "outcome": "ok",
                "count": 1,
            },
        ),
        (
            schema.ROLLOUTS,
            {
                "endpoint": "search",
                "state": "RUNNING",
                "updated_at": at,
                "rollout": rollouts_pb2.Rollout(
                    endpoint="search", state=rollouts_pb2.Rollout.RUNNING
                ).SerializeToString(),
            },
        ),
        (
            schema.AB_TESTS,
            {
                "endpoint": "search",
                "test": experiments_pb2.ABTest(endpoint="search").SerializeToString(),
                "updated_at": at,
            },
        ),
        (
            schema.AB_OUTCOMES,
            {"endpoint": "search", "variant": "main", "metric": "ctr", "routing_key": "u1", "value": 1.0, "at": at},
        ),
        (
            schema.FEATURE_DEFINITIONS,
            {"id": 1, "revision": 3, "definitions_toml": "# none\n", "updated_by": "alice", "updated_at": at},
        ),
        (
            schema.TRAINING_JOBS,
            {
                "id": "job-1",
                "kind": "train",
                "parent_id": "",
                "state": "SUCCEEDED",
                "created_at": at,
                "job": training_pb2.Job(id="job-1", state=training_pb2.Job.SUCCEEDED).SerializeToString(),
                "secret_sha256": "00" * 32,
                "pid": 0,
            },
        ),
        (schema.TRAINING_METRICS, {"job_id": "job-1", "key": "loss", "step": 1, "value": 0.5, "at": at}),
        (
            schema.MONITORING_POLICIES,
            {
                "endpoint": "search",
                "updated_at": at,
                "policy": monitoring_pb2.MonitoringPolicy(endpoint="search").SerializeToString(),
            },
        ),
        (schema.MONITORING_STATE, {"endpoint": "search", "state": {"windows": 2}}),
    ]


def seed(engine: Any) -> set[str]:
    """Insert the rows whose tables exist at the store's version; returns the tables seeded."""
    seeded = set()
    with engine.begin() as connection:
        inspector = inspect(connection)
        for table, row in rows_of_every_table():
            if not inspector.has_table(table.name):
                continue
            present = {column["name"] for column in inspector.get_columns(table.name)}
            connection.execute(insert(table).values({key: value for key, value in row.items() if key in present}))
            seeded.add(table.name)
    return seeded


@pytest.mark.parametrize("version", range(1, migrations.LATEST))
def test_a_store_from_every_earlier_version_migrates_to_the_latest_with_its_data(store_url: str, version: int) -> None:
    engine = create_store_engine(store_url)
    assert migrations.migrate(engine.begin, target=version) == list(range(1, version + 1))
    seeded = seed(engine)
    engine.dispose()

    store = Store(create_store_engine(store_url))
    try:
        assert store.schema_version_applied == list(range(version + 1, migrations.LATEST + 1))
        with store.engine.connect() as connection:
            assert migrations.current_version(connection) == migrations.LATEST
        model = store.get_model("old")
        assert model.description == "from before" and dict(model.tags) == {"team": "search"}
        assert dict(model.aliases) == {"champion": 1}
        current = store.get_version("old", 1)
        assert current.artifact_sha256 == SHA and current.validation_sha256 == "" and current.tags == {"stage": "prod"}
        if schema.DEPLOYMENTS.name in seeded:
            deployment = store.get_deployment("search")
            assert deployment.revision == 7 and deployment.resolved[0].version == 1
            assert dict(deployment.flags) == ({"colour": "blue"} if version >= 3 else {})
            state = store.desired_state()
            assert state.revision == 7 and state.endpoints[0].variants[0].artifact_sha256 == SHA
            events, _ = store.list_audit(audit_pb2.ListAuditEventsRequest())
            assert [(event.action, event.outcome, event.count) for event in events] == [("Deploy", "ok", 1)]
            store.set_flag("search", "colour", "red", "bob")  # and it takes changes
            assert store.desired_state().revision == 8
        if schema.ROLLOUTS.name in seeded:
            assert store.get_rollout("search").state == rollouts_pb2.Rollout.RUNNING
        if schema.AB_TESTS.name in seeded:
            assert store.get_ab_test("search").endpoint == "search"
            assert store.outcome_sums("search", "ctr") == {"main": (1, 1.0, 1.0)}
        if schema.FEATURE_DEFINITIONS.name in seeded:
            assert store.feature_definitions() == (3, "# none\n")
        if schema.TRAINING_JOBS.name in seeded:
            assert store.get_job("job-1").state == training_pb2.Job.SUCCEEDED
            assert [point.value for _, point in store.job_metrics("job-1")] == [0.5]
        if schema.MONITORING_POLICIES.name in seeded:
            assert [policy.endpoint for policy in store.monitoring_policies()] == ["search"]
            assert store.monitoring_states() == {"search": {"windows": 2}}
    finally:
        store.close()
