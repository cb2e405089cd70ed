"""How many examples each property runs: the CI count, times 50 under HYPOTHESIS_PROFILE=long."""

from __future__ import annotations

import os

SCALE = 50 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 1


def examples(ci_count: int) -> int:
    return ci_count * SCALE
