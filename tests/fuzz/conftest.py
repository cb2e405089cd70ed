"""Hypothesis profiles for the property-based tests.

``ci`` (the default) keeps this directory's share of the suite to a couple of minutes and is
deterministic (derandomized, no example database), so a CI failure reproduces as it is.
``long`` is for local hunting: ``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/fuzz``
runs FUZZ_SCALE times more examples per test, randomized, remembering failures under build/.
Every input that ever found a bug is an explicit ``@example`` on its test and runs in every profile.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_COMMON = {
    "deadline": None,  # no timed asserts: a slow machine must not fail a test
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    "print_blob": True,
}
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("long", database=DirectoryBasedExampleDatabase("build/hypothesis"), **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
