"""Every pair of bnref's backends, compared with each other directly (ids: [numpy~torch], ...)."""

from bnref.testing.pairwise import (  # noqa: F401
    test_pair_forward_agrees,
    test_pair_gradients_agree,
    test_pair_layers_agree,
)
