"""Deployments: an endpoint's variants (traffic weights, shadows, routing) and its flags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from weir_control.domain.events import Event, ServingChanged
from weir_control.domain.names import check_name
from weir_proto.control.v1 import deployments_pb2
from weir_proto.errors import InvalidArgumentError

KILL_SWITCH = "kill_switch"  # the flag that sends all of an endpoint's traffic to the variant it names
MAX_VARIANTS = 16  # per endpoint
MAX_WEIGHT = 1_000_000  # a variant's traffic weight


def replace_variants(endpoint: str, variants: Sequence[deployments_pb2.Variant]) -> list[Event]:
    """Deploy ``variants`` at ``endpoint`` (create or replace; its flags stay): checked as a whole
    (each target's READY version is the store's to check: it needs the registry)."""
    check_name("endpoint", endpoint)
    check_variants(variants)
    return [ServingChanged((endpoint,), "variants deployed")]


def undeploy(endpoint: str) -> list[Event]:
    return [ServingChanged((endpoint,), "undeployed")]


def set_flag(current: deployments_pb2.Deployment, name: str, value: str) -> tuple[dict[str, str], list[Event]]:
    """The endpoint's flags with ``name`` set to ``value`` (removed when empty). The kill switch
    must name a variant that serves. Flags reach data planes: a change that changes them is heard."""
    check_name("name", name)
    serving = {variant.name for variant in current.variants if not variant.shadow_percent}
    if name == KILL_SWITCH and value and value not in serving:
        raise InvalidArgumentError(
            f"value: the kill switch must name a variant of '{current.endpoint}' "
            f"that serves ({sorted(serving)}), got {value!r}"
        )
    flags = _with(current.flags, name, value)
    return flags, [ServingChanged((current.endpoint,), f"flag '{name}' set")]


def _with(flags: Mapping[str, str], name: str, value: str) -> dict[str, str]:
    changed = dict(flags)
    if value:
        changed[name] = value
    else:
        changed.pop(name, None)
    return changed


def check_variants(variants: Sequence[deployments_pb2.Variant]) -> None:
    if not variants:
        raise InvalidArgumentError("variants: expected at least one variant, got none")
    if len(variants) > MAX_VARIANTS:
        raise InvalidArgumentError(f"variants: expected at most {MAX_VARIANTS}, got {len(variants)}")
    names = [variant.name for variant in variants]
    for variant in variants:
        check_name(f"variant '{variant.name}' model_name", variant.model_name)
        if variant.weight > MAX_WEIGHT:
            raise InvalidArgumentError(
                f"variant '{variant.name}' weight: expected 0..{MAX_WEIGHT}, got {variant.weight}"
            )
    for name in names:
        check_name("variants name", name)
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
