"""Registry records: registered models, model versions, their tags and aliases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format
from sqlalchemy import Connection, and_, delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from weir_control.domain import aliases
from weir_control.domain.events import serving_changed
from weir_control.store.db import (
    MAX_NAME_LENGTH,
    MAX_SEARCH_TEXT,
    Database,
    _check_description,
    _check_metrics,
    _check_name,
    _check_tag_filters,
    _decode_token,
    _encode_token,
    _page_size,
    _utc,
    bump_revision,
    now,
    retried,
    upsert,
)
from weir_control.store.schema import (
    DEPLOYMENTS,
    MODEL_ALIASES,
    MODEL_VERSION_TAGS,
    MODEL_VERSIONS,
    REGISTERED_MODEL_TAGS,
    REGISTERED_MODELS,
)
from weir_proto.common.v1 import types_pb2
from weir_proto.control.v1 import registry_pb2
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

READY = registry_pb2.ModelVersion.READY
PENDING = registry_pb2.ModelVersion.PENDING
FAILED = registry_pb2.ModelVersion.FAILED
_STATE_NAMES: dict[int, str] = {PENDING: "PENDING", READY: "READY", FAILED: "FAILED"}
_STATE_BY_NAME: dict[str, Any] = {name: state for state, name in _STATE_NAMES.items()}
MAX_TAGS = 64  # set in one call
MAX_TAG_VALUE = 4096


class RegistryRecords(Database):
    """Registered models, their versions, tags and aliases."""

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

    @retried
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

    @retried
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

    @retried
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

    @retried
    def set_alias(self, model_name: str, alias: str, version: int) -> registry_pb2.ModelVersion:
        aliases.check_alias_name(alias)
        with self._transaction() as connection:
            target = self._version(connection, model_name, version)
            before = _alias_target(connection, model_name, alias)
            after, events = aliases.move_alias(
                alias, before, target, endpoints_following(connection, model_name, alias)
            )
            # Moving an alias is one statement in one transaction: readers see the old or the new target.
            upsert(connection, MODEL_ALIASES, {"model_name": model_name, "alias": alias}, {"version": after})
            if serving_changed(events):
                bump_revision(connection)  # the endpoints following it now serve another version
            return self._version(connection, model_name, version)

    @retried
    def delete_alias(self, model_name: str, alias: str) -> None:
        """Delete an alias no endpoint follows (FailedPreconditionError naming them otherwise: the
        endpoints would lose their variant and the data planes would unload it)."""
        with self._transaction() as connection:
            exists = _alias_target(connection, model_name, alias) is not None
            events = aliases.delete_alias(model_name, alias, exists, endpoints_following(connection, model_name, alias))
            connection.execute(
                delete(MODEL_ALIASES).where(MODEL_ALIASES.c.model_name == model_name, MODEL_ALIASES.c.alias == alias)
            )
            assert not serving_changed(events)  # a followed alias is never deleted

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


def endpoints_following(connection: Connection, model_name: str, alias: str) -> list[str]:
    """The endpoints (sorted) with a variant that follows ``model_name``'s ``alias``."""
    rows = connection.execute(select(DEPLOYMENTS.c.endpoint, DEPLOYMENTS.c.variants))
    return sorted(
        row.endpoint
        for row in rows
        if any(item.get("model_name") == model_name and item.get("alias") == alias for item in (row.variants or []))
    )


def _alias_target(connection: Connection, model_name: str, alias: str) -> int | None:
    version = connection.execute(
        select(MODEL_ALIASES.c.version).where(MODEL_ALIASES.c.model_name == model_name, MODEL_ALIASES.c.alias == alias)
    ).scalar()
    return None if version is None else int(version)
