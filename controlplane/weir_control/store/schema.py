"""The tables, as the latest schema version has them. ``weir_control.store.migrations`` builds
them step by step; a test checks that a store migrated from nothing matches these definitions.

Tags live in their own tables (not JSON columns) so searches filter by tag in SQL, the same way on
SQLite and PostgreSQL, and paging stays exact.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

NAME = String(256)
# SQLite makes only "INTEGER PRIMARY KEY" an auto-incrementing rowid.
ID = BigInteger().with_variant(Integer(), "sqlite")


def registry_tables(metadata: MetaData) -> dict[str, Table]:
    """Schema version 1: registered models, versions, tags, aliases."""
    models = Table(
        "registered_models",
        metadata,
        Column("name", NAME, primary_key=True),
        Column("description", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    model_tags = Table(
        "registered_model_tags",
        metadata,
        Column("model_name", NAME, primary_key=True),
        Column("key", NAME, primary_key=True),
        Column("value", Text, nullable=False),
        ForeignKeyConstraint(["model_name"], ["registered_models.name"], ondelete="CASCADE"),
    )
    versions = Table(
        "model_versions",
        metadata,
        Column("model_name", NAME, primary_key=True),
        Column("version", BigInteger, primary_key=True, autoincrement=False),
        Column("state", String(16), nullable=False),  # PENDING, READY, FAILED
        Column("failure_reason", Text, nullable=False),
        Column("artifact_sha256", String(64), nullable=False),  # "" until the upload completes
        Column("artifact_size", BigInteger, nullable=False),
        Column("artifact_filename", NAME, nullable=False),
        Column("config_pbtxt", Text, nullable=False),
        Column("signature", LargeBinary, nullable=False),  # weir.common.v1.ModelSignature, serialized
        Column("metrics", JSON, nullable=False),
        Column("description", Text, nullable=False),
        Column("lineage", JSON, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        ForeignKeyConstraint(["model_name"], ["registered_models.name"], ondelete="CASCADE"),
    )
    version_tags = Table(
        "model_version_tags",
        metadata,
        Column("model_name", NAME, primary_key=True),
        Column("version", BigInteger, primary_key=True, autoincrement=False),
        Column("key", NAME, primary_key=True),
        Column("value", Text, nullable=False),
        ForeignKeyConstraint(
            ["model_name", "version"], ["model_versions.model_name", "model_versions.version"], ondelete="CASCADE"
        ),
    )
    aliases = Table(
        "model_aliases",
        metadata,
        Column("model_name", NAME, primary_key=True),
        Column("alias", NAME, primary_key=True),
        Column("version", BigInteger, nullable=False),
        ForeignKeyConstraint(
            ["model_name", "version"], ["model_versions.model_name", "model_versions.version"], ondelete="CASCADE"
        ),
    )
    return {table.name: table for table in (models, model_tags, versions, version_tags, aliases)}


def deployment_tables(metadata: MetaData) -> dict[str, Table]:
    """Schema version 2: deployments, the desired-state revision counter, the audit log."""
    deployments = Table(
        "deployments",
        metadata,
        Column("endpoint", NAME, primary_key=True),
        Column("variants", JSON, nullable=False),  # [{name, model_name, version | alias, weight}]
        Column("revision", BigInteger, nullable=False),
        Column("updated_by", NAME, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    counters = Table(
        "counters",
        metadata,
        Column("name", NAME, primary_key=True),
        Column("value", BigInteger, nullable=False),
    )
    audit = Table(
        "audit_events",
        metadata,
        Column("id", ID, primary_key=True, autoincrement=True),
        Column("at", DateTime(timezone=True), nullable=False, index=True),
        Column("actor", NAME, nullable=False),
        Column("role", String(32), nullable=False),
        Column("action", NAME, nullable=False),
        Column("target", Text, nullable=False),
        Column("before", Text, nullable=False),
        Column("after", Text, nullable=False),
        Column("result", String(32), nullable=False),
        Column("detail", Text, nullable=False),
    )
    return {table.name: table for table in (deployments, counters, audit)}


def schema_version_table(metadata: MetaData) -> Table:
    return Table("weir_schema_version", metadata, Column("version", Integer, nullable=False))


def traffic_columns() -> list[Column[object]]:
    """Schema version 3 (ALTER of ``deployments``): per-endpoint flags and the routing policy."""
    return [
        Column("flags", JSON, nullable=False, server_default="{}"),  # name -> value
        Column("routing", JSON, nullable=False, server_default="{}"),  # {key_parameter, key_header}
    ]


def audit_outcome_columns() -> list[Column[object]]:
    """Schema version 9 (ALTER of ``audit_events``): what became of the call, and how many calls an
    aggregated event stands for (refusals are counted per caller and method per minute)."""
    return [
        Column("outcome", String(16), nullable=False, server_default=""),  # ok | refused | failed
        Column("count", BigInteger, nullable=False, server_default="1"),
    ]


def validation_columns() -> list[Column[object]]:
    """Schema version 10 (ALTER of ``model_versions``): the version's validation inputs, a blob in
    the artifact store (empty: none)."""
    return [
        Column("validation_sha256", String(64), nullable=False, server_default=""),
        Column("validation_size", BigInteger, nullable=False, server_default="0"),
    ]


def rollout_tables(metadata: MetaData) -> dict[str, Table]:
    """Schema version 4: canary rollouts, one row per endpoint (the Rollout message, serialized)."""
    rollouts = Table(
        "rollouts",
        metadata,
        Column("endpoint", NAME, primary_key=True),
        Column("state", String(16), nullable=False),
        Column("rollout", LargeBinary, nullable=False),  # weir.control.v1.Rollout
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    return {rollouts.name: rollouts}


def experiment_tables(metadata: MetaData) -> dict[str, Table]:
    """Schema version 5: A/B tests and their outcomes."""
    tests = Table(
        "ab_tests",
        metadata,
        Column("endpoint", NAME, primary_key=True),
        Column("test", LargeBinary, nullable=False),  # weir.control.v1.ABTest (without results)
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    outcomes = Table(
        "ab_outcomes",
        metadata,
        Column("id", ID, primary_key=True, autoincrement=True),
        Column("endpoint", NAME, nullable=False, index=True),
        Column("variant", NAME, nullable=False),
        Column("metric", NAME, nullable=False),
        Column("routing_key", Text, nullable=False),
        Column("value", Float, nullable=False),
        Column("at", DateTime(timezone=True), nullable=False),
    )
    return {tests.name: tests, outcomes.name: outcomes}


def feature_tables(metadata: MetaData) -> dict[str, Table]:
    """Schema version 6: the feature definitions (one current document, with its revision)."""
    definitions = Table(
        "feature_definitions",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
        Column("revision", BigInteger, nullable=False),
        Column("definitions_toml", Text, nullable=False),
        Column("updated_by", NAME, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    return {definitions.name: definitions}


def training_tables(metadata: MetaData) -> dict[str, Table]:
    """Schema version 7: training jobs (the Job message, serialized, with the columns lists filter and
    page on) and their metric points."""
    jobs = Table(
        "training_jobs",
        metadata,
        Column("id", NAME, primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("parent_id", NAME, nullable=False, index=True),  # '' for top-level jobs
        Column("state", String(16), nullable=False, index=True),
        Column("created_at", DateTime(timezone=True), nullable=False, index=True),
        Column("job", LargeBinary, nullable=False),  # weir.control.v1.Job
        Column("secret_sha256", String(64), nullable=False),  # the job's own reporting secret, hashed
        Column("pid", Integer, nullable=False),  # the launcher's process (and group) id while it runs
    )
    metrics = Table(
        "training_metrics",
        metadata,
        Column("id", ID, primary_key=True, autoincrement=True),
        Column("job_id", NAME, nullable=False, index=True),
        Column("key", NAME, nullable=False),
        Column("step", BigInteger, nullable=False),
        Column("value", Float, nullable=False),
        Column("at", DateTime(timezone=True), nullable=False),
    )
    return {jobs.name: jobs, metrics.name: metrics}


def monitoring_tables(metadata: MetaData) -> dict[str, Table]:
    """Schema version 8: drift monitoring: per endpoint its policy, reference and small state, the
    scored windows (report and mergeable profile) and the actions taken."""
    policies = Table(
        "monitoring_policies",
        metadata,
        Column("endpoint", NAME, primary_key=True),
        Column("policy", LargeBinary, nullable=False),  # weir.control.v1.MonitoringPolicy
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    references = Table(
        "drift_references",
        metadata,
        Column("endpoint", NAME, primary_key=True),
        Column("summary", LargeBinary, nullable=False),  # weir.control.v1.ReferenceSummary
        Column("profile", LargeBinary, nullable=False),  # weir_control.monitoring.profiles.ReferenceProfile
    )
    windows = Table(
        "drift_windows",
        metadata,
        Column("id", ID, primary_key=True, autoincrement=True),
        Column("endpoint", NAME, nullable=False, index=True),
        Column("start", DateTime(timezone=True), nullable=False),
        Column("end", DateTime(timezone=True), nullable=False),
        Column("report", LargeBinary, nullable=False),  # weir.control.v1.DriftWindow
        Column("profile", LargeBinary, nullable=False),  # WindowProfile: a later reference may merge it
    )
    actions = Table(
        "drift_actions",
        metadata,
        Column("id", ID, primary_key=True, autoincrement=True),
        Column("endpoint", NAME, nullable=False, index=True),
        Column("action", LargeBinary, nullable=False),  # weir.control.v1.Action
    )
    state = Table(
        "monitoring_state",
        metadata,
        Column("endpoint", NAME, primary_key=True),
        Column("state", JSON, nullable=False),  # the concept-drift detector, counters, last action time
    )
    return {table.name: table for table in (policies, references, windows, actions, state)}


METADATA = MetaData()
SCHEMA_VERSION = schema_version_table(METADATA)
_REGISTRY = registry_tables(METADATA)
_DEPLOYMENTS = deployment_tables(METADATA)
for _column in traffic_columns():
    _DEPLOYMENTS["deployments"].append_column(_column)
for _column in audit_outcome_columns():
    _DEPLOYMENTS["audit_events"].append_column(_column)
for _column in validation_columns():
    _REGISTRY["model_versions"].append_column(_column)
ROLLOUTS = rollout_tables(METADATA)["rollouts"]
_EXPERIMENTS = experiment_tables(METADATA)
AB_TESTS = _EXPERIMENTS["ab_tests"]
AB_OUTCOMES = _EXPERIMENTS["ab_outcomes"]
FEATURE_DEFINITIONS = feature_tables(METADATA)["feature_definitions"]
_TRAINING = training_tables(METADATA)
TRAINING_JOBS = _TRAINING["training_jobs"]
TRAINING_METRICS = _TRAINING["training_metrics"]
_MONITORING = monitoring_tables(METADATA)
MONITORING_POLICIES = _MONITORING["monitoring_policies"]
DRIFT_REFERENCES = _MONITORING["drift_references"]
DRIFT_WINDOWS = _MONITORING["drift_windows"]
DRIFT_ACTIONS = _MONITORING["drift_actions"]
MONITORING_STATE = _MONITORING["monitoring_state"]

REGISTERED_MODELS = _REGISTRY["registered_models"]
REGISTERED_MODEL_TAGS = _REGISTRY["registered_model_tags"]
MODEL_VERSIONS = _REGISTRY["model_versions"]
MODEL_VERSION_TAGS = _REGISTRY["model_version_tags"]
MODEL_ALIASES = _REGISTRY["model_aliases"]
DEPLOYMENTS = _DEPLOYMENTS["deployments"]
COUNTERS = _DEPLOYMENTS["counters"]
AUDIT_EVENTS = _DEPLOYMENTS["audit_events"]


def lease_tables(metadata: MetaData) -> dict[str, Table]:
    """Schema version 11: leases for the singleton work of several control-plane replicas, and the
    data planes' reports each replica persists for the lease holder's rollout analysis. Times are
    seconds since the epoch on the database's clock (see ``weir_control.lease``)."""
    leases = Table(
        "leases",
        metadata,
        Column("name", NAME, primary_key=True),
        Column("holder", NAME, nullable=False),  # the replica id holding it ("" never held)
        Column("token", BigInteger, nullable=False),  # the fencing token: +1 on every new term
        Column("expires_at", Float, nullable=False),
    )
    reports = Table(
        "replica_reports",
        metadata,
        Column("stream", NAME, primary_key=True),  # "<control replica>/<attach stream>": unique across replicas
        Column("control_replica", NAME, nullable=False),
        Column("identity", NAME, nullable=False),  # the token identity the data plane attached as
        Column("info", LargeBinary, nullable=False),  # weir.control.v1.ReplicaInfo, accepted status only
        Column("updated_at", Float, nullable=False),
    )
    replicas = Table(
        "control_replicas",
        metadata,
        Column("replica", NAME, primary_key=True),
        Column("address", NAME, nullable=False),  # host:port jobs and data planes reach it at
        Column("updated_at", Float, nullable=False),
    )
    return {table.name: table for table in (leases, reports, replicas)}


_LEASE = lease_tables(METADATA)
LEASES = _LEASE["leases"]
REPLICA_REPORTS = _LEASE["replica_reports"]
CONTROL_REPLICAS = _LEASE["control_replicas"]


def drift_partial_tables(metadata: MetaData) -> dict[str, Table]:
    """Schema version 12: drift window partials. Every control-plane replica takes the records of the
    data planes attached to it; when one of its windows closes it hands the window's mergeable profile
    and label counts in here, and the replica holding the singleton lease merges every replica's
    partials of that window and judges it (``weir_control.monitoring.partials``)."""
    partials = Table(
        "drift_partials",
        metadata,
        Column("id", ID, primary_key=True, autoincrement=True),
        Column("endpoint", NAME, nullable=False, index=True),
        Column("start", Float, nullable=False),  # the window's start, seconds since 1970 (aligned by its size)
        Column("due_at", Float, nullable=False),  # when the window closed at the replica that handed it in
        Column("replica", String(128), nullable=False),
        Column("records", BigInteger, nullable=False),
        Column("correct", BigInteger, nullable=False),  # feedback labels counted in the window
        Column("labelled", BigInteger, nullable=False),
        Column("ddm_state", String(16), nullable=False),
        Column("profile", LargeBinary, nullable=False),  # weir_control.monitoring.profiles.WindowProfile
    )
    # Feedback labels that reached a replica without their request's record: every replica reads them
    # and the one that remembers the request's prediction claims (deletes) and counts the label.
    labels = Table(
        "drift_labels",
        metadata,
        Column("id", ID, primary_key=True, autoincrement=True),
        Column("endpoint", NAME, nullable=False),
        Column("request_id", String(256), nullable=False),
        Column("label", String(256), nullable=False),
        Column("at", Float, nullable=False, index=True),  # when it came, seconds since 1970
    )
    return {table.name: table for table in (partials, labels)}


_DRIFT_PARTIALS = drift_partial_tables(METADATA)
DRIFT_PARTIALS = _DRIFT_PARTIALS["drift_partials"]
DRIFT_LABELS = _DRIFT_PARTIALS["drift_labels"]
