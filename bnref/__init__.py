"""bnref: batch normalization, the same in numpy, PyTorch, JAX, TensorFlow and MXNet.

``import bnref`` loads no framework; import a backend explicitly (``bnref.numpy``,
``bnref.torch``, ...). The conventions (what momentum means, default eps and axis, which
variance feeds the running variance) live in :mod:`bnref.conventions`.
"""

from bnref.conventions import (
    ALL_CONVENTIONS,
    CONVENTIONS,
    DEFAULT,
    LIBRARY_CONVENTIONS,
    Convention,
    convert_momentum,
    get_convention,
    translate_hyperparameters,
)

__version__ = "0.1.0"

__all__ = [
    "ALL_CONVENTIONS",
    "CONVENTIONS",
    "DEFAULT",
    "LIBRARY_CONVENTIONS",
    "Convention",
    "__version__",
    "convert_momentum",
    "get_convention",
    "translate_hyperparameters",
]
