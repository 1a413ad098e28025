"""The pytest plugin that comes with bnref (registered as the ``pytest11`` entry point
``bnref``, so installing bnref is enough; without the entry point, add
``pytest_plugins = ["bnref.testing.pytest_plugin"]`` to a ``conftest.py``).

It registers bnref's Hypothesis profiles (:mod:`bnref.testing.profiles`) and adds
``--bnref-profile={dev,ci,stress}``, the profile the shared suite's properties run (default
``ci``: 100 derandomized examples, no deadline). It changes nothing for tests that do not use
bnref's suite.
"""

from __future__ import annotations

from bnref.testing import profiles


def pytest_addoption(parser) -> None:
    group = parser.getgroup("bnref")
    group.addoption("--bnref-profile", choices=sorted(profiles.PROFILES), default=None,
                    help="Hypothesis profile for bnref's property suite (default: "
                         "$BNREF_PROFILE, else ci)")


def pytest_configure(config) -> None:
    profiles.register_profiles()
    chosen = config.getoption("bnref_profile", None)
    if chosen is not None:
        profiles.use_profile(chosen)


def pytest_report_header(config) -> str:
    return f"bnref: property suite profile {profiles.active_profile()!r}"
