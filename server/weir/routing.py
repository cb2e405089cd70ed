"""Traffic policy: which variant of an endpoint serves a request.

An endpoint (the model name clients call) maps to variants, each a model in the repository named
``<endpoint>@<variant>``, with weights. The table is an immutable snapshot; ``Router.swap`` replaces
it in one assignment, so a request sees the old table or the new one, never a mix.

Choice, in order:
1. a pin (request parameter ``weir_variant``, allowed by the caller's role) names the variant;
2. the ``kill_switch`` flag sends everything to the variant it names;
3. a request with a routing key goes where weighted rendezvous hashing puts it: every variant scores
   ``weight / -ln(u)`` with ``u`` a hash of (key, variant name) in (0, 1), the highest wins. The same
   on every replica (no shared state), and monotone: when a variant's weight grows while the others'
   shrink or stay, no key leaves it (a key on the canary at 10% stays there at 25%);
4. otherwise a weighted random draw.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from weir.errors import InvalidArgumentError, NotFoundError, clip, clip_repr
from weir_proto.routing import key_score

SEPARATOR = "@"  # endpoint@variant: the repository model that serves a variant
PIN_PARAMETER = "weir_variant"  # request parameter that pins a variant; the response names the variant here
KILL_SWITCH = "kill_switch"
DEFAULT_KEY_PARAMETER = "routing_key"


def variant_model(endpoint: str, variant: str) -> str:
    return f"{endpoint}{SEPARATOR}{variant}"


@dataclass(frozen=True)
class VariantRoute:
    name: str
    model: str  # the repository model serving it
    weight: int


@dataclass(frozen=True)
class ShadowRoute:
    name: str
    model: str
    percent: int  # of the endpoint's computed requests mirrored to it


@dataclass(frozen=True)
class EndpointRoute:
    endpoint: str
    variants: tuple[VariantRoute, ...]  # the ones that answer callers
    flags: Mapping[str, str] = field(default_factory=dict)
    shadows: tuple[ShadowRoute, ...] = ()
    key_parameter: str = DEFAULT_KEY_PARAMETER
    key_header: str = ""  # lowercase gRPC metadata key, "" = none

    def __post_init__(self) -> None:
        by_name = {variant.name: variant for variant in self.variants}
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_total", sum(variant.weight for variant in self.variants))

    def variant(self, name: str) -> VariantRoute | None:
        return self._by_name.get(name)  # type: ignore[attr-defined]

    @property
    def default_variant(self) -> VariantRoute:
        """The one metadata and readiness describe: the kill switch's target, else the heaviest."""
        fallback = self.variant(self.flags.get(KILL_SWITCH, ""))
        return fallback or max(self.variants, key=lambda variant: variant.weight)

    def choose(self, key: str | None, pinned: str | None, draw: Callable[[], float] = random.random) -> VariantRoute:
        if pinned:
            chosen = self.variant(pinned)
            if chosen is None:
                raise InvalidArgumentError(
                    f"parameters['{PIN_PARAMETER}']: expected a variant of '{self.endpoint}' "
                    f"({sorted(variant.name for variant in self.variants)}), got {clip_repr(pinned)}"
                )
            return chosen
        fallback = self.variant(self.flags.get(KILL_SWITCH, ""))
        if fallback is not None:
            return fallback
        if key is not None:
            return max(self.variants, key=lambda variant: key_score(key, variant.name, variant.weight))
        point = draw() * self._total  # type: ignore[attr-defined]
        for variant in self.variants:
            point -= variant.weight
            if point < 0:
                return variant
        return next(variant for variant in reversed(self.variants) if variant.weight)


class Router:
    def __init__(self) -> None:
        self._table: Mapping[str, EndpointRoute] = {}

    def swap(self, table: Mapping[str, EndpointRoute]) -> None:
        self._table = dict(table)

    def update(self, route: EndpointRoute) -> None:
        """Replace one endpoint's route (a new snapshot of the whole table)."""
        self._table = {**self._table, route.endpoint: route}

    def remove(self, endpoint: str) -> None:
        self._table = {name: route for name, route in self._table.items() if name != endpoint}

    def get(self, endpoint: str) -> EndpointRoute | None:
        return self._table.get(endpoint)

    def table(self) -> Mapping[str, EndpointRoute]:
        return self._table


def routing_key(value: object) -> str:
    """A request's routing key parameter as text (strings and integers; bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidArgumentError(f"routing key parameter: expected a string or an integer, got {clip_repr(value)}")
    return str(value)


def require_route(router: Router, endpoint: str) -> EndpointRoute:
    route = router.get(endpoint)
    if route is None:
        raise NotFoundError(f"model_name: unknown endpoint '{clip(endpoint)}'")
    return route
