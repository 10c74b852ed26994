"""The Sendarix test suite (run with trial; see README.md)."""

import os

from hypothesis import HealthCheck, settings

# CI: bounded examples and no per-example deadline (2 shared cores are noisy).
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
