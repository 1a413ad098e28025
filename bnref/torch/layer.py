"""``bnref.torch.BatchNorm``: a drop-in for ``torch.nn.BatchNorm1d/2d/3d``."""

from __future__ import annotations

import torch
from torch import nn

from bnref._checks import check_layer_args
from bnref.conventions import DEFAULT, Convention
from bnref.torch.functional import batch_norm

__all__ = ["BatchNorm"]


class BatchNorm(nn.Module):
    """Batch normalization over every axis but ``axis``, as ``torch.nn.BatchNorm2d`` does it.

    Training: ``y = weight * (x - mean_B) / sqrt(var_B + eps) + bias`` with the biased batch
    statistics; then, in place, ``running = (1 - momentum) * running + momentum * batch`` (the
    variance term unbiased) under the default ``convention="torch"``, or the other framework's
    rule under another convention. Inference (``eval()``) uses the running statistics;
    ``momentum=None`` is the cumulative average (weight ``1 / num_batches_tracked``);
    ``track_running_stats=False`` uses batch statistics in both modes.

    Same arguments, parameters and buffers as the built-in (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so ``load_state_dict`` works
    both ways; any rank from 2 to 5. An omitted ``eps``/``momentum``/``axis`` is the
    convention's default. One difference: a refused batch (one value per channel in training)
    leaves ``num_batches_tracked`` as it was; the built-in has already counted it.
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
        super().__init__()
        args = check_layer_args(num_features, momentum=momentum, eps=eps, convention=convention)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = args.eps
        self.momentum = args.momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.convention = args.convention
        self.axis = self.convention.default_axis if axis is None else axis
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tracking = self.training and self.track_running_stats
        momentum = 0.0
        if tracking:
            step = int(self.num_batches_tracked) + 1
            # momentum=None: the k-th batch gets weight 1/k, in this convention's terms.
            momentum = (self.momentum if self.momentum is not None
                        else self.convention.momentum_for_new_value_weight(1.0 / step))
        use_running = self.running_mean is not None and not self.training
        y, new_mean, new_var = batch_norm(
            x, self.weight, self.bias,
            self.running_mean if tracking or use_running else None,
            self.running_var if tracking or use_running else None,
            training=not use_running, momentum=momentum, eps=self.eps, axis=self.axis,
            convention=self.convention,
        )
        if tracking:  # only after batch_norm accepted x: a refused batch changes nothing
            with torch.no_grad():
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
                self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}, "
                f"convention={self.convention.name!r}")
