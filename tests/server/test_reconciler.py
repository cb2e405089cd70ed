"""plan(desired, observed): what a data plane does about a desired state, without gRPC or disk."""

from __future__ import annotations

from weir.reconciler import Observed, Target, plan
from weir.routing import KILL_SWITCH, EndpointRoute, VariantRoute
from weir_proto.common.v1 import types_pb2
from weir_proto.control.v1 import deployments_pb2

EndpointStatus = deployments_pb2.EndpointStatus


def variant(name: str, model: str, version: int, weight: int = 100, shadow: int = 0) -> deployments_pb2.ResolvedVariant:
    return deployments_pb2.ResolvedVariant(
        name=name,
        model=types_pb2.ModelVersionRef(model_name=model, version=version),
        weight=weight,
        shadow_percent=shadow,
        artifact_sha256=f"sha-{model}-{version}",
        artifact_filename="model.pt",
    )


def endpoint(name: str, *variants: deployments_pb2.ResolvedVariant, **flags: str) -> deployments_pb2.EndpointState:
    return deployments_pb2.EndpointState(endpoint=name, variants=variants, flags=flags)


def desired(revision: int, *endpoints: deployments_pb2.EndpointState) -> deployments_pb2.DesiredState:
    return deployments_pb2.DesiredState(revision=revision, endpoints=endpoints)


def target(model: str, version: int) -> Target:
    return Target(model, version, f"sha-{model}-{version}")


def route(name: str, *variants: tuple[str, int], **flags: str) -> EndpointRoute:
    return EndpointRoute(name, tuple(VariantRoute(v, f"{name}@{v}", w) for v, w in variants), flags=flags)


def states(statuses: dict[str, deployments_pb2.EndpointStatus]) -> dict[str, str]:
    return {model: EndpointStatus.State.Name(status.state) for model, status in statuses.items()}


def test_a_new_variant_is_installed_and_not_routed_to_until_it_serves() -> None:
    state = desired(1, endpoint("scale", variant("main", "scale", 1)))
    first = plan(state, Observed())
    assert [(install.model, install.target) for install in first.installs] == [("scale@main", target("scale", 1))]
    assert first.routes == {} and not first.converged
    assert states(first.statuses) == {"scale@main": "LOADING"}

    installing = plan(state, Observed(installing={"scale@main": target("scale", 1)}))
    assert installing.installs == () and installing.cancels == () and not installing.converged

    served = plan(state, Observed(served={"scale@main": target("scale", 1)}))
    assert served.routes == {"scale": route("scale", ("main", 100))}
    assert served.installs == () and served.converged
    assert states(served.statuses) == {"scale@main": "READY"}


def test_a_removed_variant_is_unloaded_once_no_route_points_at_it() -> None:
    served = {"scale@main": target("scale", 1), "scale@canary": target("scale", 2)}
    current = {"scale": route("scale", ("main", 90), ("canary", 10))}
    actions = plan(desired(2, endpoint("scale", variant("main", "scale", 1))), Observed(served, routes=current))
    assert actions.routes == {"scale": route("scale", ("main", 100))}
    assert actions.unloads == ("scale@canary",)
    assert set(actions.statuses) == {"scale@main"} and actions.converged


def test_an_undeployed_endpoint_leaves_the_table_and_its_models_unload() -> None:
    served = {"scale@main": target("scale", 1)}
    actions = plan(desired(3), Observed(served, routes={"scale": route("scale", ("main", 100))}))
    assert actions.routes == {} and actions.unloads == ("scale@main",) and actions.statuses == {}


def test_a_variant_replaced_while_its_successor_installs_keeps_serving_until_the_new_split_applies() -> None:
    served = {"scale@main": target("scale", 1), "scale@old": target("scale", 2)}
    current = {"scale": route("scale", ("main", 50), ("old", 50))}
    state = desired(4, endpoint("scale", variant("main", "scale", 1, 50), variant("new", "scale", 3, 50)))
    actions = plan(state, Observed(served, routes=current))
    assert actions.routes == current and actions.unloads == ()  # "old" is still routed to
    assert [install.model for install in actions.installs] == ["scale@new"]
    done = plan(state, Observed({**served, "scale@new": target("scale", 3)}, routes=actions.routes))
    assert done.routes == {"scale": route("scale", ("main", 50), ("new", 50))} and done.unloads == ("scale@old",)


def test_a_traffic_change_alone_routes_at_once_and_installs_nothing() -> None:
    served = {"scale@main": target("scale", 1), "scale@canary": target("scale", 2)}
    current = {"scale": route("scale", ("main", 90), ("canary", 10))}
    state = desired(5, endpoint("scale", variant("main", "scale", 1, 50), variant("canary", "scale", 2, 50)))
    actions = plan(state, Observed(served, routes=current))
    assert actions.routes == {"scale": route("scale", ("main", 50), ("canary", 50))}
    assert actions.installs == () and actions.cancels == () and actions.unloads == () and actions.converged


def test_a_kill_switch_applies_while_another_version_of_the_endpoint_installs() -> None:
    served = {"scale@main": target("scale", 1), "scale@canary": target("scale", 2)}
    current = {"scale": route("scale", ("main", 90), ("canary", 10))}
    installing = {"scale@canary": target("scale", 3)}  # the canary's next version is on its way
    state = desired(
        6,
        endpoint("scale", variant("main", "scale", 1, 90), variant("canary", "scale", 3, 10), **{KILL_SWITCH: "main"}),
    )
    actions = plan(state, Observed(served, installing=installing, routes=current))
    assert actions.routes["scale"].flags == {KILL_SWITCH: "main"}
    assert actions.routes["scale"].variants == current["scale"].variants  # the old split until the install ends
    assert actions.installs == () and actions.cancels == () and not actions.converged
    assert states(actions.statuses) == {"scale@main": "READY", "scale@canary": "LOADING"}


def test_a_newer_state_supersedes_an_install_still_running() -> None:
    served = {"scale@main": target("scale", 1)}
    current = {"scale": route("scale", ("main", 100))}
    installing = {"scale@main": target("scale", 2), "other@main": target("other", 1)}
    state = desired(7, endpoint("scale", variant("main", "scale", 3)))  # version 3 now; "other" is gone
    actions = plan(state, Observed(served, installing=installing, routes=current))
    assert actions.cancels == ("other@main", "scale@main")
    assert [(install.model, install.target) for install in actions.installs] == [("scale@main", target("scale", 3))]
    assert actions.routes == current  # version 1 serves until version 3 does: never a half-installed one
    status = actions.statuses["scale@main"]
    assert (status.state, status.desired.version, status.serving.version) == (EndpointStatus.LOADING, 3, 1)


def test_a_rollback_to_what_serves_cancels_the_install_and_converges() -> None:
    served = {"scale@main": target("scale", 1)}
    actions = plan(
        desired(8, endpoint("scale", variant("main", "scale", 1))),
        Observed(served, installing={"scale@main": target("scale", 2)}),
    )
    assert actions.cancels == ("scale@main",) and actions.installs == () and actions.converged


def test_a_failed_version_is_reported_and_not_retried_under_the_same_state() -> None:
    served = {"scale@main": target("scale", 1)}
    current = {"scale": route("scale", ("main", 100))}
    failed = {"scale@main": (target("scale", 2), "warm-up failed")}
    actions = plan(desired(9, endpoint("scale", variant("main", "scale", 2))), Observed(served, failed=failed,
                                                                                        routes=current))  # fmt: skip
    assert actions.installs == () and actions.converged and actions.routes == current
    status = actions.statuses["scale@main"]
    assert (status.state, status.message, status.serving.version) == (EndpointStatus.FAILED, "warm-up failed", 1)


def test_the_same_version_with_other_bytes_is_installed_again_but_keeps_routing() -> None:
    served = {"scale@main": Target("scale", 1, "sha-before")}
    actions = plan(desired(10, endpoint("scale", variant("main", "scale", 1))), Observed(served))
    assert [install.model for install in actions.installs] == ["scale@main"]
    assert actions.routes == {"scale": route("scale", ("main", 100))}


def test_a_first_deploy_routes_to_the_variants_ready_so_far_and_shadows_never_answer() -> None:
    state = desired(
        11,
        endpoint("scale", variant("a", "scale", 1, 50), variant("b", "scale", 2, 50), variant("s", "scale", 3, 0, 10)),
    )
    actions = plan(state, Observed({"scale@a": target("scale", 1), "scale@s": target("scale", 3)}))
    assert actions.routes["scale"].variants == (VariantRoute("a", "scale@a", 50),)
    assert [shadow.name for shadow in actions.routes["scale"].shadows] == ["s"]
    assert [install.model for install in actions.installs] == ["scale@b"]
