"""The shared property suite, run against every registered backend (ids: [numpy], [torch], ...)."""

from bnref.testing.suite import *  # noqa: F403
from bnref.testing.suite import (  # noqa: F401  (ids: [numpy-onnxruntime], ...)
    test_gradients_match_builtin,
    test_layer_matches_builtin_layer,
    test_matches_builtin,
)
