"""The shared property suite, run against every registered backend (ids: [numpy], [torch], ...)."""

from bnref.testing.suite import *  # noqa: F403
from bnref.testing.suite import test_matches_builtin  # noqa: F401  (ids: [numpy-onnxruntime])
