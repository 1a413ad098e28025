"""Hypothesis profiles and the ``backend`` fixture, parametrized over every known backend.

Profiles: ``dev`` (the default: quick, random), ``ci`` (derandomized, no deadline, more
examples) and ``stress`` (2000 examples, by hand); choose with ``--hypothesis-profile=ci``
or ``HYPOTHESIS_PROFILE=ci``.
A backend that is not installed is skipped with its reason, unless it is listed in
``BNREF_REQUIRE`` (comma-separated, or ``all``): then its absence is an error.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from bnref.testing import KNOWN_BACKENDS, load_backend, required_backends
from bnref.testing.backends import is_installed

settings.register_profile(
    "ci", max_examples=100, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def backend_or_skip(name: str):
    """The adapter for ``name``; a missing framework skips, or fails when required."""
    if not is_installed(name):
        framework = KNOWN_BACKENDS[name].framework
        if name in required_backends():
            pytest.fail(f"backend {name!r} is required (BNREF_REQUIRE) but {framework!r} "
                        "is not installed", pytrace=False)
        pytest.skip(f"{framework!r} is not installed")
    return load_backend(name)


@pytest.fixture(scope="session")
def backend(request):
    return backend_or_skip(request.param)


def pytest_generate_tests(metafunc):
    """``backend`` runs over every known backend; tests that also take ``builtin_name`` run
    once per (backend, built-in) pair."""
    if "builtin_name" in metafunc.fixturenames:
        pairs = [(info.name, builtin) for info in KNOWN_BACKENDS.values()
                 for builtin in info.builtins]
        metafunc.parametrize(["backend", "builtin_name"], pairs, indirect=["backend"],
                             ids=[f"{name}-{builtin}" for name, builtin in pairs],
                             scope="session")
    elif "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", list(KNOWN_BACKENDS), indirect=True, ids=str,
                             scope="session")
# For hunting tolerance bugs by hand, not for CI.
settings.register_profile(
    "stress", max_examples=2000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
