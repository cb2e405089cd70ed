"""The metadata store: every registry, deployment and audit read or write, each in one transaction.

Synchronous SQLAlchemy Core; the gRPC services call it through ``asyncio.to_thread`` so the event
loop never waits on the database. Methods return the ``weir.control.v1`` messages the services send,
so nothing converts twice. Errors are Weir's kinds (NOT_FOUND, FAILED_PRECONDITION, ...) with
messages that name what was asked for.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from weir_control.store import migrations
from weir_control.store.schema import (
    AB_OUTCOMES,
    AB_TESTS,
    AUDIT_EVENTS,
    COUNTERS,
    DEPLOYMENTS,
    DRIFT_ACTIONS,
    DRIFT_REFERENCES,
    DRIFT_WINDOWS,
    FEATURE_DEFINITIONS,
    MODEL_ALIASES,
    MODEL_VERSION_TAGS,
    MODEL_VERSIONS,
    MONITORING_POLICIES,
    MONITORING_STATE,
    REGISTERED_MODEL_TAGS,
    REGISTERED_MODELS,
    ROLLOUTS,
    TRAINING_JOBS,
    TRAINING_METRICS,
)
from weir_proto.common.v1 import types_pb2
from weir_proto.control.v1 import (
    audit_pb2,
    deployments_pb2,
    experiments_pb2,
    monitoring_pb2,
    registry_pb2,
    rollouts_pb2,
    training_pb2,
)
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DESIRED_STATE_REVISION = "desired_state_revision"
KILL_SWITCH = "kill_switch"  # the flag that sends all of an endpoint's traffic to the variant it names
READY = registry_pb2.ModelVersion.READY
PENDING = registry_pb2.ModelVersion.PENDING
FAILED = registry_pb2.ModelVersion.FAILED
TERMINAL_JOB_STATES = (training_pb2.Job.SUCCEEDED, training_pb2.Job.FAILED, training_pb2.Job.CANCELLED)
_STATE_NAMES: dict[int, str] = {PENDING: "PENDING", READY: "READY", FAILED: "FAILED"}
_STATE_BY_NAME: dict[str, Any] = {name: state for state, name in _STATE_NAMES.items()}


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def open_store(url: str) -> Store:
    """``url``: a SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``) or a plain file
    path (SQLite). The schema is created or migrated to the latest version."""
    if "://" not in url:
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    return Store(create_store_engine(url))


def create_store_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            # WAL: readers never wait for the writer; foreign keys are off by default in SQLite.
            # isolation_level None hands transactions to the "begin" hook below.
            connection.isolation_level = None
            cursor = connection.cursor()
            _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # IMMEDIATE: take the write lock at the start, so two writers serialise instead of one
            # failing at commit ("database is locked" after a read-then-write).
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _enable_wal(cursor: Any) -> None:
    """WAL persists in the file; switching to it needs a moment alone with the database, which a
    process opening the same new file at the same time may not give at once (no busy handler there)."""
    for attempt in range(50):
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as error:  # sqlite3.OperationalError: database is locked
            if "locked" not in str(error) or attempt == 49:
                raise
            time.sleep(0.05)


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ambient = threading.local()  # .connection: the transaction this thread is inside, if any
        self.schema_version_applied = migrations.migrate(engine.begin)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One unit of work: every Store method this thread calls inside the block joins it, so its
        rows commit together at the end of the block or, on an exception, none do. Nested blocks
        join the outermost one. On SQLite the write lock is taken at the start (BEGIN IMMEDIATE).

        Let errors leave the block: a statement that failed inside it leaves a PostgreSQL
        transaction unusable, so catching a store error and carrying on inside the block fails later.
        """
        joined = getattr(self._ambient, "connection", None)
        if joined is not None:
            yield joined
            return
        with self.engine.begin() as connection:
            self._ambient.connection = connection
            try:
                yield connection
            finally:
                self._ambient.connection = None

    def in_transaction(self) -> bool:
        """Whether this thread is inside ``transaction()`` (a retry cannot rerun the caller's block)."""
        return getattr(self._ambient, "connection", None) is not None

    _transaction = transaction

    # --- registered models -----------------------------------------------------------------------

    def create_model(self, name: str, description: str, tags: Mapping[str, str]) -> registry_pb2.RegisteredModel:
        _check_name("name", name)
        _check_description(description)
        at = now()
        try:
            with self._transaction() as connection:
                connection.execute(
                    insert(REGISTERED_MODELS).values(name=name, description=description, created_at=at, updated_at=at)
                )
                _put_tags(connection, REGISTERED_MODEL_TAGS, {"model_name": name}, tags)
                return self._model(connection, name)
        except IntegrityError as error:
            raise FailedPreconditionError(f"name: registered model '{name}' already exists") from error

    def get_model(self, name: str) -> registry_pb2.RegisteredModel:
        with self._transaction() as connection:
            return self._model(connection, name)

    def update_model(
        self, name: str, description: str | None, set_tags: Mapping[str, str], delete_tags: Sequence[str]
    ) -> registry_pb2.RegisteredModel:
        _check_description(description)
        with self._transaction() as connection:
            self._model(connection, name)
            values: dict[str, Any] = {"updated_at": now()}
            if description is not None:
                values["description"] = description
            connection.execute(update(REGISTERED_MODELS).where(REGISTERED_MODELS.c.name == name).values(**values))
            _delete_tags(connection, REGISTERED_MODEL_TAGS, {"model_name": name}, delete_tags)
            _put_tags(connection, REGISTERED_MODEL_TAGS, {"model_name": name}, set_tags)
            return self._model(connection, name)

    def search_models(
        self, name_contains: str, tags: Mapping[str, str], page_size: int, page_token: str
    ) -> tuple[list[registry_pb2.RegisteredModel], str]:
        limit = _page_size(page_size)
        if len(name_contains) > MAX_SEARCH_TEXT:
            raise InvalidArgumentError(
                f"name_contains: expected at most {MAX_SEARCH_TEXT} characters, got {len(name_contains)}"
            )
        _check_tag_filters(tags)
        query = select(REGISTERED_MODELS.c.name).order_by(REGISTERED_MODELS.c.name).limit(limit + 1)
        if name_contains:
            query = query.where(func.lower(REGISTERED_MODELS.c.name).contains(name_contains.lower(), autoescape=True))
        for key, value in tags.items():
            query = query.where(
                exists().where(
                    and_(
                        REGISTERED_MODEL_TAGS.c.model_name == REGISTERED_MODELS.c.name,
                        REGISTERED_MODEL_TAGS.c.key == key,
                        REGISTERED_MODEL_TAGS.c.value == value,
                    )
                )
            )
        after = _decode_token(page_token)
        if after is not None:
            query = query.where(REGISTERED_MODELS.c.name > after[0])
        with self._transaction() as connection:
            names = [row.name for row in connection.execute(query)]
            page = [self._model(connection, name) for name in names[:limit]]
        next_token = _encode_token([names[limit - 1]]) if len(names) > limit else ""
        return page, next_token

    def _model(self, connection: Connection, name: str) -> registry_pb2.RegisteredModel:
        row = connection.execute(select(REGISTERED_MODELS).where(REGISTERED_MODELS.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"model_name: no registered model named '{name}'")
        model = registry_pb2.RegisteredModel(name=row.name, description=row.description)
        model.created_at.FromDatetime(_utc(row.created_at))
        model.updated_at.FromDatetime(_utc(row.updated_at))
        model.tags.update(_tags(connection, REGISTERED_MODEL_TAGS, REGISTERED_MODEL_TAGS.c.model_name == name))
        latest = connection.execute(
            select(func.max(MODEL_VERSIONS.c.version)).where(
                MODEL_VERSIONS.c.model_name == name, MODEL_VERSIONS.c.state == "READY"
            )
        ).scalar()
        model.latest_version = int(latest or 0)
        for alias in connection.execute(select(MODEL_ALIASES).where(MODEL_ALIASES.c.model_name == name)):
            model.aliases[alias.alias] = alias.version
        return model

    # --- model versions --------------------------------------------------------------------------

    def begin_version(
        self, header: registry_pb2.CreateModelVersionRequest.Header, signature: types_pb2.ModelSignature
    ) -> int:
        """Register a PENDING version (the next number for the model) before its bytes arrive."""
        _check_metrics(header.metrics)
        _check_description(header.description)
        for _ in range(5):  # two uploads racing for the same number: the loser takes the next one
            try:
                with self._transaction() as connection:
                    self._model(connection, header.model_name)
                    latest = connection.execute(
                        select(func.max(MODEL_VERSIONS.c.version)).where(
                            MODEL_VERSIONS.c.model_name == header.model_name
                        )
                    ).scalar()
                    version = int(latest or 0) + 1
                    at = now()
                    connection.execute(
                        insert(MODEL_VERSIONS).values(
                            model_name=header.model_name,
                            version=version,
                            state="PENDING",
                            failure_reason="",
                            artifact_sha256="",
                            artifact_size=0,
                            artifact_filename=header.artifact_filename,
                            config_pbtxt=header.config_pbtxt,
                            signature=signature.SerializeToString(),
                            metrics=dict(header.metrics),
                            description=header.description,
                            lineage=_lineage_json(header.lineage),
                            created_at=at,
                            updated_at=at,
                        )
                    )
                    _put_tags(
                        connection,
                        MODEL_VERSION_TAGS,
                        {"model_name": header.model_name, "version": version},
                        header.tags,
                    )
                    return version
            except IntegrityError:
                if self.in_transaction():
                    raise  # the caller's transaction is spoilt by the failed insert: it retries, not us
                continue
        raise FailedPreconditionError(f"model '{header.model_name}': too many concurrent uploads; try again")

    def complete_version(
        self, model_name: str, version: int, sha256: str, size: int, validation: tuple[str, int] = ("", 0)
    ) -> registry_pb2.ModelVersion:
        """READY, with its artifact's blob (and its validation inputs' blob, if any)."""
        with self._transaction() as connection:
            changed = connection.execute(
                update(MODEL_VERSIONS)
                .where(
                    MODEL_VERSIONS.c.model_name == model_name,
                    MODEL_VERSIONS.c.version == version,
                    MODEL_VERSIONS.c.state == "PENDING",
                )
                .values(
                    state="READY",
                    artifact_sha256=sha256,
                    artifact_size=size,
                    validation_sha256=validation[0],
                    validation_size=validation[1],
                    updated_at=now(),
                )
            ).rowcount
            if changed != 1:
                raise FailedPreconditionError(f"model '{model_name}' version {version}: expected PENDING, it is not")
            return self._version(connection, model_name, version)

    def fail_version(self, model_name: str, version: int, reason: str) -> None:
        with self._transaction() as connection:
            connection.execute(
                update(MODEL_VERSIONS)
                .where(
                    MODEL_VERSIONS.c.model_name == model_name,
                    MODEL_VERSIONS.c.version == version,
                    MODEL_VERSIONS.c.state == "PENDING",
                )
                .values(state="FAILED", failure_reason=reason, updated_at=now())
            )

    def fail_pending_versions(self, reason: str) -> int:
        """At start-up: uploads that were in flight when the previous process died can never finish."""
        with self._transaction() as connection:
            return int(
                connection.execute(
                    update(MODEL_VERSIONS)
                    .where(MODEL_VERSIONS.c.state == "PENDING")
                    .values(state="FAILED", failure_reason=reason, updated_at=now())
                ).rowcount
            )

    def get_version(self, model_name: str, version: int) -> registry_pb2.ModelVersion:
        with self._transaction() as connection:
            return self._version(connection, model_name, version)

    def search_versions(
        self,
        model_name: str,
        state: int,
        tags: Mapping[str, str],
        page_size: int,
        page_token: str,
    ) -> tuple[list[registry_pb2.ModelVersion], str]:
        limit = _page_size(page_size)
        _check_tag_filters(tags)
        if len(model_name) > MAX_NAME_LENGTH:
            raise InvalidArgumentError(
                f"model_name: expected at most {MAX_NAME_LENGTH} characters, got {len(model_name)}"
            )
        columns = MODEL_VERSIONS.c
        query = (
            select(columns.model_name, columns.version).order_by(columns.model_name, columns.version).limit(limit + 1)
        )
        if model_name:
            query = query.where(columns.model_name == model_name)
        if state:
            query = query.where(columns.state == _STATE_NAMES[int(state)])
        for key, value in tags.items():
            query = query.where(
                exists().where(
                    and_(
                        MODEL_VERSION_TAGS.c.model_name == columns.model_name,
                        MODEL_VERSION_TAGS.c.version == columns.version,
                        MODEL_VERSION_TAGS.c.key == key,
                        MODEL_VERSION_TAGS.c.value == value,
                    )
                )
            )
        after = _decode_token(page_token)
        if after is not None:
            after_name, after_version = str(after[0]), int(after[1])
            query = query.where(
                (columns.model_name > after_name)
                | and_(columns.model_name == after_name, columns.version > after_version)
            )
        with self._transaction() as connection:
            keys = [(row.model_name, row.version) for row in connection.execute(query)]
            page = [self._version(connection, name, version) for name, version in keys[:limit]]
        next_token = _encode_token(list(keys[limit - 1])) if len(keys) > limit else ""
        return page, next_token

    def update_version(
        self,
        model_name: str,
        version: int,
        description: str | None,
        set_tags: Mapping[str, str],
        delete_tags: Sequence[str],
        set_metrics: Mapping[str, float],
    ) -> registry_pb2.ModelVersion:
        _check_metrics(set_metrics)
        _check_description(description)
        with self._transaction() as connection:
            current = self._version(connection, model_name, version)
            values: dict[str, Any] = {"updated_at": now()}
            if description is not None:
                values["description"] = description
            if set_metrics:
                values["metrics"] = {**dict(current.metrics), **dict(set_metrics)}
            connection.execute(
                update(MODEL_VERSIONS)
                .where(MODEL_VERSIONS.c.model_name == model_name, MODEL_VERSIONS.c.version == version)
                .values(**values)
            )
            key = {"model_name": model_name, "version": version}
            _delete_tags(connection, MODEL_VERSION_TAGS, key, delete_tags)
            _put_tags(connection, MODEL_VERSION_TAGS, key, set_tags)
            return self._version(connection, model_name, version)

    def set_alias(self, model_name: str, alias: str, version: int) -> registry_pb2.ModelVersion:
        _check_name("alias", alias)
        if alias.isdigit():
            raise InvalidArgumentError(f"alias: expected a name that is not a number (versions are), got '{alias}'")
        with self._transaction() as connection:
            target = self._version(connection, model_name, version)
            if target.state != READY:
                raise FailedPreconditionError(
                    f"model '{model_name}' version {version}: expected a READY version for alias '{alias}', "
                    f"it is {_STATE_NAMES.get(target.state, target.state)}"
                )
            # Moving an alias is one statement in one transaction: readers see the old or the new target.
            moved = connection.execute(
                update(MODEL_ALIASES)
                .where(MODEL_ALIASES.c.model_name == model_name, MODEL_ALIASES.c.alias == alias)
                .values(version=version)
            ).rowcount
            if not moved:
                connection.execute(insert(MODEL_ALIASES).values(model_name=model_name, alias=alias, version=version))
            return self._version(connection, model_name, version)

    def delete_alias(self, model_name: str, alias: str) -> None:
        """Delete an alias no endpoint follows (FailedPreconditionError naming them otherwise: the
        endpoints would lose their variant and the data planes would unload it)."""
        with self._transaction() as connection:
            following = self._following(connection, model_name, alias)
            if following:
                raise FailedPreconditionError(
                    f"alias: model '{model_name}' alias '{alias}' is followed by endpoint(s) "
                    f"{', '.join(repr(d.endpoint) for d in following)}: deploy them to a version or another alias "
                    "first, then delete it"
                )
            deleted = connection.execute(
                delete(MODEL_ALIASES).where(MODEL_ALIASES.c.model_name == model_name, MODEL_ALIASES.c.alias == alias)
            ).rowcount
            if not deleted:
                raise NotFoundError(f"alias: model '{model_name}' has no alias '{alias}'")

    def deployments_following(self, model_name: str, alias: str) -> list[deployments_pb2.Deployment]:
        """The deployments with a variant that follows ``model_name``'s ``alias``."""
        with self._transaction() as connection:
            return self._following(connection, model_name, alias)

    def _following(self, connection: Connection, model_name: str, alias: str) -> list[deployments_pb2.Deployment]:
        endpoints = [
            row.endpoint
            for row in connection.execute(select(DEPLOYMENTS.c.endpoint, DEPLOYMENTS.c.variants))
            if any(item.get("model_name") == model_name and item.get("alias") == alias for item in (row.variants or []))
        ]
        return [self._deployment(connection, endpoint) for endpoint in sorted(endpoints)]

    def get_version_by_alias(self, model_name: str, alias: str) -> registry_pb2.ModelVersion:
        with self._transaction() as connection:
            return self._version(connection, model_name, _resolve_alias(connection, model_name, alias))

    def referenced_artifacts(self) -> set[str]:
        with self._transaction() as connection:
            rows = connection.execute(select(MODEL_VERSIONS.c.artifact_sha256, MODEL_VERSIONS.c.validation_sha256))
            return {sha256 for row in rows for sha256 in row if sha256}  # models' and validation inputs' blobs

    def _version(self, connection: Connection, model_name: str, version: int) -> registry_pb2.ModelVersion:
        row = connection.execute(
            select(MODEL_VERSIONS).where(MODEL_VERSIONS.c.model_name == model_name, MODEL_VERSIONS.c.version == version)
        ).first()
        if row is None:
            self._model(connection, model_name)  # NOT_FOUND for the model first, if that is what is missing
            raise NotFoundError(f"version: model '{model_name}' has no version {version}")
        message = registry_pb2.ModelVersion(
            model_name=row.model_name,
            version=row.version,
            state=_STATE_BY_NAME[row.state],
            failure_reason=row.failure_reason,
            artifact_sha256=row.artifact_sha256,
            artifact_size=row.artifact_size,
            artifact_filename=row.artifact_filename,
            config_pbtxt=row.config_pbtxt,
            description=row.description,
            validation_sha256=row.validation_sha256,
            validation_size=row.validation_size,
        )
        message.signature.ParseFromString(row.signature)
        message.metrics.update(row.metrics or {})
        _fill_lineage(message.lineage, row.lineage or {})
        message.created_at.FromDatetime(_utc(row.created_at))
        message.updated_at.FromDatetime(_utc(row.updated_at))
        message.tags.update(
            _tags(
                connection,
                MODEL_VERSION_TAGS,
                and_(MODEL_VERSION_TAGS.c.model_name == model_name, MODEL_VERSION_TAGS.c.version == version),
            )
        )
        aliases = connection.execute(
            select(MODEL_ALIASES.c.alias)
            .where(MODEL_ALIASES.c.model_name == model_name, MODEL_ALIASES.c.version == version)
            .order_by(MODEL_ALIASES.c.alias)
        )
        message.aliases.extend(row.alias for row in aliases)
        return message

    # --- deployments -----------------------------------------------------------------------------

    def deploy(
        self,
        endpoint: str,
        variants: Sequence[deployments_pb2.Variant],
        actor: str,
        routing: deployments_pb2.RoutingPolicy | None = None,
        if_revision: int | None = None,
    ) -> deployments_pb2.Deployment:
        """Create or replace the endpoint's variants (flags stay); every target must resolve to a
        READY version. ``if_revision``: only while the endpoint is still at that revision (a
        rollout's change never overwrites a change made since it read the endpoint)."""
        _check_name("endpoint", endpoint)
        _check_variants(variants)
        with self._transaction() as connection:
            for variant in variants:
                _resolve_variant(connection, self, variant)
            revision = _bump_revision(connection)
            at = now()
            encoded = [_variant_json(variant) for variant in variants]
            values: dict[str, Any] = {"variants": encoded, "revision": revision, "updated_by": actor, "updated_at": at}
            if routing is not None:
                values["routing"] = _routing_json(routing)
            condition = DEPLOYMENTS.c.endpoint == endpoint
            if if_revision is not None:
                condition = and_(condition, DEPLOYMENTS.c.revision == if_revision)
            changed = connection.execute(update(DEPLOYMENTS).where(condition).values(**values)).rowcount
            if not changed and if_revision is not None:
                current = connection.execute(
                    select(DEPLOYMENTS.c.revision).where(DEPLOYMENTS.c.endpoint == endpoint)
                ).scalar()
                raise FailedPreconditionError(
                    f"endpoint '{endpoint}': changed meanwhile (expected revision {if_revision}, "
                    + ("it is undeployed)" if current is None else f"it is at revision {current})")
                )
            if not changed:
                connection.execute(
                    insert(DEPLOYMENTS).values(
                        {"routing": {}, **values, "endpoint": endpoint, "flags": {}, "created_at": at}
                    )
                )
            return self._deployment(connection, endpoint)

    def set_flag(self, endpoint: str, name: str, value: str, actor: str) -> deployments_pb2.Deployment:
        _check_name("name", name)
        with self._transaction() as connection:
            current = self._deployment(connection, endpoint)
            serving = {variant.name for variant in current.variants if not variant.shadow_percent}
            if name == KILL_SWITCH and value and value not in serving:
                raise InvalidArgumentError(
                    f"value: the kill switch must name a variant of '{endpoint}' "
                    f"that serves ({sorted(serving)}), got {value!r}"
                )
            flags = dict(current.flags)
            if value:
                flags[name] = value
            else:
                flags.pop(name, None)
            connection.execute(
                update(DEPLOYMENTS)
                .where(DEPLOYMENTS.c.endpoint == endpoint)
                .values(flags=flags, revision=_bump_revision(connection), updated_by=actor, updated_at=now())
            )
            return self._deployment(connection, endpoint)

    def undeploy(self, endpoint: str) -> None:
        with self._transaction() as connection:
            deleted = connection.execute(delete(DEPLOYMENTS).where(DEPLOYMENTS.c.endpoint == endpoint)).rowcount
            if not deleted:
                raise NotFoundError(f"endpoint: nothing is deployed at '{endpoint}'")
            _bump_revision(connection)

    def get_deployment(self, endpoint: str) -> deployments_pb2.Deployment:
        with self._transaction() as connection:
            return self._deployment(connection, endpoint)

    def list_deployments(self, page_size: int, page_token: str) -> tuple[list[deployments_pb2.Deployment], str]:
        limit = _page_size(page_size)
        query = select(DEPLOYMENTS.c.endpoint).order_by(DEPLOYMENTS.c.endpoint).limit(limit + 1)
        after = _decode_token(page_token)
        if after is not None:
            query = query.where(DEPLOYMENTS.c.endpoint > after[0])
        with self._transaction() as connection:
            endpoints = [row.endpoint for row in connection.execute(query)]
            page = [self._deployment(connection, endpoint) for endpoint in endpoints[:limit]]
        return page, _encode_token([endpoints[limit - 1]]) if len(endpoints) > limit else ""

    def desired_state(self) -> deployments_pb2.DesiredState:
        """Every endpoint with its variants resolved to concrete, READY versions, as one snapshot."""
        with self._transaction() as connection:
            revision = connection.execute(
                select(COUNTERS.c.value).where(COUNTERS.c.name == DESIRED_STATE_REVISION)
            ).scalar()
            state = deployments_pb2.DesiredState(revision=int(revision or 0))
            features = connection.execute(
                select(FEATURE_DEFINITIONS.c.definitions_toml).where(FEATURE_DEFINITIONS.c.id == 1)
            ).scalar()
            state.feature_definitions_toml = features or ""
            for row in connection.execute(select(DEPLOYMENTS).order_by(DEPLOYMENTS.c.endpoint)):
                endpoint = state.endpoints.add(endpoint=row.endpoint, flags=row.flags or {})
                endpoint.routing.CopyFrom(_routing_from_json(row.routing or {}))
                for variant in (_variant_from_json(item) for item in row.variants):
                    try:
                        version = _resolve_variant(connection, self, variant)
                    except (NotFoundError, FailedPreconditionError):
                        continue  # e.g. an alias deleted after the deploy: that variant has no target now
                    endpoint.variants.add(
                        name=variant.name,
                        model=types_pb2.ModelVersionRef(model_name=version.model_name, version=version.version),
                        artifact_sha256=version.artifact_sha256,
                        artifact_size=version.artifact_size,
                        artifact_filename=version.artifact_filename,
                        config_pbtxt=version.config_pbtxt,
                        weight=variant.weight,
                        shadow_percent=variant.shadow_percent,
                    )
            return state

    def touch_revision(self) -> int:
        """Bump the desired-state revision (an alias moved: deployments following it change)."""
        with self._transaction() as connection:
            return _bump_revision(connection)

    def _deployment(self, connection: Connection, endpoint: str) -> deployments_pb2.Deployment:
        row = connection.execute(select(DEPLOYMENTS).where(DEPLOYMENTS.c.endpoint == endpoint)).first()
        if row is None:
            raise NotFoundError(f"endpoint: nothing is deployed at '{endpoint}'")
        message = deployments_pb2.Deployment(
            endpoint=row.endpoint, revision=row.revision, updated_by=row.updated_by, flags=row.flags or {}
        )
        message.routing.CopyFrom(_routing_from_json(row.routing or {}))
        for item in row.variants:
            variant = message.variants.add()
            variant.CopyFrom(_variant_from_json(item))
            try:
                version = _resolve_variant(connection, self, variant)
                message.resolved.add(model_name=version.model_name, version=version.version)
            except (NotFoundError, FailedPreconditionError):
                message.resolved.add(model_name=variant.model_name, version=0)
        message.created_at.FromDatetime(_utc(row.created_at))
        message.updated_at.FromDatetime(_utc(row.updated_at))
        return message

    # --- rollouts --------------------------------------------------------------------------------

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

    # --- training jobs ---------------------------------------------------------------------------

    def insert_job(self, job: training_pb2.Job, secret_sha256: str) -> tuple[training_pb2.Job, bool]:
        """Insert a new job; a known id returns the stored job and False (submission is idempotent)."""
        _check_job_id(job.id)
        with self._transaction() as connection:
            row = connection.execute(select(TRAINING_JOBS.c.job).where(TRAINING_JOBS.c.id == job.id)).first()
            if row is not None:
                return training_pb2.Job.FromString(row.job), False
            job.created_at.FromDatetime(now())
            connection.execute(
                insert(TRAINING_JOBS).values(
                    id=job.id,
                    kind=job.kind,
                    parent_id=job.parent_id,
                    state=training_pb2.Job.State.Name(job.state),
                    created_at=job.created_at.ToDatetime(datetime.UTC),
                    job=job.SerializeToString(),
                    secret_sha256=secret_sha256,
                    pid=0,
                )
            )
            return job, True

    def get_job(self, job_id: str) -> training_pb2.Job:
        with self._transaction() as connection:
            return self._job(connection, job_id)

    def _job(self, connection: Connection, job_id: str) -> training_pb2.Job:
        row = connection.execute(select(TRAINING_JOBS.c.job).where(TRAINING_JOBS.c.id == job_id)).first()
        if row is None:
            raise NotFoundError(f"id: no training job '{job_id}'")
        return training_pb2.Job.FromString(row.job)

    def update_job(
        self, job_id: str, change: Callable[[training_pb2.Job], None], pid: int | None = None
    ) -> training_pb2.Job:
        """Apply ``change`` to the stored job in one transaction. A job in a terminal state never
        changes again: it is returned as it is and ``change`` is not called."""
        with self._transaction() as connection:
            job = self._job(connection, job_id)
            if job.state in TERMINAL_JOB_STATES:
                return job
            change(job)
            values: dict[str, Any] = {"state": training_pb2.Job.State.Name(job.state), "job": job.SerializeToString()}
            if pid is not None:
                values["pid"] = pid
            connection.execute(update(TRAINING_JOBS).where(TRAINING_JOBS.c.id == job_id).values(**values))
            return job

    def job_process(self, job_id: str) -> tuple[int, str]:
        """(launcher pid, secret sha256) of a job."""
        with self._transaction() as connection:
            row = connection.execute(
                select(TRAINING_JOBS.c.pid, TRAINING_JOBS.c.secret_sha256).where(TRAINING_JOBS.c.id == job_id)
            ).first()
        if row is None:
            raise NotFoundError(f"id: no training job '{job_id}'")
        return int(row.pid), row.secret_sha256

    def jobs_in_states(self, *states: int) -> list[training_pb2.Job]:
        """Jobs in any of ``states``, oldest first (the run queue)."""
        names = [training_pb2.Job.State.Name(state) for state in states]
        with self._transaction() as connection:
            rows = connection.execute(
                select(TRAINING_JOBS.c.job)
                .where(TRAINING_JOBS.c.state.in_(names))
                .order_by(TRAINING_JOBS.c.created_at, TRAINING_JOBS.c.id)
            )
            return [training_pb2.Job.FromString(row.job) for row in rows]

    def list_jobs(self, request: training_pb2.ListJobsRequest) -> tuple[list[training_pb2.Job], str]:
        limit = _page_size(request.page_size)
        columns = TRAINING_JOBS.c
        query = select(columns.job, columns.created_at, columns.id).order_by(
            columns.created_at.desc(), columns.id.desc()
        )
        if request.state:
            query = query.where(columns.state == training_pb2.Job.State.Name(request.state))
        if request.kind:
            query = query.where(columns.kind == request.kind)
        if request.parent_id:
            query = query.where(columns.parent_id == request.parent_id)
        after = _decode_token(request.page_token)
        if after is not None:
            moment = datetime.datetime.fromisoformat(after[0])
            query = query.where(
                (columns.created_at < moment) | ((columns.created_at == moment) & (columns.id < after[1]))
            )
        with self._transaction() as connection:
            rows = list(connection.execute(query.limit(limit + 1)))
        jobs = [training_pb2.Job.FromString(row.job) for row in rows[:limit]]
        if len(rows) <= limit:
            return jobs, ""
        last = rows[limit - 1]
        return jobs, _encode_token([_utc(last.created_at).isoformat(), last.id])

    def append_metrics(self, job_id: str, points: Sequence[training_pb2.MetricPoint]) -> None:
        if not points:
            return
        with self._transaction() as connection:
            connection.execute(
                insert(TRAINING_METRICS),
                [
                    {
                        "job_id": job_id,
                        "key": point.key,
                        "step": point.step,
                        "value": point.value,
                        "at": point.at.ToDatetime(datetime.UTC) if point.HasField("at") else now(),
                    }
                    for point in points
                ],
            )

    def job_metrics(self, job_id: str, after_id: int = 0) -> list[tuple[int, training_pb2.MetricPoint]]:
        """Metric points of a job in the order they came, after the point ``after_id``."""
        columns = TRAINING_METRICS.c
        with self._transaction() as connection:
            rows = connection.execute(
                select(TRAINING_METRICS).where(columns.job_id == job_id, columns.id > after_id).order_by(columns.id)
            )
            result = []
            for row in rows:
                point = training_pb2.MetricPoint(key=row.key, step=row.step, value=row.value)
                point.at.FromDatetime(_utc(row.at))
                result.append((int(row.id), point))
            return result

    def step_values(self, parent_id: str, key: str, step: int) -> dict[str, float]:
        """Per trial of a sweep that reached ``step``, its value of ``key`` there."""
        jobs, metrics = TRAINING_JOBS.c, TRAINING_METRICS.c
        query = (
            select(metrics.job_id, metrics.value)
            .join(TRAINING_JOBS, jobs.id == metrics.job_id)
            .where(jobs.parent_id == parent_id, metrics.key == key, metrics.step == step)
            .order_by(metrics.id)
        )
        with self._transaction() as connection:
            latest: dict[str, float] = {}
            for row in connection.execute(query):
                latest[row.job_id] = float(row.value)  # a retried trial may report a step twice: the last counts
            return latest

    def sibling_metrics(self, parent_id: str, key: str, step: int, exclude: str) -> list[float]:
        """The value of ``key`` at ``step`` for each other trial of a sweep that reached it."""
        return [value for job_id, value in self.step_values(parent_id, key, step).items() if job_id != exclude]

    # --- drift monitoring ------------------------------------------------------------------------

    def _upsert(self, connection: Connection, table: Any, key: dict[str, Any], values: dict[str, Any]) -> None:
        """Update the row with ``key``, or insert it (one transaction: the caller's)."""
        condition = [table.c[name] == value for name, value in key.items()]
        if not connection.execute(update(table).where(*condition).values(**values)).rowcount:
            connection.execute(insert(table).values(**key, **values))

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

    # --- feature definitions ---------------------------------------------------------------------

    def apply_features(self, definitions_toml: str, actor: str) -> int:
        """Replace the definitions (already validated); bumps the desired-state revision."""
        with self._transaction() as connection:
            current = connection.execute(
                select(FEATURE_DEFINITIONS.c.revision).where(FEATURE_DEFINITIONS.c.id == 1)
            ).scalar()
            revision = int(current or 0) + 1
            values = {
                "revision": revision,
                "definitions_toml": definitions_toml,
                "updated_by": actor,
                "updated_at": now(),
            }
            self._upsert(connection, FEATURE_DEFINITIONS, {"id": 1}, values)
            _bump_revision(connection)
            return revision

    def feature_definitions(self) -> tuple[int, str]:
        with self._transaction() as connection:
            row = connection.execute(
                select(FEATURE_DEFINITIONS.c.revision, FEATURE_DEFINITIONS.c.definitions_toml).where(
                    FEATURE_DEFINITIONS.c.id == 1
                )
            ).first()
        return (int(row.revision), row.definitions_toml) if row else (0, "")

    # --- A/B tests -------------------------------------------------------------------------------

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

    # --- audit log -------------------------------------------------------------------------------

    def append_audit(self, event: audit_pb2.AuditEvent) -> None:
        with self._transaction() as connection:
            connection.execute(
                insert(AUDIT_EVENTS).values(
                    at=event.at.ToDatetime(datetime.UTC) if event.HasField("at") else now(),
                    actor=event.actor,
                    role=event.role,
                    action=event.action,
                    target=event.target,
                    before=event.before,
                    after=event.after,
                    result=event.result,
                    detail=event.detail,
                    outcome=event.outcome or _outcome_of(event.result),
                    count=max(1, event.count),
                )
            )

    def list_audit(self, request: audit_pb2.ListAuditEventsRequest) -> tuple[list[audit_pb2.AuditEvent], str]:
        limit = _page_size(request.page_size)
        for field in ("actor", "action", "target_prefix", "outcome"):
            if len(getattr(request, field)) > MAX_SEARCH_TEXT:
                raise InvalidArgumentError(
                    f"{field}: expected at most {MAX_SEARCH_TEXT} characters, got {len(getattr(request, field))}"
                )
        columns = AUDIT_EVENTS.c
        query = select(AUDIT_EVENTS).order_by(columns.id.desc()).limit(limit + 1)
        if request.actor:
            query = query.where(columns.actor == request.actor)
        if request.action:
            query = query.where(columns.action == request.action)
        if request.target_prefix:
            query = query.where(columns.target.startswith(request.target_prefix, autoescape=True))
        if request.outcome:
            query = query.where(columns.outcome == request.outcome)
        if request.HasField("since"):
            query = query.where(columns.at >= request.since.ToDatetime(datetime.UTC))
        after = _decode_token(request.page_token)
        if after is not None:
            query = query.where(columns.id < int(after[0]))
        with self._transaction() as connection:
            rows = list(connection.execute(query))
        events = []
        for row in rows[:limit]:
            event = audit_pb2.AuditEvent(
                id=row.id,
                actor=row.actor,
                role=row.role,
                action=row.action,
                target=row.target,
                before=row.before,
                after=row.after,
                result=row.result,
                detail=row.detail,
                outcome=row.outcome or _outcome_of(row.result),
                count=row._mapping["count"],  # not row.count: a Row is a tuple (tuple.count)
            )
            event.at.FromDatetime(_utc(row.at))
            events.append(event)
        return events, _encode_token([rows[limit - 1].id]) if len(rows) > limit else ""


# --- helpers -------------------------------------------------------------------------------------

REFUSED_RESULTS = frozenset(
    {
        "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
        "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED",
    }
)  # fmt: skip


def _outcome_of(result: str) -> str:
    """An event's outcome from its result: ok, refused (the caller's request was turned down and
    nothing changed) or failed."""
    if result == "OK":
        return "ok"
    return "refused" if result in REFUSED_RESULTS else "failed"


# Names of models, endpoints, aliases, variants and flags: they become directory and file names on
# data planes, so one conservative pattern for all of them.
MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_SEARCH_TEXT = 256  # name_contains and similar search strings
MAX_VARIANTS = 16  # per endpoint
MAX_TAGS = 64  # set in one call
MAX_TAG_VALUE = 4096
MAX_DESCRIPTION = 65_536  # a model's or version's description
MAX_WEIGHT = 1_000_000  # a variant's traffic weight


def _check_name(field: str, value: str) -> None:
    if not _NAME.fullmatch(value) or ".." in value:
        raise InvalidArgumentError(
            f"{field}: expected 1-{MAX_NAME_LENGTH} ASCII letters, digits, '_', '.' or '-', starting with a letter "
            f"or digit, without '..', got {_shown(value)}"
        )


def _check_metrics(metrics: Mapping[str, float]) -> None:
    if len(metrics) > MAX_TAGS:
        raise InvalidArgumentError(f"metrics: expected at most {MAX_TAGS}, got {len(metrics)}")
    for name, value in metrics.items():
        if not name or len(name) > MAX_SEARCH_TEXT or any(ord(c) < 32 for c in name):
            raise InvalidArgumentError(
                f"metrics name: expected 1-{MAX_SEARCH_TEXT} characters without control characters, got {_shown(name)}"
            )
        if not math.isfinite(value):
            raise InvalidArgumentError(f"metrics '{name}': expected a finite number, got {value}")


def _check_description(description: str | None) -> None:
    if description is not None and len(description) > MAX_DESCRIPTION:
        raise InvalidArgumentError(
            f"description: expected at most {MAX_DESCRIPTION} characters, got {len(description)}"
        )


def _check_tag_filters(tags: Mapping[str, str]) -> None:
    if len(tags) > 32 or any(len(key) > MAX_SEARCH_TEXT or len(value) > 1024 for key, value in tags.items()):
        raise InvalidArgumentError(
            f"tags: expected at most 32 tag filters, keys of at most {MAX_SEARCH_TEXT} characters and values of "
            f"at most 1024, got {len(tags)} filter(s)"
        )


def check_name(field: str, value: str) -> None:
    """The API edge's check of a model, endpoint or alias name (InvalidArgumentError)."""
    _check_name(field, value)


def _shown(value: str, limit: int = 80) -> str:
    """A client's string for an error message, truncated."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def _check_job_id(value: str) -> None:
    if not value or len(value) > 128 or not all(c.isalnum() or c in "-_." for c in value) or value[0] == ".":
        raise InvalidArgumentError(
            f"id: expected 1-128 letters, digits, '-', '_' or '.' (not starting with '.'), got {value!r}"
        )


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgumentError(f"page_size: expected 0 (default {DEFAULT_PAGE_SIZE}) or more, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_token(position: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def _decode_token(token: str) -> list[Any] | None:
    if not token:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(
            "page_token: expected a token from a previous response, got another string"
        ) from error
    if not isinstance(position, list) or not position:
        raise InvalidArgumentError("page_token: expected a token from a previous response, got another string")
    return position


def _utc(value: datetime.datetime) -> datetime.datetime:
    # SQLite hands timestamps back without their zone; they were stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def _tags(connection: Connection, table: Any, condition: Any) -> dict[str, str]:
    return {row.key: row.value for row in connection.execute(select(table.c.key, table.c.value).where(condition))}


def _put_tags(connection: Connection, table: Any, key: dict[str, Any], tags: Mapping[str, str]) -> None:
    if len(tags) > MAX_TAGS:
        raise InvalidArgumentError(f"tags: expected at most {MAX_TAGS} per call, got {len(tags)}")
    for name, value in tags.items():
        _check_name("tags key", name)
        if len(value) > MAX_TAG_VALUE:
            raise InvalidArgumentError(
                f"tags '{name}' value: expected at most {MAX_TAG_VALUE} characters, got {len(value)}"
            )
        condition = and_(*(table.c[column] == wanted for column, wanted in key.items()), table.c.key == name)
        if not connection.execute(update(table).where(condition).values(value=value)).rowcount:
            connection.execute(insert(table).values(**key, key=name, value=value))


def _delete_tags(connection: Connection, table: Any, key: dict[str, Any], names: Sequence[str]) -> None:
    if names:
        condition = and_(*(table.c[column] == wanted for column, wanted in key.items()), table.c.key.in_(list(names)))
        connection.execute(delete(table).where(condition))


def _lineage_json(lineage: registry_pb2.Lineage) -> dict[str, Any]:
    stored = {
        "source_job": lineage.source_job,
        "parameters": dict(lineage.parameters),
        "dataset_hash": lineage.dataset_hash,
        "code_version": lineage.code_version,
    }
    if lineage.HasField("drift_trigger"):  # a retraining's cause (weir_control.training.registration)
        stored["drift_trigger"] = json_format.MessageToDict(lineage.drift_trigger)
    return stored


def _fill_lineage(target: registry_pb2.Lineage, stored: dict[str, Any]) -> None:
    target.source_job = stored.get("source_job", "")
    target.parameters.update(stored.get("parameters", {}))
    target.dataset_hash = stored.get("dataset_hash", "")
    target.code_version = stored.get("code_version", "")
    if stored.get("drift_trigger"):
        json_format.ParseDict(stored["drift_trigger"], target.drift_trigger, ignore_unknown_fields=True)


def _resolve_alias(connection: Connection, model_name: str, alias: str) -> int:
    version = connection.execute(
        select(MODEL_ALIASES.c.version).where(MODEL_ALIASES.c.model_name == model_name, MODEL_ALIASES.c.alias == alias)
    ).scalar()
    if version is None:
        raise NotFoundError(f"alias: model '{model_name}' has no alias '{alias}'")
    return int(version)


def _resolve_variant(
    connection: Connection, store: Store, variant: deployments_pb2.Variant
) -> registry_pb2.ModelVersion:
    target = variant.WhichOneof("target")
    if target is None:
        raise InvalidArgumentError(f"variant '{variant.name}': expected a version or an alias, got neither")
    number = _resolve_alias(connection, variant.model_name, variant.alias) if target == "alias" else variant.version
    version = store._version(connection, variant.model_name, number)
    if version.state != READY:
        raise FailedPreconditionError(
            f"model '{variant.model_name}' version {number}: expected a READY version to deploy, it is "
            f"{_STATE_NAMES.get(version.state, version.state)}"
            + (f" ({version.failure_reason})" if version.failure_reason else "")
        )
    return version


def _check_variants(variants: Sequence[deployments_pb2.Variant]) -> None:
    if not variants:
        raise InvalidArgumentError("variants: expected at least one variant, got none")
    if len(variants) > MAX_VARIANTS:
        raise InvalidArgumentError(f"variants: expected at most {MAX_VARIANTS}, got {len(variants)}")
    names = [variant.name for variant in variants]
    for variant in variants:
        _check_name(f"variant '{variant.name}' model_name", variant.model_name)
        if variant.weight > MAX_WEIGHT:
            raise InvalidArgumentError(
                f"variant '{variant.name}' weight: expected 0..{MAX_WEIGHT}, got {variant.weight}"
            )
    for name in names:
        _check_name("variants name", name)
        if "@" in name:
            raise InvalidArgumentError(f"variants name: expected no '@' (Weir's separator), got {name!r}")
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"variants: expected unique names, got {names}")
    if not any(variant.weight for variant in variants if not variant.shadow_percent):
        raise InvalidArgumentError(
            f"variants weight: expected at least one serving (non-shadow) variant with a weight above 0, got none "
            f"({names})"
        )
    for variant in variants:
        if variant.shadow_percent > 100:
            raise InvalidArgumentError(
                f"variant '{variant.name}' shadow_percent: expected 0..100, got {variant.shadow_percent}"
            )


def _routing_json(routing: deployments_pb2.RoutingPolicy) -> dict[str, str]:
    return {"key_parameter": routing.key_parameter, "key_header": routing.key_header.lower()}


def _routing_from_json(item: dict[str, Any]) -> deployments_pb2.RoutingPolicy:
    return deployments_pb2.RoutingPolicy(
        key_parameter=item.get("key_parameter", ""), key_header=item.get("key_header", "")
    )


def _variant_json(variant: deployments_pb2.Variant) -> dict[str, Any]:
    item: dict[str, Any] = {"name": variant.name, "model_name": variant.model_name, "weight": variant.weight}
    if variant.shadow_percent:
        item["shadow_percent"] = variant.shadow_percent
    if variant.WhichOneof("target") == "alias":
        item["alias"] = variant.alias
    else:
        item["version"] = variant.version
    return item


def _variant_from_json(item: dict[str, Any]) -> deployments_pb2.Variant:
    variant = deployments_pb2.Variant(
        name=item["name"],
        model_name=item["model_name"],
        weight=item["weight"],
        shadow_percent=item.get("shadow_percent", 0),
    )
    if "alias" in item:
        variant.alias = item["alias"]
    else:
        variant.version = int(item["version"])
    return variant


def _bump_revision(connection: Connection) -> int:
    changed = connection.execute(
        update(COUNTERS).where(COUNTERS.c.name == DESIRED_STATE_REVISION).values(value=COUNTERS.c.value + 1)
    ).rowcount
    if not changed:
        connection.execute(insert(COUNTERS).values(name=DESIRED_STATE_REVISION, value=1))
    return int(
        connection.execute(select(COUNTERS.c.value).where(COUNTERS.c.name == DESIRED_STATE_REVISION)).scalar() or 0
    )
