"""A plain-numpy BatchNorm layer that keeps its state the way ``torch.nn.BatchNorm*d`` does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bnref._checks import check_bool, check_layer_args
from bnref.conventions import CANONICAL_STATE, DEFAULT, Convention, get_convention
from bnref.numpy.functional import batch_norm, batch_norm_backward

__all__ = ["BatchNorm", "flatten_state", "nest_state"]

# Canonical name -> the attribute of this layer (torch's names).
_ATTRIBUTES = dict(zip(CANONICAL_STATE, ("weight", "bias", "running_mean", "running_var"),
                       strict=True))


def flatten_state(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"params": {"scale": a}}`` -> ``{"params/scale": a}`` (Flax's nested collections)."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_state(value, prefix=f"{path}/"))
        else:
            flat[path] = value
    return flat


def nest_state(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_state`."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


class BatchNorm:
    """Batch normalization over every axis but ``axis``, with running statistics.

    Training: ``y = weight * (x - mean_B) / sqrt(var_B + eps) + bias`` with the biased batch
    statistics, after which the running statistics move by the convention's rule (torch:
    ``running = (1 - momentum) * running + momentum * batch``, the variance term unbiased).
    Inference: the same with ``running_mean``/``running_var``. ``momentum=None`` is PyTorch's
    cumulative average: the new batch gets weight ``1 / num_batches_tracked``. An omitted
    ``momentum``/``eps``/``axis`` is the convention's default. With
    ``track_running_stats=False`` the batch statistics are used in both modes.

    This layer also runs the library conventions whose rule depends on the step count
    (:data:`bnref.conventions.LIBRARY_CONVENTIONS`): under ``"equinox"`` the first training
    batch replaces the running statistics; under ``"equinox_batch"`` and ``"haiku"``
    ``running_mean``/``running_var`` hold the *stored* moving average (Equinox's
    ``batch_state_index``, Haiku's ``hidden``, starting from the record's
    ``initial_running_var``) and inference normalises with :meth:`inference_statistics`, that
    average divided by ``1 - d**num_batches_tracked``.

    State follows ``torch.nn.BatchNorm2d``: ``weight``, ``bias`` (when ``affine``),
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (when tracking).
    ``state_dict(names=...)``/``load_state_dict(..., names=...)`` speak any convention's names.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float | None = DEFAULT,  # type: ignore[assignment]
        eps: float | None = None,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int | None = None,
        convention: str | Convention = "torch",
        dtype: Any = np.float32,
    ) -> None:
        args = check_layer_args(num_features, momentum=momentum, eps=eps, convention=convention,
                                library_rules=True)
        self.num_features = num_features
        self.convention = args.convention
        # One step of the stored moving average, which the functional form runs; seeding and
        # debiasing are applied here, around it.
        self._step_convention = args.convention.plain()
        self.momentum = args.momentum
        self.eps = args.eps
        self.affine = check_bool("affine", affine)
        self.track_running_stats = check_bool("track_running_stats", track_running_stats)
        self.axis = self.convention.default_axis if axis is None else axis
        self.training = True
        self.weight = np.ones(num_features, dtype) if affine else None
        self.bias = np.zeros(num_features, dtype) if affine else None
        self.running_mean = np.zeros(num_features, dtype) if track_running_stats else None
        self.running_var = (np.full(num_features, self.convention.initial_running_var, dtype)
                            if track_running_stats else None)
        self.num_batches_tracked = 0 if track_running_stats else None
        self.weight_grad: np.ndarray | None = None
        self.bias_grad: np.ndarray | None = None
        self._saved_input: np.ndarray | None = None
        self._blended_output = False

    def train(self, mode: bool = True) -> BatchNorm:
        self.training = check_bool("mode", mode)
        return self

    def eval(self) -> BatchNorm:
        return self.train(False)

    def _momentum_for_step(self, step: int) -> float:
        if self.momentum is not None:
            # The convention's own momentum, except a first batch that seeds the statistics.
            return self.convention.momentum_for_step(self.momentum, step)
        # Cumulative average: the k-th batch gets weight 1/k, in this convention's terms.
        return self.convention.momentum_for_new_value_weight(1.0 / step)

    def inference_statistics(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The mean and variance inference normalises with: the running statistics, divided by
        ``1 - d**num_batches_tracked`` under a zero-debiased convention (computed in float64,
        rounded once to the statistics' dtype). ``(None, None)`` without running statistics."""
        if self.running_mean is None or self.running_var is None:
            return None, None
        divisor = self.convention.inference_divisor(self.momentum, self.num_batches_tracked)
        if divisor == 1.0:
            return self.running_mean.copy(), self.running_var.copy()
        return tuple(  # type: ignore[return-value]
            (stat.astype(np.float64) / divisor).astype(stat.dtype)
            for stat in (self.running_mean, self.running_var))

    def __call__(self, x: np.ndarray, training: bool | None = None) -> np.ndarray:
        training = self.training if training is None else check_bool("training", training)
        tracking = self.track_running_stats and training
        step = self.num_batches_tracked + 1 if tracking else 0
        mean, var = ((self.running_mean, self.running_var) if training
                     else self.inference_statistics())
        y, new_mean, new_var = batch_norm(
            x, self.weight, self.bias, mean, var,
            training=training, momentum=self._momentum_for_step(step) if tracking else 0.0,
            eps=self.eps, axis=self.axis, convention=self._step_convention,
        )
        normalised_with_running = tracking and self.convention.training_statistics == "running"
        if normalised_with_running:
            # Equinox mode="ema": the training batch is normalised with the running statistics
            # it has just updated, as inference would be.
            y = batch_norm(x, self.weight, self.bias, new_mean, new_var, training=False,
                           eps=self.eps, axis=self.axis, convention=self._step_convention)[0]
        if tracking:  # only after batch_norm accepted x: a refused batch changes nothing
            self.num_batches_tracked = step
            self.running_mean, self.running_var = new_mean, new_var
        uses_batch_stats = (training or self.running_mean is None) and not (
            normalised_with_running and step > 1)
        self._saved_input = x.copy() if uses_batch_stats else None
        self._blended_output = normalised_with_running and step > 1
        return y

    forward = __call__

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient of the last batch-statistics forward call.

        Returns ``dx`` and keeps ``weight_grad``/``bias_grad`` on the layer.
        """
        if self._blended_output:
            raise NotImplementedError(
                f"backward() of a training step under the {self.convention.name!r} convention, "
                "whose output is normalised with the blended running statistics, is not "
                "implemented (its first step, normalised with the batch's, is)")
        if self._saved_input is None:
            raise RuntimeError("backward() needs a preceding forward call in training mode")
        dx, self.weight_grad, self.bias_grad = batch_norm_backward(
            dy, self._saved_input, self.weight, eps=self.eps, axis=self.axis,
            convention=self._step_convention,
        )
        return dx

    # -- state ---------------------------------------------------------------------------
    def _canonical_state(self) -> dict[str, Any]:
        state = {name: getattr(self, attr) for name, attr in _ATTRIBUTES.items()}
        return {name: value.copy() for name, value in state.items() if value is not None}

    def state_dict(self, names: str | Convention = "torch") -> dict[str, Any]:
        """Copies of the state under ``names``' convention (nested for Flax and Haiku).

        ``num_batches_tracked`` is included under PyTorch's names and under every convention
        whose rule depends on the step count (Equinox, Haiku)."""
        conv = get_convention(names)
        flat = {conv.state_names[name]: value for name, value in self._canonical_state().items()}
        keeps_count = conv.name == "torch" or conv.counts_steps
        if keeps_count and self.num_batches_tracked is not None:
            flat["num_batches_tracked"] = np.asarray(self.num_batches_tracked, np.int64)
        return nest_state(flat)

    def load_state_dict(self, state: Mapping[str, Any], names: str | Convention = "torch") -> None:
        """Load state saved under ``names``' convention; keys must match this layer exactly.

        ``num_batches_tracked`` is optional (only PyTorch keeps it; it stays as it is when
        absent). Arrays are copied; nothing is changed if any key or shape is wrong.
        """
        conv = get_convention(names)
        flat = flatten_state(state)
        expected = {conv.state_names[name]: name for name in self._canonical_state()}
        counter = flat.pop("num_batches_tracked", None)
        missing, unexpected = set(expected) - set(flat), set(flat) - set(expected)
        if missing or unexpected:
            raise KeyError(
                f"state does not match this layer under {conv.name!r} names: missing "
                f"{sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        loaded = {}
        for key, name in expected.items():
            value = np.asarray(flat[key])
            if value.shape != (self.num_features,):
                raise ValueError(
                    f"{key} must have shape ({self.num_features},), got shape {value.shape}"
                )
            current = getattr(self, _ATTRIBUTES[name])
            loaded[_ATTRIBUTES[name]] = value.astype(current.dtype, copy=True)
        for attr, value in loaded.items():
            setattr(self, attr, value)
        if counter is not None and self.num_batches_tracked is not None:
            self.num_batches_tracked = int(np.asarray(counter))

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, momentum={self.momentum}, eps={self.eps}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"axis={self.axis}, convention={self.convention.name!r})"
        )
