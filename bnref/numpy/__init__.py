"""bnref's numpy backend: the float64-capable oracle (forward, analytic backward, layer, and
synchronized batch norm over the shards of one batch)."""

from bnref.numpy.functional import batch_norm, batch_norm_backward
from bnref.numpy.layer import BatchNorm
from bnref.numpy.sync import (
    merge_moments,
    shard_moments,
    sync_batch_norm,
    sync_batch_norm_backward,
)

__all__ = [
    "BatchNorm",
    "batch_norm",
    "batch_norm_backward",
    "merge_moments",
    "shard_moments",
    "sync_batch_norm",
    "sync_batch_norm_backward",
]
