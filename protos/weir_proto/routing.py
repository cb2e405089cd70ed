"""Sticky assignment of a routing key to a variant, shared by both planes: the data plane routes
requests with it, the control plane attributes A/B outcomes with it, so both always agree.

Weighted rendezvous hashing: every variant scores ``weight / -ln(u)`` with ``u`` a hash of (key,
variant name) in (0, 1); the highest score wins. Deterministic everywhere, and monotone: when a
variant's weight grows while the others' shrink or stay, no key leaves it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

_TWO_TO_64 = float(2**64)


def key_score(key: str, variant: str, weight: float) -> float:
    if weight <= 0:
        return -math.inf
    digest = hashlib.blake2b(f"{key}\0{variant}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "little") + 0.5) / _TWO_TO_64  # strictly inside (0, 1)
    return weight / -math.log(unit)


def variant_for_key(key: str, weighted: Sequence[tuple[str, float]]) -> str:
    """The name, among (name, weight) pairs, that ``key`` sticks to."""
    return max(weighted, key=lambda item: key_score(key, item[0], item[1]))[0]
