"""bnref's numpy backend: the float64-capable oracle (forward, analytic backward, layer)."""

from bnref.numpy.functional import batch_norm, batch_norm_backward
from bnref.numpy.layer import BatchNorm

__all__ = ["BatchNorm", "batch_norm", "batch_norm_backward"]
