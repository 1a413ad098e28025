"""``bnref.torch.BatchNorm`` and ``BatchNorm1d/2d/3d``: drop-ins for ``torch.nn.BatchNorm*d``.

They subclass ``torch.nn.modules.batchnorm._BatchNorm``, so everything in PyTorch that treats
batch-norm layers specially treats them as its own: ``isinstance`` checks (weight-decay
exclusion, ``nn.SyncBatchNorm.convert_sync_batchnorm``, fusion), ``state_dict`` versioning
(a checkpoint without ``num_batches_tracked`` loads), ``deepcopy``/``pickle``/``torch.save``
and ``AveragedModel``. Only ``forward`` is bnref's: :func:`bnref.torch.batch_norm`'s math.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from bnref._checks import check_layer_args
from bnref.conventions import DEFAULT, Convention
from bnref.torch.functional import _check, normalize, updated_running_stats

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class BatchNorm(_BatchNorm):
    """Batch normalization over every axis but ``axis``, as ``torch.nn.BatchNorm2d`` does it.

    Training: ``y = weight * (x - mean_B) / sqrt(var_B + eps) + bias`` with the biased batch
    statistics; then, in place, ``running = (1 - momentum) * running + momentum * batch`` (the
    variance term unbiased) under the default ``convention="torch"``, or the other framework's
    rule under another convention. Inference (``eval()``) uses the running statistics;
    ``momentum=None`` is the cumulative average (weight ``1 / num_batches_tracked``);
    ``track_running_stats=False`` uses batch statistics in both modes. An empty batch gives an
    empty output, leaves the running statistics and still counts in ``num_batches_tracked``,
    as the built-in does.

    Same arguments, parameters and buffers as the built-in (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so ``load_state_dict`` works
    both ways; any rank from 2 to 5 (``BatchNorm1d/2d/3d`` check the rank as the built-ins do).
    An omitted ``eps``/``momentum``/``axis`` is the convention's default. One difference: a
    refused batch (one value per channel in training) leaves ``num_batches_tracked`` as it
    was; the built-in has already counted it.

    ``nn.SyncBatchNorm.convert_sync_batchnorm`` converts this layer like the built-in, keeping
    its state; the torch ``SyncBatchNorm`` it makes reads ``momentum`` torch's way and has its
    channels on axis 1, so convert only layers with ``convention="torch"`` and ``axis=1``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | None = DEFAULT,  # type: ignore[assignment]
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        axis: int | None = None,
        convention: str | Convention = "torch",
    ) -> None:
        args = check_layer_args(num_features, momentum=momentum, eps=eps, convention=convention,
                                axis=axis)
        super().__init__(num_features, args.eps, args.momentum, affine, track_running_stats,
                         device, dtype, bias=bias)
        self.convention = args.convention
        self.axis = args.axis

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """Any rank from 2 to 5: the functional check names the argument when it is not."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        # Eval with running statistics normalises with them; everything else with the batch's.
        use_running = not self.training and self.running_mean is not None
        given = tracking or use_running
        args = _check(input, self.weight, self.bias,
                      self.running_mean if given else None, self.running_var if given else None,
                      training=not use_running, momentum=0.0, eps=self.eps, axis=self.axis,
                      convention=self.convention)
        y, mean, var = normalize(input, self.weight, self.bias, self.running_mean,
                                 self.running_var, args, batch_stats=not use_running)
        if tracking:  # only after the input was accepted: a refused batch changes nothing
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if mean is not None:  # an empty batch moves no statistic
                    if self.momentum is None:
                        # The k-th batch gets weight 1/k, as a tensor: no read on the host.
                        weight = 1.0 / self.num_batches_tracked.to(mean.dtype)
                        momentum = self.convention.momentum_for_new_value_weight(weight)
                    else:
                        momentum = self.momentum
                    new_mean, new_var = updated_running_stats(
                        self.running_mean, self.running_var, mean, var, args, momentum)
                    self.running_mean.copy_(new_mean)
                    self.running_var.copy_(new_var)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}, convention={self.convention.name!r}"


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for (N, C) or (N, C, L) input, as ``torch.nn.BatchNorm1d``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for (N, C, H, W) input, as ``torch.nn.BatchNorm2d``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` for (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
