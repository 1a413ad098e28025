"""pytest wiring for the shared suite: the ``backend`` fixture over every known backend.

``tests/conftest.py`` re-exports these; a third party running the suite against the registry
(after ``register_backend``) can do the same::

    from bnref.testing.fixtures import backend, pytest_generate_tests  # noqa: F401

A backend whose framework is not installed is skipped with the reason, unless it is named in
``BNREF_REQUIRE`` (comma-separated, or ``all``): then its absence fails the test.
"""

from __future__ import annotations

import pytest

from bnref.testing.backends import (
    KNOWN_BACKENDS,
    Backend,
    is_installed,
    load_backend,
    required_backends,
)

__all__ = ["backend", "backend_or_skip", "pair", "pytest_generate_tests"]


def backend_or_skip(name: str) -> Backend:
    """The adapter for ``name``; a missing framework skips, or fails when required."""
    if not is_installed(name):
        framework = KNOWN_BACKENDS[name].framework
        if name in required_backends():
            pytest.fail(f"backend {name!r} is required (BNREF_REQUIRE) but {framework!r} "
                        "is not installed", pytrace=False)
        pytest.skip(f"{framework!r} is not installed")
    return load_backend(name)


@pytest.fixture(scope="session")
def backend(request) -> Backend:
    return backend_or_skip(request.param)


@pytest.fixture(scope="session")
def pair(request) -> tuple[Backend, Backend]:
    first, second = request.param
    return backend_or_skip(first), backend_or_skip(second)


def backend_pairs() -> list[tuple[str, str]]:
    """Every unordered pair of bnref's own backends, in registry order."""
    names = [name for name, info in KNOWN_BACKENDS.items() if info.module]
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def pytest_generate_tests(metafunc) -> None:
    """``backend`` runs over every known backend (ids ``[numpy]``, ``[torch]``, ...); tests
    that also take ``builtin_name`` (``layer_builtin_name``) run once per (backend, built-in)
    pair (``[numpy-onnxruntime]``, ``[torch-torch.nn.BatchNormNd]``)."""
    for fixture, attribute in (("builtin_name", "builtins"),
                               ("layer_builtin_name", "layer_builtins"),
                               ("gradient_builtin_name", "gradient_builtins")):
        if fixture in metafunc.fixturenames:
            pairs = [(info.name, builtin) for info in KNOWN_BACKENDS.values()
                     for builtin in getattr(info, attribute)]
            metafunc.parametrize(["backend", fixture], pairs, indirect=["backend"],
                                 ids=[f"{name}-{builtin}" for name, builtin in pairs],
                                 scope="session")
            return
    if "pair" in metafunc.fixturenames:
        pairs = backend_pairs()
        metafunc.parametrize("pair", pairs, indirect=True, ids=[f"{a}~{b}" for a, b in pairs],
                             scope="session")
        return
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", list(KNOWN_BACKENDS), indirect=True, ids=str,
                             scope="session")
