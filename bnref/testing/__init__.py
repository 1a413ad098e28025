"""bnref's conformance harness: adapters, strategies, tolerances and the shared property suite.

- :mod:`bnref.testing.backends`: the :class:`Backend` adapter and the registry of backends;
- :mod:`bnref.testing.strategies`: Hypothesis strategies for batch-norm cases;
- :mod:`bnref.testing.tolerances`: the tolerance policy (per dtype, derived in its docstring);
- :mod:`bnref.testing.checks`: comparisons with the float64 oracle;
- :mod:`bnref.testing.suite`: the property tests, written once, run against a ``backend``
  fixture (``from bnref.testing.suite import *`` in a test module of your own).

Importing this package imports numpy and Hypothesis, never a framework.
"""

from bnref.testing.backends import (
    KNOWN_BACKENDS,
    Backend,
    LayerConfig,
    LayerHandle,
    installed_backends,
    load_backend,
    register_backend,
    required_backends,
)

__all__ = [
    "KNOWN_BACKENDS",
    "Backend",
    "LayerConfig",
    "LayerHandle",
    "installed_backends",
    "load_backend",
    "register_backend",
    "required_backends",
]
