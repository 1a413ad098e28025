"""The shared property suite, run against every registered backend (ids: [numpy], [torch], ...)."""

from bnref.testing.suite import *  # noqa: F403
