"""bnref's MXNet backend: ``batch_norm`` from ``mx.nd`` operations and ``BatchNorm``, a Gluon
``HybridBlock`` that is a drop-in for ``mxnet.gluon.nn.BatchNorm``.

Importing it restores ``numpy.bool`` (see :mod:`bnref.mxnet._compat`), which mxnet 1.9.1 needs.
"""

from bnref.mxnet import _compat  # noqa: F401  (before mxnet)
from bnref.mxnet.functional import batch_norm
from bnref.mxnet.layer import BatchNorm

__all__ = ["BatchNorm", "batch_norm"]
