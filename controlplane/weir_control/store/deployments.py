"""Deployment records and the desired state: what every endpoint serves, and the snapshot data planes follow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, and_, delete, insert, select, update

from weir_control.domain import deployments as domain
from weir_control.domain.events import serving_changed
from weir_control.store.db import (
    DESIRED_STATE_REVISION,
    _decode_token,
    _encode_token,
    _page_size,
    _utc,
    bump_revision,
    now,
    retried,
)
from weir_control.store.registry import _STATE_NAMES, READY, RegistryRecords, _resolve_alias, endpoints_following
from weir_control.store.schema import COUNTERS, DEPLOYMENTS, FEATURE_DEFINITIONS
from weir_proto.common.v1 import types_pb2
from weir_proto.control.v1 import deployments_pb2, registry_pb2
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError


class DeploymentRecords(RegistryRecords):
    """Deployments (endpoints, variants, flags, routing) and the desired state data planes follow."""

    # --- deployments -----------------------------------------------------------------------------

    @retried
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
        events = domain.replace_variants(endpoint, variants)
        with self._transaction() as connection:
            for variant in variants:
                _resolve_variant(connection, self, variant)
            revision = bump_revision(connection) if serving_changed(events) else None
            at = now()
            encoded = [_variant_json(variant) for variant in variants]
            values: dict[str, Any] = {"variants": encoded, "updated_by": actor, "updated_at": at}
            if revision is not None:
                values["revision"] = revision
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

    @retried
    def set_flag(self, endpoint: str, name: str, value: str, actor: str) -> deployments_pb2.Deployment:
        with self._transaction() as connection:
            flags, events = domain.set_flag(self._deployment(connection, endpoint), name, value)
            values: dict[str, Any] = {"flags": flags, "updated_by": actor, "updated_at": now()}
            if serving_changed(events):
                values["revision"] = bump_revision(connection)
            connection.execute(update(DEPLOYMENTS).where(DEPLOYMENTS.c.endpoint == endpoint).values(**values))
            return self._deployment(connection, endpoint)

    @retried
    def undeploy(self, endpoint: str) -> None:
        with self._transaction() as connection:
            deleted = connection.execute(delete(DEPLOYMENTS).where(DEPLOYMENTS.c.endpoint == endpoint)).rowcount
            if not deleted:
                raise NotFoundError(f"endpoint: nothing is deployed at '{endpoint}'")
            if serving_changed(domain.undeploy(endpoint)):
                bump_revision(connection)

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

    def deployments_following(self, model_name: str, alias: str) -> list[deployments_pb2.Deployment]:
        """The deployments with a variant that follows ``model_name``'s ``alias``."""
        with self._transaction() as connection:
            return self._following(connection, model_name, alias)

    def _following(self, connection: Connection, model_name: str, alias: str) -> list[deployments_pb2.Deployment]:
        endpoints = endpoints_following(connection, model_name, alias)
        return [self._deployment(connection, endpoint) for endpoint in endpoints]


def _resolve_variant(
    connection: Connection, store: RegistryRecords, variant: deployments_pb2.Variant
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
