"""bnref's Hypothesis profiles, shipped with the package so the shared suite never runs on
Hypothesis's defaults (a 200 ms deadline fails a framework's first, compiling call).

=========  ============  ============  =============================================
profile    max_examples  derandomize   for
=========  ============  ============  =============================================
``dev``    25            no            quick local runs
``ci``     100           yes           the default: what CI and ``bnref check`` rely on
``stress`` 2000          no            hunting tolerance bugs by hand
=========  ============  ============  =============================================

All three have no deadline and tolerate slow or large draws. They are registered as
``bnref-dev``, ``bnref-ci`` and ``bnref-stress`` (so they never replace a project's own
``ci`` profile). The suite's properties use the one chosen with ``pytest --bnref-profile=NAME``
(the pytest plugin that comes with bnref), or the ``BNREF_PROFILE`` environment variable, and
``ci`` otherwise -- whatever Hypothesis profile the rest of the test run uses. Each backend
then runs its ``example_scale`` share of the profile's examples (at least 10).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from hypothesis import HealthCheck, Phase, settings

__all__ = ["PROFILES", "active_profile", "register_profiles", "suite_settings", "use_profile",
           "using_profile"]

_QUIET = (HealthCheck.too_slow, HealthCheck.data_too_large)
PROFILES: dict[str, dict] = {
    "dev": {"max_examples": 25},
    "ci": {"max_examples": 100, "derandomize": True, "print_blob": True},
    "stress": {"max_examples": 2000},
}
_chosen: str | None = None
_shrink = True


def register_profiles() -> None:
    """Register ``bnref-dev``, ``bnref-ci`` and ``bnref-stress`` with Hypothesis."""
    for name, values in PROFILES.items():
        settings.register_profile(f"bnref-{name}", deadline=None,
                                  suppress_health_check=_QUIET, **values)


def use_profile(name: str | None) -> None:
    """Make the suite's properties use bnref's profile ``name`` (None: back to the default)."""
    if name is not None and name not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {name!r}")
    global _chosen
    _chosen = name


@contextlib.contextmanager
def using_profile(name: str, shrink: bool = True) -> Iterator[None]:
    """Run the suite's properties under bnref's profile ``name`` inside the block;
    ``shrink=False`` reports the first failing example as found (faster, larger)."""
    global _shrink
    previous = _chosen, _shrink
    use_profile(name)
    _shrink = shrink
    try:
        yield
    finally:
        use_profile(previous[0])
        _shrink = previous[1]


def active_profile() -> str:
    """The profile the suite runs: ``--bnref-profile``, else ``BNREF_PROFILE``, else ``ci``."""
    name = _chosen or os.environ.get("BNREF_PROFILE") or "ci"
    if name not in PROFILES:
        raise ValueError(f"BNREF_PROFILE must be one of {sorted(PROFILES)}, got {name!r}")
    return name


def suite_settings() -> settings:
    register_profiles()
    chosen = settings.get_profile(f"bnref-{active_profile()}")
    if _shrink:
        return chosen
    return settings(chosen, phases=[p for p in chosen.phases if p is not Phase.shrink])
