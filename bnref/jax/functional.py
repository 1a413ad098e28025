"""Batch normalization in JAX: pure ``jax.numpy``, usable under ``jit``, ``grad``, ``vjp``
and ``vmap``.

Training, per channel over every axis but the channel axis (``n`` values each)::

    mean = sum(x) / n
    var  = sum((x - mean)²) / n                (biased, two-pass; XLA fuses the passes)
    y    = (x - mean) * scale + beta           scale = gamma / sqrt(var + eps)
    running <- convention.update_running(running, batch statistic)

Inference uses the running statistics. float16/bfloat16 inputs are computed in float32;
float64 (with ``jax_enable_x64``) in float64. Gradients come from JAX's autodiff of these
operations. Unlike Flax's default ``use_fast_variance=True`` (E[x²]−E[x]²), the variance here
stays accurate at large offsets.

Arrays may be anything JAX's own operations take as an array (``jax.numpy``'s
``check_arraylike``): JAX arrays and tracers, numpy arrays and scalars (weights loaded from a
checkpoint), Python numbers, objects with ``__jax_array__``. They are converted with
``jnp.asarray``, so a float64 numpy array becomes float32 unless ``jax_enable_x64`` is set, as
everywhere in JAX. Lists, tuples and other frameworks' tensors are refused with bnref's
``TypeError``, as ``jnp.add`` and ``flax.linen.BatchNorm`` refuse them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bnref._checks import check_batch_norm_args
from bnref.conventions import DEFAULT, Convention, get_convention

__all__ = ["batch_norm"]

ARRAY_TYPE = "jax.Array or numpy.ndarray"


def _is_array_like(value: Any) -> bool:
    """What ``jnp.add`` takes as an array: ``jax.typing.ArrayLike`` (JAX arrays and tracers,
    numpy arrays and scalars, Python numbers) or an object with ``__jax_array__``. Not lists
    or tuples: jax.numpy refuses them since converting element by element hides a performance
    trap (jax-ml/jax#7737)."""
    return isinstance(value, ArrayLike) or hasattr(value, "__jax_array__")


def describe_array(value: Any) -> tuple[tuple[int, ...], str] | None:
    """``(shape, dtype name)`` of what JAX takes as an array, else None (for validation)."""
    if not _is_array_like(value):
        return None
    if isinstance(value, (np.ndarray, np.generic)):
        # numpy's own dtype, before conversion: the message names the dtype that was passed
        # (int64 stays int64 without x64), and dtypes JAX cannot hold (str, object) get the
        # dtype error rather than JAX's conversion error.
        return tuple(value.shape), value.dtype.name
    array = value if isinstance(value, jax.Array) else jnp.asarray(value)
    return tuple(array.shape), jnp.dtype(array.dtype).name


def as_jax(value: Any) -> Any:
    """``value`` as a ``jax.Array`` when JAX takes it as one (see :func:`_is_array_like`);
    anything else unchanged, for validation to refuse by name."""
    if value is None or isinstance(value, jax.Array) or not _is_array_like(value):
        return value
    return jnp.asarray(value)


def compute_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _per_channel(vector: jax.Array, ndim: int, axis: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def batch_norm(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    running_mean: ArrayLike | None,
    running_var: ArrayLike | None,
    *,
    training: bool,
    momentum: float = DEFAULT,  # type: ignore[assignment]
    eps: float | None = None,
    axis: int | None = None,
    convention: str | Convention = "torch",
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Batch-normalize ``x`` over every axis but the channel axis (see :mod:`bnref.numpy`).

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the biased batch statistics in
    training (or when no running statistics are given) and the running statistics in
    inference. Returns ``(y, new_running_mean, new_running_var)``: in training the running
    statistics move by the convention's rule (torch: ``(1 - m) * old + m * batch``, variance
    unbiased; keras/flax/mxnet/onnx: ``m * old + (1 - m) * batch``, biased). ``training``,
    ``momentum``, ``eps``, ``axis`` and ``convention`` are validated as Python values: pass
    them through ``functools.partial`` or ``static_argnames`` under an outer ``jit``. The math
    itself is jitted once per shapes and flags, with ``eps`` and ``momentum`` traced.

    The arrays may also be numpy arrays (or anything else ``jnp.add`` takes); they are
    converted with ``jnp.asarray``, and the statistics come back as ``jax.Array``.
    """
    args = check_batch_norm_args(x, gamma, beta, running_mean, running_var, training=training,
                                 momentum=momentum, eps=eps, axis=axis, convention=convention,
                                 inspect=describe_array, array_type=ARRAY_TYPE)
    x, gamma, beta, running_mean, running_var = (
        as_jax(value) for value in (x, gamma, beta, running_mean, running_var))
    return _normalise(x, gamma, beta, running_mean, running_var, args.eps, args.momentum,
                      training=training, axis=args.axis, convention=args.convention.name)


@functools.partial(jax.jit, static_argnames=("training", "axis", "convention"))
def _normalise(x, gamma, beta, running_mean, running_var, eps, momentum, *, training: bool,
               axis: int, convention: str):
    """The math, compiled once per shapes, dtypes and static flags: ``eps`` and ``momentum``
    are traced, so new values do not recompile (the public function validated them)."""
    conv = get_convention(convention)
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    count = x.size // x.shape[axis]
    dtype = compute_dtype(x.dtype)
    wide = x.astype(dtype)
    if training or running_mean is None:
        mean = jnp.mean(wide, axis=reduce_axes)
        centered = wide - _per_channel(mean, x.ndim, axis)
        var = jnp.mean(centered * centered, axis=reduce_axes)
    else:
        mean, var = running_mean.astype(dtype), running_var.astype(dtype)
        centered = wide - _per_channel(mean, x.ndim, axis)
    scale = jax.lax.rsqrt(var + jnp.asarray(eps, dtype))
    if gamma is not None:
        scale = scale * gamma.astype(dtype)
    y = centered * _per_channel(scale, x.ndim, axis)
    if beta is not None:
        y = y + _per_channel(beta.astype(dtype), x.ndim, axis)
    y = y.astype(x.dtype)
    if running_mean is None:
        return y, None, None
    if not training:
        return y, running_mean, running_var
    m = jnp.asarray(momentum, dtype)
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    new_mean = conv.update_running(running_mean.astype(dtype), mean, m)
    new_var = conv.update_running(running_var.astype(dtype),
                                  conv.running_var_estimate(var, count), m)
    return y, new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)
