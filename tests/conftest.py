"""Hypothesis profiles, and the ``backend`` fixture over every known backend.

Profiles: ``dev`` (the default: quick, random), ``ci`` (derandomized, no deadline, more
examples) and ``stress`` (2000 examples, by hand); choose with ``--hypothesis-profile=ci``
or ``HYPOTHESIS_PROFILE=ci``. A backend that is not installed is skipped with its reason,
unless ``BNREF_REQUIRE`` names it (comma-separated, or ``all``): then its absence is an error.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from bnref.testing.fixtures import backend, pair, pytest_generate_tests  # noqa: F401

_quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None,
                          print_blob=True, suppress_health_check=_quiet)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=_quiet)
# For hunting tolerance bugs by hand, not for CI.
settings.register_profile("stress", max_examples=2000, deadline=None,
                          suppress_health_check=_quiet)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config) -> None:
    """The shared suite's properties follow this run's profile (``--hypothesis-profile=ci``
    runs them at bnref's ``ci`` too), unless ``--bnref-profile`` or ``BNREF_PROFILE`` chose
    one."""
    from bnref.testing import profiles

    chosen = (config.getoption("hypothesis_profile", None)
              or os.environ.get("HYPOTHESIS_PROFILE", "dev"))
    explicit = config.getoption("bnref_profile", None) or os.environ.get("BNREF_PROFILE")
    if not explicit and chosen in profiles.PROFILES:
        profiles.use_profile(chosen)
