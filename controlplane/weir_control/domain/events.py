"""What a transition reports besides its new state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ServingChanged:
    """What these endpoints serve changed: the desired-state revision must move (once per change)."""

    endpoints: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class AliasMoved:
    model_name: str
    alias: str
    before: int | None  # None: the alias is new
    after: int


@dataclass(frozen=True)
class AliasDeleted:
    model_name: str
    alias: str


Event = ServingChanged | AliasMoved | AliasDeleted


def serving_changed(events: Sequence[Event]) -> bool:
    """Whether data planes must hear of the change (the store then bumps the revision)."""
    return any(isinstance(event, ServingChanged) for event in events)
