"""What a data plane should do about a desired state, given what it observes: a pure function.

``plan(desired, observed)`` is level-triggered (Kubernetes controllers, Envoy's xDS): it looks at the
whole desired state and the whole observed state every time, never at a diff of events, so the
same call after a reconnect, a superseded install or a restart says the same thing. It does no I/O;
the follower carries out what it says:

- ``routes``: the complete routing table, applied at once (one swap). Flags, the kill switch and
  traffic shares apply whatever installs are pending. An endpoint switches to a new split only once
  every variant it names serves the desired version; until then it keeps its previous split (with
  the new flags). A variant never routes to a version that is not completely loaded.
- ``installs``: variants whose desired artifact is neither serving, nor being installed, nor failed
  already under this desired state.
- ``cancels``: installs in flight that the desired state no longer wants (another version, or the
  variant is gone): a newer state supersedes an older one still being installed.
- ``unloads``: models served that nothing desires and no route points at any more (a variant still
  routed to while its replacement installs is kept until the new split applies).
- ``statuses``: what to report per variant (READY, LOADING, FAILED).
- ``converged``: nothing is left to install; the desired state's revision counts as applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from weir.routing import DEFAULT_KEY_PARAMETER, EndpointRoute, ShadowRoute, VariantRoute, variant_model
from weir_proto.common.v1 import types_pb2
from weir_proto.control.v1 import deployments_pb2

EndpointStatus = deployments_pb2.EndpointStatus


@dataclass(frozen=True)
class Target:
    """An artifact a variant's model serves: a registry model version and the sha256 of its bytes."""

    model_name: str
    version: int
    sha256: str

    @classmethod
    def of(cls, variant: deployments_pb2.ResolvedVariant) -> Target:
        return cls(variant.model.model_name, variant.model.version, variant.artifact_sha256)

    def ref(self) -> types_pb2.ModelVersionRef:
        return types_pb2.ModelVersionRef(model_name=self.model_name, version=self.version)

    def same_version(self, other: Target | None) -> bool:
        return other is not None and (other.model_name, other.version) == (self.model_name, self.version)


@dataclass(frozen=True)
class Observed:
    served: Mapping[str, Target] = field(default_factory=dict)  # model (endpoint@variant) -> what serves
    installing: Mapping[str, Target] = field(default_factory=dict)  # installs in flight
    failed: Mapping[str, tuple[Target, str]] = field(default_factory=dict)  # under this desired state
    routes: Mapping[str, EndpointRoute] = field(default_factory=dict)  # the routing table now


@dataclass(frozen=True)
class Install:
    model: str
    endpoint: str
    variant: deployments_pb2.ResolvedVariant

    @property
    def target(self) -> Target:
        return Target.of(self.variant)


@dataclass(frozen=True)
class Plan:
    routes: dict[str, EndpointRoute]
    installs: tuple[Install, ...] = ()
    cancels: tuple[str, ...] = ()
    unloads: tuple[str, ...] = ()
    statuses: dict[str, deployments_pb2.EndpointStatus] = field(default_factory=dict)
    converged: bool = True


def plan(desired: deployments_pb2.DesiredState, observed: Observed) -> Plan:
    endpoints = {endpoint.endpoint: endpoint for endpoint in desired.endpoints if endpoint.variants}
    wanted: dict[str, tuple[str, deployments_pb2.ResolvedVariant]] = {
        variant_model(name, variant.name): (name, variant)
        for name, endpoint in endpoints.items()
        for variant in endpoint.variants
    }
    installs: list[Install] = []
    statuses: dict[str, deployments_pb2.EndpointStatus] = {}
    for model, (endpoint, variant) in wanted.items():
        target = Target.of(variant)
        served = observed.served.get(model)
        failed = observed.failed.get(model)
        status = EndpointStatus(endpoint=endpoint, variant=variant.name, desired=variant.model)
        if served is not None:
            status.serving.CopyFrom(served.ref())
        if served == target:
            status.state = EndpointStatus.READY
        elif failed is not None and failed[0] == target:
            status.state, status.message = EndpointStatus.FAILED, failed[1]
        else:
            status.state = EndpointStatus.LOADING
            if observed.installing.get(model) != target:
                installs.append(Install(model, endpoint, variant))
        statuses[model] = status
    cancels = [
        model
        for model, target in observed.installing.items()
        if model not in wanted or Target.of(wanted[model][1]) != target
    ]
    routes = {}
    for name, endpoint in endpoints.items():
        route = _route(name, endpoint, observed.served, observed.routes.get(name))
        if route is not None:
            routes[name] = route
    routed = {variant.model for route in routes.values() for variant in route.variants}
    routed |= {shadow.model for route in routes.values() for shadow in route.shadows}
    unloads = [model for model in observed.served if model not in wanted and model not in routed]
    still_installing = any(model in wanted and model not in cancels for model in observed.installing)
    return Plan(
        routes=routes,
        installs=tuple(installs),
        cancels=tuple(sorted(cancels)),
        unloads=tuple(sorted(unloads)),
        statuses=statuses,
        converged=not installs and not still_installing,
    )


def _route(
    name: str,
    endpoint: deployments_pb2.EndpointState,
    served: Mapping[str, Target],
    current: EndpointRoute | None,
) -> EndpointRoute | None:
    """The endpoint's route: the desired split once every variant serves its desired version (or
    when nothing routed there before), else the previous split; the desired flags either way."""
    ready = [
        variant
        for variant in endpoint.variants
        if Target.of(variant).same_version(served.get(variant_model(name, variant.name)))
    ]
    shadows = tuple(
        ShadowRoute(variant.name, variant_model(name, variant.name), variant.shadow_percent)
        for variant in ready
        if variant.shadow_percent
    )
    if len(ready) == len(endpoint.variants) or current is None:
        variants = tuple(
            VariantRoute(variant.name, variant_model(name, variant.name), variant.weight)
            for variant in ready
            if not variant.shadow_percent
        )
    else:
        variants = current.variants
    if not variants:
        return current  # nothing can answer under the desired split yet: what routed there keeps routing
    return EndpointRoute(
        name,
        variants,
        flags=dict(endpoint.flags),
        key_parameter=endpoint.routing.key_parameter or DEFAULT_KEY_PARAMETER,
        key_header=endpoint.routing.key_header.lower(),
        shadows=shadows,
    )
