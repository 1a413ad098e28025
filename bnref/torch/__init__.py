"""bnref's PyTorch backend: ``batch_norm`` from primitive tensor ops and drop-in layers."""

from bnref.torch.functional import batch_norm
from bnref.torch.layer import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    fuser_method_mapping,
)
from bnref.torch.sync import SyncBatchNorm

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm",
           "fuser_method_mapping"]
