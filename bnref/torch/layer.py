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

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "fuser_method_mapping"]


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

    :meth:`bnref.torch.SyncBatchNorm.convert_sync_batchnorm` converts it (and the built-ins)
    to bnref's synchronized layer, keeping its state, axis and convention. torch's own
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` converts it too, but the torch layer it makes
    reads ``momentum`` torch's way, has its channels on axis 1, and refuses CPU tensors.
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
        """``torch.nn.BatchNorm2d``'s arguments, in its order, plus ``axis`` (the channel axis;
        default the convention's, 1 for torch) and ``convention`` (what ``momentum`` means, and
        the defaults of an omitted ``eps``/``momentum``/``axis``; see :mod:`bnref.conventions`).
        ``momentum=None`` is the cumulative average."""
        args = check_layer_args(num_features, momentum=momentum, eps=eps, convention=convention,
                                axis=axis)
        super().__init__(num_features, args.eps, args.momentum, affine, track_running_stats,
                         device, dtype, bias=bias)
        self.convention = args.convention
        self.axis = args.axis

    _ranks: tuple[int, ...] = (2, 3, 4, 5)  # the functional check names a wrong rank

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_rank(input, self._ranks)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            # torch.fx (symbolic_trace, FX quantization and fusion) keeps torch.nn's layers as
            # leaves, called at run time; so is this one, rather than traced into Python
            # control flow on shapes (and a training flag frozen at trace time).
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), {})
        self._check_input(input)
        tracking = self.training and self.track_running_stats
        # Eval with running statistics normalises with them; everything else with the batch's.
        use_running = not self.training and self.running_mean is not None
        given = tracking or use_running
        args = _check(input, self.weight, self.bias, self.running_mean if given else None,
                      self.running_var if given else None, training=not use_running,
                      momentum=0.0, eps=self.eps, axis=self.axis, convention=self.convention)
        y, mean, var = normalize(input, self.weight, self.bias, self.running_mean,
                                 self.running_var, args, batch_stats=not use_running)
        if tracking:  # only after the input was accepted: a refused batch changes nothing
            self._track(mean, var, args)
        return y

    def _check_input(self, input: torch.Tensor) -> None:
        _check_rank(input, self._ranks)
        if -input.dim() <= self.axis < input.dim() and (
                input.shape[self.axis] != self.num_features):
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got x with "
                f"{input.shape[self.axis]} channels on axis {self.axis}, shape "
                f"{tuple(input.shape)}: num_features must be the channel count")

    def _track(self, mean: torch.Tensor | None, var: torch.Tensor | None, args) -> None:
        """Count the batch, and move the running statistics towards its ``mean``/``var``
        (``None``: an empty batch, which moves nothing) by the convention's rule, with
        ``args.count`` values per channel behind the batch variance."""
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if mean is None:
                return
            momentum = self.momentum
            if momentum is None:
                # The k-th batch gets weight 1/k, as a tensor: no read on the host.
                new_weight = 1.0 / self.num_batches_tracked.to(mean.dtype)
                momentum = self.convention.momentum_for_new_value_weight(new_weight)
            new_mean, new_var = updated_running_stats(
                self.running_mean, self.running_var, mean, var, args, momentum)
            self.running_mean.copy_(new_mean)
            self.running_var.copy_(new_var)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}, convention={self.convention.name!r}"


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for (N, C) or (N, C, L) input, as ``torch.nn.BatchNorm1d``."""

    _ranks = (2, 3)


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for (N, C, H, W) input, as ``torch.nn.BatchNorm2d``."""

    _ranks = (4,)


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` for (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)


def _check_rank(input: torch.Tensor, ranks: tuple[int, ...]) -> None:
    """The built-ins' rank check and message (``BatchNorm1d/2d/3d``); any rank 2-5 passes
    here for :class:`BatchNorm`, whose functional check names a wrong rank itself."""
    if ranks != (2, 3, 4, 5) and input.dim() not in ranks:
        expected = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(f"expected {expected} input (got {input.dim()}D input)")


def fuser_method_mapping() -> dict:
    """The conv/linear + batch-norm pairs of ``torch.ao.quantization.fuse_modules`` with bnref's
    layers in place of the built-ins, to pass as
    ``fuse_custom_config_dict={"additional_fuser_method_mapping": fuser_method_mapping()}``.

    torch finds a fuser by the exact class, so its defaults cannot see subclasses. Folding a
    batch norm into the preceding convolution uses only the inference formula, which every
    convention shares; the channels must be on axis 1 (where a convolution puts them).
    """
    from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD

    ours = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
            torch.nn.BatchNorm3d: BatchNorm3d}
    mapping = {}
    for pattern, fuser in _DEFAULT_OP_LIST_TO_FUSER_METHOD.items():
        # Patterns that start with the batch norm build quantized BN modules: not ours.
        if pattern[0] not in ours and any(op in ours for op in pattern):
            for cls in (ours.get(pattern[1]), BatchNorm):
                mapping[tuple(cls if op in ours else op for op in pattern)] = fuser
    return mapping
