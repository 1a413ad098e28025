"""Flax modules on bnref's math: drop-ins for ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm``.

- :class:`BatchNorm` is a ``flax.linen.Module`` with ``flax.linen.BatchNorm``'s fields and call
  (``use_running_average`` at construction or call time, as ``nn.merge_param`` decides) and its
  variables: ``params`` ``{scale, bias}``, ``batch_stats`` ``{mean, var}``.
- :class:`NNXBatchNorm` is a ``flax.nnx.Module`` with ``flax.nnx.BatchNorm``'s constructor and
  attributes: ``scale``/``bias`` (``nnx.Param``), ``mean``/``var`` (``nnx.BatchStat``). It is
  named for the API it mirrors, so that both fit in one module next to the linen one; use
  ``from bnref.jax.flax import NNXBatchNorm as BatchNorm`` for a swap in nnx code.

Training, per channel over every axis but ``axis`` (``bnref.jax.batch_norm``)::

    y    = scale * (x - mean_B) / sqrt(var_B + epsilon) + bias     (biased var_B)
    mean <- m * mean + (1 - m) * mean_B,   var <- m * var + (1 - m) * var_B

(``convention="flax"``, the default; another convention changes what ``momentum`` means and
which variance feeds ``var``). Inference (``use_running_average=True``) normalizes with
``mean`` and ``var``. An omitted ``momentum``/``epsilon``/``axis`` is the convention's default
(Flax's: 0.99, 1e-5, -1), resolved at construction; ``momentum=None`` is PyTorch's cumulative
average and adds a ``num_batches_tracked`` batch statistic, the one addition to Flax's layout.

Flax's dtype rules are kept (flax 0.12, ``linen/normalization.py`` ``_compute_stats`` and
``_normalize``): statistics are computed in ``promote(dtype or x.dtype, float32)``, the result
is ``dtype`` or else ``result_type(x, scale, bias)``, and the running statistics are created
in float32 and take the dtype ``m * old + (1 - m) * batch`` gives them (float64 after a
float64 step). So the variables move between these modules and Flax's unchanged, and a model
trains as with Flax's ``use_fast_variance=False``.

``axis_name``/``axis_index_groups`` synchronize the batch statistics across the members of a
named axis of ``jax.vmap``/``jax.pmap``/``jax.shard_map``, as Flax's do, but with the two-pass
variance of the union (``bnref.jax.batch_norm``: psum of the sums, then of the squared
deviations from the global mean), and groups work under ``vmap`` and ``shard_map`` as well.

Accepted but not Flax's: ``use_fast_variance`` is ignored (bnref's variance is always as
accurate as a two-pass, never E[x²]−E[x]², which is Flax's default and loses every digit at
large offsets). Not supported: ``mask=`` raises ``NotImplementedError``; ``axis`` is one int, not a
tuple of feature axes.

The only module of ``bnref.jax`` that imports flax: ``import bnref.jax.flax`` opts in.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from bnref._checks import (
    check_axis_index_groups,
    check_axis_name,
    check_batch_norm_args,
    check_bool,
    check_layer_args,
    relaxed_convention,
)
from bnref.conventions import DEFAULT, Convention
from bnref.jax.functional import (
    ARRAY_TYPE,
    as_jax,
    describe_array,
)
from bnref.jax.layer import BatchNorm as _Layer

__all__ = ["BatchNorm", "NNXBatchNorm"]

_MASK = ("mask= (statistics over the unmasked positions only) is not implemented in "
         "bnref.jax; use Flax's BatchNorm(use_fast_variance=False) for masked batches.")


def _no_param() -> Any:
    """An absent scale/bias: a data attribute holding None, as nnx.BatchNorm has it (so a Param
    may be assigned there later); flax < 0.12 has no ``nnx.data`` and no such distinction."""
    return nnx.data(None) if hasattr(nnx, "data") else None


def _check_synchronized(axis_name: Any, axis_index_groups: Any) -> None:
    """Flax's ``axis_name``/``axis_index_groups``, validated at construction (whether they
    cover the named axis is checked where it is bound, at call time)."""
    check_axis_index_groups(axis_index_groups, check_axis_name(axis_name))


def _floating(value: Any) -> bool:
    return isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.floating)


def _num_channels(x: Any, layer: _Layer, *, training: bool) -> int:
    """Validate ``x`` (type, dtype, rank, channel axis) before Flax's dtype arithmetic or the
    parameters' shapes touch it; the parameters are validated by ``bnref.jax.batch_norm``
    (which, synchronized, decides the single-value refusal over the union)."""
    synchronized = training and layer.axis_name is not None
    args = check_batch_norm_args(x, None, None, None, None, training=training,
                                 momentum=DEFAULT, eps=layer.epsilon, axis=layer.axis,
                                 convention=(relaxed_convention(layer.convention) if synchronized
                                             else layer.convention),
                                 inspect=describe_array, array_type=ARRAY_TYPE)
    return args.num_channels


def _normalize(layer: _Layer, x: Any, scale: Any, bias: Any, stats: dict[str, Any], *,
               training: bool, dtype: Dtype | None, force_float32_reductions: bool = True,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``bnref.jax.BatchNorm.apply`` under Flax's dtype rules: ``(y, new batch_stats)``.

    Flax's statistics dtype is ``promote(dtype or x.dtype, float32)`` (without
    ``force_float32_reductions``: ``dtype or x.dtype``); ``x`` enters in it, widened to at
    least float32 (bnref's contract; exact, so ``y`` is rounded once, to the result dtype, as
    Flax's is). The result is ``dtype`` or ``result_type(x, scale, bias)``. The running
    statistics enter promoted with Flax's statistics dtype, the dtype ``m * old + (1 - m) *
    batch`` leaves them in Flax. Arrays that are not floating JAX arrays pass through
    unchanged, for ``bnref.jax.batch_norm`` to refuse by name.
    """
    x, scale, bias = as_jax(x), as_jax(scale), as_jax(bias)
    stats_dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    if force_float32_reductions:
        stats_dtype = jnp.promote_types(stats_dtype, jnp.float32)
    result_dtype = (jnp.result_type(x, *(p for p in (scale, bias) if _floating(p)))
                    if dtype is None else jnp.dtype(dtype))
    stats = {name: (value.astype(jnp.promote_types(value.dtype, stats_dtype))
                    if name in ("mean", "var") and _floating(value) else value)
             for name, value in ((k, as_jax(v)) for k, v in stats.items())}
    params = {name: value for name, value in (("scale", scale), ("bias", bias))
              if value is not None}
    y, variables = layer.apply({"params": params, "batch_stats": stats},
                               x.astype(jnp.promote_types(stats_dtype, jnp.float32)),
                               training=training)
    return y.astype(result_dtype), variables["batch_stats"]


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` on bnref's math (see the module docstring for the formula).

    The fields are linen's, with ``convention`` added; ``momentum``, ``epsilon`` and ``axis``
    default to the convention's (resolved at construction, so ``BatchNorm().momentum`` is
    0.99). ``use_running_average`` may be given here or at call time (not both), as in linen.
    ``use_fast_variance`` is accepted and ignored: the variance is never E[x²]−E[x]².
    ``force_float32_reductions=False`` gives ``batch_stats`` Flax's dtypes (created in
    ``param_dtype``, updated in the input's dtype); the statistics are still reduced in at
    least float32 (bnref's contract for float16 and bfloat16).
    ``axis_name``/``axis_index_groups`` synchronize the statistics in training (not while
    initializing, as linen), with bnref's two-pass variance of the union.
    """

    use_running_average: bool | None = None
    axis: int | None = None
    momentum: float | None = DEFAULT  # type: ignore[assignment]
    epsilon: float | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = jax.nn.initializers.zeros
    scale_init: Initializer = jax.nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    convention: str | Convention = "flax"

    def __post_init__(self) -> None:
        args = check_layer_args(None, momentum=self.momentum, eps=self.epsilon,
                                convention=self.convention, axis=self.axis,
                                features_optional=True)
        _check_synchronized(self.axis_name, self.axis_index_groups)
        check_bool("use_bias", self.use_bias)
        check_bool("use_scale", self.use_scale)
        # Resolved once, so the fields read as linen's do (module.momentum == 0.99); a clone
        # re-validates the resolved values, which is idempotent. Linen modules are frozen
        # dataclasses, hence object.__setattr__ (before linen's own __post_init__ binds it).
        object.__setattr__(self, "momentum", args.momentum)
        object.__setattr__(self, "epsilon", args.eps)
        object.__setattr__(self, "axis", args.axis)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Any, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x``; with ``use_running_average=False`` (outside ``init``) the
        ``batch_stats`` collection moves, so ``apply(..., mutable=["batch_stats"])``."""
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        if mask is not None:
            raise NotImplementedError(_MASK)
        training = not use_running_average
        # As linen, initializing does not synchronize (the named axis need not exist).
        synchronized = not self.is_initializing()
        layer = _Layer(axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
                       convention=self.convention,
                       axis_name=self.axis_name if synchronized else None,
                       axis_index_groups=self.axis_index_groups if synchronized else None)
        channels = _num_channels(x, layer, training=training)
        # As linen: the running statistics first (no rng), then scale before bias, so a
        # random initializer draws the same keys.
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        running = {"mean": self.variable("batch_stats", "mean", jnp.zeros, (channels,),
                                         stats_dtype),
                   "var": self.variable("batch_stats", "var", jnp.ones, (channels,),
                                        stats_dtype)}
        if self.momentum is None:
            running["num_batches_tracked"] = self.variable(
                "batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        scale = (self.param("scale", self.scale_init, (channels,), self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", self.bias_init, (channels,), self.param_dtype)
                if self.use_bias else None)
        y, new_stats = _normalize(layer, x, scale, bias,
                                  {name: v.value for name, v in running.items()},
                                  training=training, dtype=self.dtype,
                                  force_float32_reductions=self.force_float32_reductions)
        # As linen, initializing does not move the statistics.
        if training and not self.is_initializing():
            for name, variable in running.items():
                variable.value = new_stats[name]
        return y


class NNXBatchNorm(nnx.Module):
    """``flax.nnx.BatchNorm`` on bnref's math (see the module docstring for the formula).

    The constructor is nnx's, with ``convention`` added; ``momentum``, ``epsilon`` and ``axis``
    default to the convention's and are stored resolved. The attributes are nnx's: ``scale``,
    ``bias`` (``nnx.Param``, or None without ``use_scale``/``use_bias``), ``mean``, ``var``
    (``nnx.BatchStat``, created in float32 whatever ``param_dtype`` is, as nnx does), plus
    ``num_batches_tracked`` with ``momentum=None``. ``use_running_average`` set here, by
    ``module.train()``/``module.eval()``, or at call time (which wins). ``use_fast_variance``
    is accepted and ignored; ``axis_name``/``axis_index_groups`` synchronize the statistics in
    training, with bnref's two-pass variance of the union.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        axis: int | None = None,
        momentum: float | None = DEFAULT,  # type: ignore[assignment]
        epsilon: float | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,  # what nnx's zeros_init() returns
        scale_init: Initializer = jax.nn.initializers.ones,  # what nnx's ones_init() returns
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        rngs: nnx.Rngs,
        convention: str | Convention = "flax",
    ) -> None:
        args = check_layer_args(num_features, momentum=momentum, eps=epsilon,
                                convention=convention, axis=axis)
        _check_synchronized(axis_name, axis_index_groups)
        shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        if args.momentum is None:
            self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        # scale then bias, each from rngs.params(), as nnx.BatchNorm: the same rng stream
        # is left for the layers built after this one.
        self.scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype))
                      if check_bool("use_scale", use_scale) else _no_param())
        self.bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype))
                     if check_bool("use_bias", use_bias) else _no_param())
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis, self.momentum, self.epsilon = args.axis, args.momentum, args.eps
        self.dtype, self.param_dtype = dtype, param_dtype
        self.use_bias, self.use_scale = use_bias, use_scale
        self.bias_init, self.scale_init = bias_init, scale_init
        self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.convention = convention

    def __call__(self, x: Any, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x``; in training (``use_running_average`` false) ``mean`` and ``var``
        move in place, as nnx's do."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("use_running_average must be given to the constructor, to the "
                             "call, or set by module.train()/module.eval()")
        if mask is not None:
            raise NotImplementedError(_MASK)
        training = not use_running_average
        layer = _Layer(axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
                       convention=self.convention, axis_name=self.axis_name,
                       axis_index_groups=self.axis_index_groups)
        _num_channels(x, layer, training=training)
        running = {"mean": self.mean, "var": self.var}
        if self.momentum is None:
            running["num_batches_tracked"] = self.num_batches_tracked
        y, new_stats = _normalize(
            layer, x, None if self.scale is None else self.scale.value,
            None if self.bias is None else self.bias.value,
            {name: v.value for name, v in running.items()}, training=training, dtype=self.dtype)
        if training:
            for name, variable in running.items():
                variable.value = new_stats[name]
        return y
