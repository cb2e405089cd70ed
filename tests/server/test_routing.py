"""weir.routing: sticky, monotone weighted rendezvous hashing; weighted spread without a key; pins;
the kill switch."""

from __future__ import annotations

import random

import pytest

from weir.errors import InvalidArgumentError
from weir.routing import EndpointRoute, VariantRoute, variant_model


def route(canary: int, stable: int, **flags: str) -> EndpointRoute:
    return EndpointRoute(
        "web",
        (VariantRoute("canary", variant_model("web", "canary"), canary), VariantRoute("stable", "web@stable", stable)),
        flags=flags,
    )


KEYS = [f"user-{index}" for index in range(20000)]


def test_sticky_keys_never_leave_a_growing_canary_and_follow_its_weight() -> None:
    previous: set[str] = set()
    for weight in (5, 10, 25, 50, 75, 100):
        table = route(weight, 100 - weight)
        on_canary = {key for key in KEYS if table.choose(key, None).name == "canary"}
        assert previous <= on_canary, f"keys left the canary when it grew to {weight}%"
        assert abs(len(on_canary) / len(KEYS) - weight / 100) < 0.02
        previous = on_canary


def test_the_same_key_gets_the_same_variant_every_time_and_everywhere() -> None:
    first, second = route(30, 70), route(30, 70)  # two replicas build their own tables
    assert [first.choose(key, None).name for key in KEYS[:500]] == [second.choose(key, None).name for key in KEYS[:500]]


def test_requests_without_a_key_are_spread_by_weight() -> None:
    draws = random.Random(3)
    table = route(20, 80)
    chosen = [table.choose(None, None, draws.random).name for _ in range(20000)]
    assert abs(chosen.count("canary") / len(chosen) - 0.2) < 0.02
    assert {table.choose(None, None, draws.random).name for _ in range(100)} == {"canary", "stable"}
    assert all(route(0, 100).choose(None, None, draws.random).name == "stable" for _ in range(200))


def test_a_pin_and_the_kill_switch_override_weights_and_keys() -> None:
    table = route(0, 100)
    assert table.choose("user-1", "canary").name == "canary"
    with pytest.raises(InvalidArgumentError, match="expected a variant of 'web'"):
        table.choose(None, "ghost")
    killed = route(90, 10, kill_switch="stable")
    assert {killed.choose(key, None).name for key in KEYS[:200]} == {"stable"}
    assert killed.default_variant.name == "stable" and route(90, 10).default_variant.name == "canary"
