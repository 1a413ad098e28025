"""``bnref.torch.SyncBatchNorm``: synchronized batch norm on ``torch.distributed``, any backend.

Each rank holds a shard of the batch. In training, per channel, over the union of every
rank's values in the process group (``n`` values, the GLOBAL count)::

    n_r, mean_r, M2_r = count, mean, sum((x_r - mean_r)²) of rank r's shard   (two-pass, local)
    all_gather((n_r, mean_r, M2_r))                                           (one collective)
    n, mean, M2       = Chan's merge of every rank's triple, in float64, in rank order
    var               = M2 / n                                                (biased)
    y_r               = gamma * (x_r - mean) / sqrt(var + eps) + beta
    running          <- the convention's update with mean, and var (unbiased: M2 / (n - 1))

and backward, with ``xhat = (x - mean) / sqrt(var + eps)``::

    all_reduce(sum(dy_r), sum(dy_r * (x_r - mean)))      (one collective, float64)
    dx_r   = gamma / sqrt(var + eps) * (dy_r - sum(dy) / n - xhat_r * sum(dy * xhat) / n)
    dgamma = sum(dy_r * xhat_r), dbeta = sum(dy_r)        (this rank's part; DDP sums them)

so each rank's ``dx`` is its rows of the full batch's and the parts sum to the full batch's
parameter gradients. Chan's merge (``bnref.numpy.merge_moments``) never forms
E[x²]−E[x]², so an offset of 1e4 in float32 costs nothing; every rank merges the same
gathered numbers in the same order, so the running statistics are bit for bit the same on
every rank. Shards may be uneven and empty (an empty rank still takes part in both
collectives).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from bnref._checks import relaxed_convention
from bnref.conventions import DEFAULT, Convention
from bnref.torch.functional import (
    _check,
    compute_dtype,
    gradient_sums,
    input_gradient,
    laid_out_like,
    normalized,
    pilot_moments,
)
from bnref.torch.layer import BatchNorm

__all__ = ["SyncBatchNorm"]


def _chan(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s merge of two (count, mean, M2) parts; a part with count 0 is the
    identity (bit for bit), as in bnref.numpy.merge_moments."""
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    count = count_a + count_b
    if count_b == 0:
        return a
    if count_a == 0:
        return b
    weight = count_b / count
    delta = mean_b - mean_a
    return count, mean_a + delta * weight, m2_a + m2_b + delta * delta * (count_a * weight)


def _merge(parts: list[tuple]) -> tuple:
    """Pairwise (a tree: rounding grows with log k), in rank order."""
    while len(parts) > 1:
        parts = [_chan(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


class _SyncBatchStatistics(torch.autograd.Function):
    """Training-mode normalisation with the group's statistics; returns (y, mean, biased var,
    global count): the last three not differentiable, the count a 0-d int64 tensor."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps: float, dims: tuple[int, ...], axis: int, group,
                single_value_error: bool):
        dtype = compute_dtype(x.dtype)
        channels = x.shape[axis]
        local_count = x.numel() // channels if channels else 0
        if local_count:
            pilot, delta, var = pilot_moments(x, axis)
            pilot_wide = pilot.double()
            local = torch.cat([pilot_wide.new_full((1,), float(local_count)),
                               pilot_wide + delta.double(), var.double() * local_count])
        else:  # an empty shard: no values, but it takes part in the collectives
            pilot = torch.zeros(channels, dtype=dtype, device=x.device)
            local = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=x.device)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        # Every count is whole: read them on the host (one read per step, as torch's
        # SyncBatchNorm does for its counts).
        counts = [int(part[0].item()) for part in gathered]
        total, mean, m2 = _merge([(n, part[1:1 + channels], part[1 + channels:])
                                  for n, part in zip(counts, gathered, strict=True)])
        if single_value_error and total == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per "
                f"channel over the {len(counts)} ranks of the process group (per-rank "
                f"counts {counts}, this rank's input of shape {tuple(x.shape)})")
        ctx.dims, ctx.axis, ctx.group, ctx.total = dims, axis, group, total
        ctx.has_beta = beta is not None
        if total == 0:  # no value anywhere: an empty y, statistics unchanged
            ctx.save_for_backward(x, gamma, pilot, pilot, pilot)
            empty = torch.empty(0, dtype=dtype, device=x.device)
            count = torch.tensor(0)
            ctx.mark_non_differentiable(empty, count)
            return x.new_empty(x.shape), empty, empty, count
        var = m2 / total
        shift_mean = (mean - pilot.double()).to(dtype)  # global mean = pilot + shift_mean
        var_c = var.to(dtype)
        invstd = torch.rsqrt(var_c + eps)
        ctx.save_for_backward(x, gamma, pilot, shift_mean, invstd)
        if not local_count:
            y = x.new_empty(x.shape)
        else:
            scale = invstd if gamma is None else invstd * gamma.to(dtype)
            # A channel with no spread anywhere is beta exactly (as the unsynchronized layer).
            scale = torch.where(var_c > 0, scale, torch.zeros_like(scale))
            shift = torch.zeros_like(scale) if beta is None else beta.to(dtype)
            y = normalized(x, pilot, shift_mean, scale, shift, axis)
        mean_c, count = mean.to(dtype), torch.tensor(total)
        ctx.mark_non_differentiable(mean_c, var_c, count)
        return y, mean_c, var_c, count

    @staticmethod
    def backward(ctx, dy, *_unused):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "bnref.torch.SyncBatchNorm has no second derivative (create_graph=True): "
                "its backward is a collective, as torch.nn.SyncBatchNorm's")
        x, gamma, pilot, shift_mean, invstd = ctx.saved_tensors
        dtype = compute_dtype(x.dtype)
        channels = x.shape[ctx.axis]
        total = ctx.total
        if x.numel() and total:
            dy = laid_out_like(dy, x)
            sum_dy, dot = gradient_sums(dy, x, pilot, shift_mean, ctx.axis)
        else:
            sum_dy = dot = torch.zeros(channels, dtype=dtype, device=x.device)
        sums = torch.cat([sum_dy, dot]).double()
        dist.all_reduce(sums, group=ctx.group)  # every rank: the collective needs them all
        if x.numel() and total:
            wide_gamma = None if gamma is None else gamma.to(dtype)
            dx = input_gradient(dy, x, pilot, wide_gamma, invstd, shift_mean,
                                sums[:channels].to(dtype), sums[channels:].to(dtype), total,
                                ctx.axis)
            dgamma = dot * invstd
        else:
            dx = torch.zeros_like(x)
            dgamma = dot
        param_dtype = dtype if gamma is None else gamma.dtype
        return (dx,
                None if gamma is None else dgamma.to(param_dtype),
                sum_dy.to(param_dtype) if ctx.has_beta else None,
                None, None, None, None, None)


class SyncBatchNorm(BatchNorm):
    """Batch normalization with the statistics of every rank's batch: a drop-in for
    ``torch.nn.SyncBatchNorm`` that runs on any ``torch.distributed`` backend (gloo on CPU,
    nccl on GPU).

    In training, inside an initialised process group of more than one rank, each rank's
    ``y = weight * (x - mean) / sqrt(var + eps) + bias`` uses the mean and biased variance of
    the union of every rank's batch in ``process_group`` (default: the whole world), merged
    stably from each rank's ``(count, mean, M2)`` (Chan et al.; never E[x²]−E[x]²); the
    running statistics move by the convention's rule with those (torch: ``(1 - momentum) *
    running + momentum * batch``, the variance unbiased with the GLOBAL count), identically on
    every rank. The backward all-reduces ``sum(dy)`` and ``sum(dy * (x - mean))``, so each
    rank's input gradient is its rows of the full batch's, and each rank's weight/bias
    gradient is its part of the full batch's (``DistributedDataParallel`` sums them). Ranks
    may hold uneven batches, and empty ones. Every rank in the group must call it together,
    as any collective.

    In ``eval()``, with world size 1, or outside an initialised process group it is exactly
    :class:`bnref.torch.BatchNorm`: no communication, no error.

    ``torch.nn.SyncBatchNorm``'s arguments, in its order (``process_group`` included), plus
    ``axis`` and ``convention`` as in :class:`BatchNorm`; the same parameters and buffers, so
    state dicts load both ways. It is a ``torch.nn.modules.batchnorm._BatchNorm`` but not a
    ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` refuses every
    ``torch.nn.SyncBatchNorm`` in a CPU model ("SyncBatchNorm layers only work with GPU
    modules"), and this layer is meant for CPU too. No second derivative.
    """

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | None = DEFAULT,  # type: ignore[assignment]
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        axis: int | None = None,
        convention: str | Convention = "torch",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias, axis=axis, convention=convention)
        self.process_group = process_group

    def _sync_group(self):
        """The process group to synchronize over, or None when nothing is synchronized."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = None if isinstance(input, torch.fx.Proxy) else self._sync_group()
        if group is None:
            return super().forward(input)
        self._check_input(input)
        tracking = self.track_running_stats
        # The single-value refusal is the union's: a rank may hold one value, or none.
        args = _check(input, self.weight, self.bias,
                      self.running_mean if tracking else None,
                      self.running_var if tracking else None, training=True, momentum=0.0,
                      eps=self.eps, axis=self.axis,
                      convention=relaxed_convention(self.convention))
        y, mean, var, count = _SyncBatchStatistics.apply(
            input, self.weight, self.bias, args.eps, args.reduce_axes, args.axis, group,
            self.convention.single_value_error)
        if tracking:
            total = int(count)  # a CPU tensor made from a Python int: no device read
            self._track(mean if total else None, var if total else None,
                        dataclasses.replace(args, count=total, convention=self.convention))
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group: Any | None = None) -> torch.nn.Module:
        """Replace every batch-norm layer in ``module`` (``torch.nn.BatchNorm*d``,
        ``torch.nn.SyncBatchNorm``, bnref's layers: any ``_BatchNorm``) with a
        :class:`SyncBatchNorm` over ``process_group`` that shares its parameters and buffers
        (the same tensors: state, device and dtype carry over) and keeps its ``eps``,
        ``momentum``, ``affine``, ``track_running_stats``, bias, training flag and ``qconfig``,
        and for bnref's layers its ``axis`` and ``convention``. Returns ``module`` with its
        children converted, or the new layer when ``module`` is itself a batch norm; as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``."""
        output = module
        if isinstance(module, _BatchNorm):
            output = cls(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, process_group,
                         bias=module.bias is not None, axis=getattr(module, "axis", 1),
                         convention=getattr(module, "convention", "torch"))
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    if module.bias is not None:
                        output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return output

    def extra_repr(self) -> str:
        group = "" if self.process_group is None else ", process_group=<given>"
        return f"{super().extra_repr()}{group}"
