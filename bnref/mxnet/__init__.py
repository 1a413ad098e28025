"""bnref's MXNet backend: ``batch_norm`` from ``mx.nd`` operations, ``BatchNorm``, a Gluon
``HybridBlock`` that is a drop-in for ``mxnet.gluon.nn.BatchNorm``, and ``SyncBatchNorm``, its
synchronized form across contexts (a drop-in for ``mxnet.gluon.contrib.nn.SyncBatchNorm``).

Importing it restores ``numpy.bool`` (see :mod:`bnref.mxnet._compat`), which mxnet 1.9.1 needs.
"""

from bnref.mxnet import _compat  # noqa: F401  (before mxnet)
from bnref.mxnet.functional import batch_norm
from bnref.mxnet.layer import BatchNorm
from bnref.mxnet.sync import SyncBatchNorm

__all__ = ["BatchNorm", "SyncBatchNorm", "batch_norm"]
