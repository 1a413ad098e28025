"""bnref's PyTorch backend: ``batch_norm`` from primitive tensor ops and a drop-in layer."""

from bnref.torch.functional import batch_norm
from bnref.torch.layer import BatchNorm

__all__ = ["BatchNorm", "batch_norm"]
