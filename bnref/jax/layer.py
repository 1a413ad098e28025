"""``bnref.jax.BatchNorm``: explicit init/apply over Flax-layout variables, no hidden state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bnref._checks import check_axis_index_groups, check_axis_name, check_bool, check_layer_args
from bnref.conventions import DEFAULT, Convention
from bnref.jax.functional import ArrayLike, as_jax, batch_norm

__all__ = ["BatchNorm"]

Variables = dict[str, dict[str, jax.Array]]


class BatchNorm:
    """Batch normalization over every axis but ``axis``, the way ``flax.linen.BatchNorm``
    lays out its variables: ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``,
    so variables move between the two unchanged.

    Training (``apply(..., training=True)``): ``y = scale * (x - mean_B) / sqrt(var_B +
    epsilon) + bias`` with the biased batch statistics, and ``batch_stats`` move by the
    convention's rule (default flax: ``m * old + (1 - m) * batch``). Inference uses
    ``batch_stats``. ``momentum=None`` is PyTorch's cumulative average; it needs a batch
    counter, kept as ``batch_stats["num_batches_tracked"]`` for such layers only.
    ``track_running_stats=False`` keeps no ``batch_stats`` and uses batch statistics in both
    modes. An omitted ``momentum``/``epsilon``/``axis`` is the convention's default;
    ``num_features`` (optional, as in ``flax.nnx.BatchNorm``) lets ``init()`` go without a
    sample input.

    ``axis_name``/``axis_index_groups`` (as Flax's): in training, the batch statistics (and so
    ``y`` and the new ``batch_stats``) are those of every member of that named axis of
    ``jax.vmap``/``jax.pmap``/``jax.shard_map`` together, or of each group of axis indices
    (see :func:`bnref.jax.batch_norm`); ``apply`` must then run inside one. Inference is not
    synchronized. ``init`` never communicates.
    """

    def __init__(
        self,
        num_features: int | None = None,
        *,
        axis: int | None = None,
        momentum: float | None = DEFAULT,  # type: ignore[assignment]
        epsilon: float | None = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        track_running_stats: bool = True,
        convention: str | Convention = "flax",
        axis_name: str | tuple[str, ...] | None = None,
        axis_index_groups: Any = None,
    ) -> None:
        args = check_layer_args(num_features, momentum=momentum, eps=epsilon,
                                convention=convention, axis=axis, features_optional=True)
        self.axis_name = check_axis_name(axis_name)
        self.axis_index_groups = check_axis_index_groups(axis_index_groups, self.axis_name)
        self.num_features = num_features
        self.convention, self.momentum, self.epsilon = args.convention, args.momentum, args.eps
        self.axis = args.axis
        self.param_dtype = param_dtype
        self.use_bias = check_bool("use_bias", use_bias)
        self.use_scale = check_bool("use_scale", use_scale)
        self.track_running_stats = check_bool("track_running_stats", track_running_stats)

    def init(self, *args: Any) -> Variables:
        """Fresh variables: scale 1, bias 0, mean 0, var 1. ``init()`` when ``num_features``
        was given, else ``init(x)`` or ``init(rng, x)`` as Flax (the rng is not needed)."""
        if args:
            sample = args[-1]
            channels = sample if isinstance(sample, int) else sample.shape[self.axis]
        elif self.num_features is not None:
            channels = self.num_features
        else:
            raise TypeError("init() needs a sample input (or num_features at construction)")
        ones = jnp.ones(channels, self.param_dtype)
        zeros = jnp.zeros(channels, self.param_dtype)
        params = {**({"scale": ones} if self.use_scale else {}),
                  **({"bias": zeros} if self.use_bias else {})}
        variables: Variables = {"params": params} if params else {}
        if self.track_running_stats:
            variables["batch_stats"] = {"mean": zeros, "var": ones}
            if self.momentum is None:
                variables["batch_stats"]["num_batches_tracked"] = jnp.zeros((), jnp.int32)
        return variables

    def apply(self, variables: Variables, x: ArrayLike, *,
              training: bool) -> tuple[jax.Array, Variables]:
        """``(y, new_variables)``; the variables passed in are not modified. ``x`` and the
        variables may be numpy arrays (a checkpoint loaded as numpy), as Flax takes them; the
        ``batch_stats`` returned are ``jax.Array``."""
        params = variables.get("params", {})
        stats = variables.get("batch_stats")
        tracking = training and stats is not None
        cumulative = tracking and self.momentum is None
        if cumulative:
            # Ask for the batch statistic itself (new-value weight 1), then average it in
            # below with weight 1/k: the count may be traced, so it cannot be a momentum.
            momentum = self.convention.momentum_for_new_value_weight(1.0)
        else:
            momentum = self.momentum if tracking else 0.0
        use_running = stats is not None and not training
        y, new_mean, new_var = batch_norm(
            x, params.get("scale"), params.get("bias"),
            stats["mean"] if tracking or use_running else None,
            stats["var"] if tracking or use_running else None,
            training=not use_running, momentum=momentum, eps=self.epsilon,
            axis=self.axis, convention=self.convention,
            # Synchronized in training only (without batch_stats inference uses each
            # member's own batch statistics, as torch.nn.SyncBatchNorm in eval()).
            axis_name=self.axis_name if training else None,
            axis_index_groups=self.axis_index_groups if training else None,
        )
        if not tracking:
            return y, variables
        new_stats = {**stats}
        if cumulative:
            # batch_norm has validated the statistics; they may still be numpy arrays here.
            old_mean, old_var = as_jax(stats["mean"]), as_jax(stats["var"])
            count = jnp.asarray(stats.get("num_batches_tracked", jnp.zeros((), jnp.int32))) + 1
            weight = 1.0 / count.astype(new_mean.dtype)
            # (1 - w) * old + w * batch, as PyTorch writes it: exact when w = 1 (the first
            # batch), where old + (batch - old) * w would round old's size into the result.
            new_mean = ((1.0 - weight) * old_mean + weight * new_mean).astype(old_mean.dtype)
            new_var = ((1.0 - weight) * old_var + weight * new_var).astype(old_var.dtype)
            new_stats["num_batches_tracked"] = count
        # batch_norm returns the statistics in the dtype they came in (as jnp.asarray made it).
        new_stats["mean"], new_stats["var"] = new_mean, new_var
        return y, {**variables, "batch_stats": new_stats}
