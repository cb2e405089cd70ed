"""Aliases: a model's named pointer to one of its READY versions, which endpoints may follow."""

from __future__ import annotations

from collections.abc import Sequence

from weir_control.domain.events import AliasDeleted, AliasMoved, Event, ServingChanged
from weir_control.domain.names import check_name
from weir_proto.control.v1 import registry_pb2
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

_STATE_NAMES = {registry_pb2.ModelVersion.PENDING: "PENDING", registry_pb2.ModelVersion.FAILED: "FAILED"}


def check_alias_name(alias: str) -> None:
    check_name("alias", alias)
    if alias.isdigit():
        raise InvalidArgumentError(f"alias: expected a name that is not a number (versions are), got '{alias}'")


def move_alias(
    alias: str, before: int | None, target: registry_pb2.ModelVersion, followers: Sequence[str]
) -> tuple[int, list[Event]]:
    """Point ``alias`` of ``target``'s model at ``target`` (from ``before``, None if new). The
    endpoints in ``followers`` serve through it: if it moves, what they serve changes."""
    check_alias_name(alias)
    if target.state != registry_pb2.ModelVersion.READY:
        raise FailedPreconditionError(
            f"model '{target.model_name}' version {target.version}: expected a READY version for alias '{alias}', "
            f"it is {_STATE_NAMES.get(target.state, target.state)}"
        )
    if before == target.version:
        return before, []  # already there: nothing changes, nobody needs to hear
    events: list[Event] = [AliasMoved(target.model_name, alias, before, target.version)]
    if followers:
        events.append(
            ServingChanged(tuple(followers), f"model '{target.model_name}' alias '{alias}' moved to {target.version}")
        )
    return target.version, events


def delete_alias(model_name: str, alias: str, exists: bool, followers: Sequence[str]) -> list[Event]:
    """Delete an alias no endpoint follows: deleting one that is followed would take the endpoints'
    variant away (refused, naming them), so a deletion never changes what data planes serve."""
    if followers:
        raise FailedPreconditionError(
            f"alias: model '{model_name}' alias '{alias}' is followed by endpoint(s) "
            f"{', '.join(repr(endpoint) for endpoint in followers)}: deploy them to a version or another "
            "alias first, then delete it"
        )
    if not exists:
        raise NotFoundError(f"alias: model '{model_name}' has no alias '{alias}'")
    return [AliasDeleted(model_name, alias)]
