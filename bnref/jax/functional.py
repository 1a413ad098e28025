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

Synchronized (``axis_name=``, in training): the statistics are those of the union of every
shard along the named axis of ``jax.vmap(..., axis_name=)``, ``jax.pmap`` or ``jax.shard_map``
(``N`` values per channel, every member's count together), in two all-reduces::

    mean = psum(sum(x)) / N                      (the global mean)
    var  = psum(sum((x - mean)²)) / N            (two-pass over the union, from the global mean)

exactly the two passes of one device over the concatenated batch, never E[x²]−E[x]² (Flax's
default ``use_fast_variance=True``, which loses every digit at offset 1e4 in float32). The
unbiased running variance (torch convention) uses ``N``. ``axis_index_groups`` (as
``jax.lax.psum``'s: lists of axis indices covering each exactly once) normalise each group
over its own members; they are reduced by one plain ``psum`` of a per-group slot, so they
work under ``vmap`` and ``shard_map`` too (where ``jax.lax.psum`` refuses groups). Gradients
are JAX's autodiff through ``psum``: each member's ``dx`` is its rows of the full batch's
``dx``, and its ``dgamma``/``dbeta`` its own part of the full batch's (they sum to it; under
``shard_map``'s default ``check_vma`` a replicated ``gamma``'s gradient arrives summed).

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

from bnref._checks import (
    AxisName,
    Groups,
    check_axis_index_groups,
    check_axis_name,
    check_batch_norm_args,
    relaxed_convention,
)
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


# -- synchronization (named axes) --------------------------------------------------------------

def sync_group_sizes(axis_name: AxisName, groups: Groups | None) -> list[int]:
    """The size of the group every member of the named axis is in (its position in the
    list: the member's axis index), checking that the axis is bound here and that the groups
    cover it. Call where the axis is bound (inside ``vmap``/``pmap``/``shard_map``)."""
    try:
        # jax.lax.axis_size (JAX 0.6+); before it, psum of a constant is the axis size.
        size = (jax.lax.axis_size(axis_name) if hasattr(jax.lax, "axis_size")
                else jax.lax.psum(1, axis_name))
    except NameError as error:
        raise ValueError(
            f"axis_name {axis_name!r} is not bound here: synchronized batch norm reduces over "
            "a named axis, so call it inside jax.vmap(..., axis_name=...), jax.pmap(..., "
            "axis_name=...) or jax.shard_map over a mesh with that axis name (under jax.jit "
            "with a sharded batch, leave axis_name=None: XLA's partitioner already computes "
            "the full batch's statistics)") from error
    if groups is None:
        return [size] * size
    if sorted(i for group in groups for i in group) != list(range(size)):
        raise ValueError(
            f"axis_index_groups must cover the {size} indices of axis {axis_name!r} (0 to "
            f"{size - 1}) each exactly once, got {[list(g) for g in groups]}")
    sizes = [0] * size
    for group in groups:
        for i in group:
            sizes[i] = len(group)
    return sizes


def _group_sum(value: jax.Array, axis_name: AxisName, groups: Groups | None) -> jax.Array:
    """``jax.lax.psum(value, axis_name, axis_index_groups=groups)``. Groups go through one
    plain psum: each member writes its value into its group's slot of a (groups, ...) array
    (``where``, so a NaN in one group cannot reach another) and reads its group's sum back.
    Plain psum runs (and differentiates) under vmap, pmap and shard_map alike."""
    if groups is None:
        return jax.lax.psum(value, axis_name)
    table = np.zeros(sum(len(g) for g in groups), np.int32)
    for number, group in enumerate(groups):
        table[list(group)] = number
    mine = jnp.asarray(table)[jax.lax.axis_index(axis_name)]
    slots = jnp.arange(len(groups)).reshape((-1,) + (1,) * value.ndim)
    spread = jnp.where(slots == mine, value[None], jnp.zeros((), value.dtype))
    return jax.lax.psum(spread, axis_name)[mine]


def _global_count(count: int, axis_name: AxisName, groups: Groups | None, dtype) -> Any:
    """Values per channel over the union: ``count`` times the member's group size (a Python
    int when every group has one size, else traced per member)."""
    sizes = sync_group_sizes(axis_name, groups)
    if len(set(sizes)) == 1:
        return count * sizes[0]
    table = jnp.asarray(np.asarray(sizes) * count, dtype)
    return table[jax.lax.axis_index(axis_name)]


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
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
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

    ``axis_name`` (a str, or a tuple of them) synchronizes training across the members of
    that named axis of ``jax.vmap``/``jax.pmap``/``jax.shard_map`` (the call must run inside
    one): the batch statistics, ``y`` and the new running statistics are those of the union
    of every member's ``x`` (the full batch), the same on every member. Each member's ``x``
    has the same shape, as JAX's collectives require. ``axis_index_groups`` (lists of axis
    indices covering each exactly once, as ``jax.lax.psum``) synchronize within each group
    only. Inference, and ``axis_name=None``, is exactly the unsynchronized call (no
    collective; the axis need not be bound). See the module docstring for the two-pass
    reduction.
    """
    axis_name = check_axis_name(axis_name)
    groups = check_axis_index_groups(axis_index_groups, axis_name)
    synchronized = (axis_name is not None and isinstance(training, (bool, np.bool_))
                    and bool(training))
    relaxed = convention
    if synchronized:
        try:
            relaxed = relaxed_convention(get_convention(convention))
        except ValueError:  # check_batch_norm_args names it
            pass
    args = check_batch_norm_args(x, gamma, beta, running_mean, running_var, training=training,
                                 momentum=momentum, eps=eps, axis=axis, convention=relaxed,
                                 inspect=describe_array, array_type=ARRAY_TYPE)
    conv = get_convention(convention)
    if synchronized:
        sizes = sync_group_sizes(axis_name, groups)
        if conv.single_value_error and args.count * min(sizes) == 1:
            shape = describe_array(x)[0]
            # batch_norm's (and PyTorch's) wording, over the union of the shards.
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per "
                f"channel in the union of {min(sizes)} shard(s) of shape {shape} along "
                f"axis_name {axis_name!r} (channel axis {args.axis})")
    x, gamma, beta, running_mean, running_var = (
        as_jax(value) for value in (x, gamma, beta, running_mean, running_var))
    return _normalise(x, gamma, beta, running_mean, running_var, args.eps, args.momentum,
                      training=training, axis=args.axis, convention=conv.name,
                      axis_name=axis_name if synchronized else None,
                      groups=groups if synchronized else None)


@functools.partial(jax.jit, static_argnames=("training", "axis", "convention", "axis_name",
                                             "groups"))
def _normalise(x, gamma, beta, running_mean, running_var, eps, momentum, *, training: bool,
               axis: int, convention: str, axis_name: AxisName | None = None,
               groups: Groups | None = None):
    """The math, compiled once per shapes, dtypes and static flags: ``eps`` and ``momentum``
    are traced, so new values do not recompile (the public function validated them).
    ``axis_name`` (training only): the statistics of the union along that axis."""
    conv = get_convention(convention)
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    count = x.size // x.shape[axis]
    dtype = compute_dtype(x.dtype)
    wide = x.astype(dtype)
    if axis_name is not None:
        # Two all-reduces, two passes over the union: the global mean from the global sum
        # and count, then the global sum of squared deviations from that mean.
        count = _global_count(count, axis_name, groups, dtype)
        mean = _group_sum(jnp.sum(wide, axis=reduce_axes), axis_name, groups) / count
        centered = wide - _per_channel(mean, x.ndim, axis)
        var = _group_sum(jnp.sum(centered * centered, axis=reduce_axes), axis_name,
                         groups) / count
    elif training or running_mean is None:
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
