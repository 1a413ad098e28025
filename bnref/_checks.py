"""Argument validation shared by every backend.

Backends describe their arrays to these functions as ``(shape, dtype name)`` through an
``inspect`` callable, so the same mistake gives the same exception type and the same message in
every framework: ``TypeError`` for a wrong array type or dtype, ``ValueError`` for wrong shapes
and values. dtypes are named by their numpy names (``int32``) and shapes are tuples. Validation
only reads its arguments; nothing is modified.

A dimension unknown until run time (the batch dimension of a traced TensorFlow graph) is
``None`` in a shape: checks that need its size are left to run time, and ``count`` is ``None``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bnref.conventions import DEFAULT, Convention, default_momentum, get_convention

FLOATING_DTYPES = ("float16", "bfloat16", "float32", "float64")
MIN_RANK, MAX_RANK = 2, 5

# inspect(value) -> (shape, dtype name), or None when value is not this framework's array.
# A dimension may be None when only run time knows it.
Inspect = Callable[[Any], "tuple[tuple[int | None, ...], str] | None"]


@dataclass(frozen=True)
class BatchNormArgs:
    """The validated, resolved arguments of a ``batch_norm`` call."""

    axis: int  # non-negative channel axis
    reduce_axes: tuple[int, ...]  # every other axis
    num_channels: int | None  # None: unknown until run time
    count: int | None  # values per channel; None: unknown until run time
    eps: float
    momentum: float
    convention: Convention
    has_running_stats: bool


def _describe(value: Any, inspect: Inspect) -> str:
    if value is None:
        return "None"
    info = inspect(value)
    return f"shape {info[0]}" if info else type(value).__name__


def _array(name: str, value: Any, inspect: Inspect,
           array_type: str) -> tuple[tuple[int | None, ...], str]:
    info = inspect(value)
    if info is None:
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise TypeError(f"{name} must be a {array_type}, got {kind}")
    shape, dtype = tuple(None if d is None else int(d) for d in info[0]), str(info[1])
    if dtype not in FLOATING_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype ({', '.join(FLOATING_DTYPES)}), got {dtype}"
        )
    return shape, dtype


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _is_real(value: Any) -> bool:
    # numbers.Real covers Python and numpy scalars without importing numpy.
    return isinstance(value, numbers.Real) and not _is_bool(value)


def check_eps(eps: Any) -> float:
    if not _is_real(eps):
        raise TypeError(f"eps must be a float > 0, got {eps!r}")
    if not (math.isfinite(float(eps)) and float(eps) > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum: Any, *, allow_none: bool) -> float | None:
    if momentum is None:
        if allow_none:
            return None
        raise ValueError(
            "momentum must be a float in [0, 1], got None: the cumulative average needs the "
            "batch counter of a layer (BatchNorm(momentum=None))"
        )
    return check_fraction("momentum", momentum)


def check_fraction(name: str, value: Any) -> float:
    """``value`` is a real number in [0, 1] (a momentum, or another averaging weight)."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # NaN fails this too
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if _is_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def check_axis(axis: Any, ndim: int) -> int:
    if _is_bool(axis) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int or None, got {axis!r}")
    if not -ndim <= int(axis) < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim - 1}] for x of rank {ndim}, got {axis}")
    return int(axis) % ndim


def check_batch_norm_args(
    x: Any,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    *,
    training: Any,
    momentum: Any,
    eps: Any,
    axis: Any,
    convention: Any,
    inspect: Inspect,
    array_type: str,
    allow_empty: bool = False,
) -> BatchNormArgs:
    """Validate a ``batch_norm`` call and resolve the convention's defaults.

    ``array_type`` names the framework's array type in messages ("torch.Tensor").
    ``allow_empty``: the backend accepts an ``x`` with no values (a zero batch or spatial size),
    as ``torch.nn.BatchNorm*d`` does (an empty ``y``, running statistics unchanged); ``count``
    is then 0. Backends whose built-in has no such rule refuse it.
    """
    x_shape, _ = _array("x", x, inspect, array_type)
    ndim = len(x_shape)
    if not MIN_RANK <= ndim <= MAX_RANK:
        raise ValueError(
            f"x must have rank {MIN_RANK} to {MAX_RANK}, got rank {ndim} with shape {x_shape}"
        )
    if 0 in x_shape and not allow_empty:
        raise ValueError(f"x must hold at least one value per channel, got shape {x_shape}")
    conv = get_convention(convention)
    if not conv.is_plain:
        raise ValueError(
            f"convention {conv.name!r} {conv.rule_description}, which batch_norm does not run: "
            f"use bnref.numpy.BatchNorm(convention={conv.name!r}), or "
            f"convention=get_convention({conv.name!r}).plain() for one step of its stored "
            "moving average"
        )
    channel_axis = check_axis(conv.default_axis if axis is None else axis, ndim)
    resolved_eps = conv.default_eps if eps is None else check_eps(eps)
    resolved_momentum = (default_momentum(conv) if momentum is DEFAULT
                         else check_momentum(momentum, allow_none=False))
    training = check_bool("training", training)

    num_channels = x_shape[channel_axis]
    for name, value in (("gamma", gamma), ("beta", beta),
                        ("running_mean", running_mean), ("running_var", running_var)):
        if value is None:
            continue
        shape, _ = _array(name, value, inspect, array_type)
        if not _compatible(shape, (num_channels,)):
            raise ValueError(
                f"{name} must have shape ({num_channels},) to match the {num_channels} channels "
                f"of x on axis {channel_axis}, got shape {shape}"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together or both be None, got "
            f"running_mean={_describe(running_mean, inspect)} and "
            f"running_var={_describe(running_var, inspect)}"
        )

    known = None not in x_shape
    if not known:
        count = None
    elif num_channels == 0:  # only with allow_empty: no channel, so no value in any
        count = 0
    else:
        count = math.prod(x_shape) // num_channels
    uses_batch_stats = training or running_mean is None
    if uses_batch_stats and count == 1 and conv.single_value_error:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input of shape "
            f"{x_shape} (channel axis {channel_axis})"
        )
    reduce_axes = tuple(i for i in range(ndim) if i != channel_axis)
    return BatchNormArgs(channel_axis, reduce_axes, num_channels, count, resolved_eps,
                         resolved_momentum, conv, running_mean is not None)


def _compatible(shape: tuple[int | None, ...], expected: tuple[int | None, ...]) -> bool:
    """Equal shapes, where an unknown (None) dimension matches any size."""
    return len(shape) == len(expected) and all(
        a is None or b is None or a == b for a, b in zip(shape, expected, strict=True))


def check_like(name: str, value: Any, shape: tuple[int | None, ...], *, inspect: Inspect,
               array_type: str) -> None:
    """``value`` must be a floating array of exactly ``shape`` (e.g. ``dy`` against ``x``)."""
    got, _ = _array(name, value, inspect, array_type)
    if not _compatible(got, tuple(shape)):
        raise ValueError(f"{name} must have the shape of x, {tuple(shape)}, got shape {got}")


@dataclass(frozen=True)
class LayerArgs:
    convention: Convention
    momentum: float | None  # None: cumulative average
    eps: float
    axis: int  # as given (may be negative), or the convention's default


def check_layer_args(
    num_features: Any, *, momentum: Any, eps: Any, convention: Any, axis: Any = None,
    features_optional: bool = False, library_rules: bool = False,
) -> LayerArgs:
    """Validate a layer constructor's arguments; an omitted momentum, eps or axis is the
    convention's. With ``features_optional``, ``num_features=None`` means "taken from the first
    input" (Keras, Gluon, Flax layers). ``library_rules``: the layer runs the conventions
    whose rules go beyond the plain moving average (first-batch seeding, zero-debiasing,
    training normalised with the running statistics: only ``bnref.numpy.BatchNorm`` does);
    other layers refuse them."""
    if not (features_optional and num_features is None) and (
            _is_bool(num_features) or not isinstance(num_features, numbers.Integral)
            or num_features < 1):
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    conv = get_convention(convention)
    if not conv.is_plain and not library_rules:
        raise ValueError(
            f"convention {conv.name!r} {conv.rule_description}; this layer runs the plain "
            f"moving average only: use bnref.numpy.BatchNorm(convention={conv.name!r})"
        )
    resolved_momentum = (
        default_momentum(conv) if momentum is DEFAULT else check_momentum(momentum, allow_none=True)
    )
    if conv.debias is not None and resolved_momentum is None:
        raise ValueError(
            f"momentum=None (a cumulative average) has no zero-debiased form: the {conv.name!r} "
            "convention needs a float momentum"
        )
    if conv.debias is not None and conv.new_value_weight(resolved_momentum) == 0.0:
        raise ValueError(
            f"momentum must give the new batch a nonzero weight under the zero-debiased "
            f"{conv.name!r} convention (inference divides by 1 - m^k, which is 0), got "
            f"{resolved_momentum!r}"
        )
    resolved_eps = conv.default_eps if eps is None else check_eps(eps)
    if axis is not None and (_is_bool(axis) or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"axis must be an int or None, got {axis!r}")
    resolved_axis = conv.default_axis if axis is None else int(axis)
    return LayerArgs(conv, resolved_momentum, resolved_eps, resolved_axis)


def check_mask(mask_shape: tuple[int | None, ...], x_shape: tuple[int | None, ...]) -> None:
    """A mask over the positions of ``x``, whose last axis holds each position's features
    (Keras's layout: ``(batch, steps)`` for ``(batch, steps, features)``): one axis fewer than
    ``x``, broadcastable to ``x`` without its last axis. Unknown (None) sizes match any size."""
    mask_shape, x_shape = tuple(mask_shape), tuple(x_shape)
    if len(mask_shape) != len(x_shape) - 1:
        # Keras's wording (keras/src/layers/normalization/batch_normalization.py, call).
        raise ValueError("The mask provided should be one dimension less than the inputs. "
                         f"Received: mask.shape={mask_shape}, inputs.shape={x_shape}")
    if not all(m is None or d is None or m in (1, d)
               for m, d in zip(mask_shape, x_shape[:-1], strict=True)):
        raise ValueError(f"mask must broadcast to the shape of x without its last axis, "
                         f"{x_shape[:-1]}, got shape {mask_shape}")


RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def check_renorm_clipping(clipping: Any) -> dict[str, Any]:
    """Batch renormalization's bounds: ``r`` in ``[rmin, rmax]``, ``d`` in ``[-dmax, dmax]``; a
    missing (or None) bound is no bound. ``None`` means no bounds at all. The ValueErrors use
    Keras's wording (keras/src/layers/normalization/batch_normalization.py, ``__init__``)."""
    if clipping is None:
        return {}
    if not isinstance(clipping, Mapping):
        raise TypeError(f"renorm_clipping must be a dict with keys among "
                        f"{list(RENORM_CLIPPING_KEYS)}, got {clipping!r}")
    if set(clipping) - set(RENORM_CLIPPING_KEYS):
        raise ValueError(f"Received invalid keys for `renorm_clipping` argument: {clipping}. "
                         f"Supported values: {list(RENORM_CLIPPING_KEYS)}.")
    for key, value in clipping.items():
        if value is not None and not _is_real(value):
            raise TypeError(f"renorm_clipping[{key!r}] must be a float or None, got {value!r}")
    rmax, rmin, dmax = (clipping.get(key) for key in RENORM_CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError("rmax should be greater than rmin in the `renorm_clipping` argument. "
                         f"Received: rmax={rmax}, rmin={rmin}.")
    if dmax is not None and dmax < 0:
        raise ValueError("dmax should be non-negative in the `renorm_clipping` argument. "
                         f"Received: dmax={dmax}.")
    return dict(clipping)


# -- synchronized batch norm (JAX's named axes) ------------------------------------------

AxisName = str | tuple[str, ...]
Groups = tuple[tuple[int, ...], ...]


def check_axis_name(axis_name: Any) -> AxisName | None:
    """``axis_name``: None, a str (the name given to ``jax.vmap``/``jax.pmap``/a mesh axis of
    ``jax.shard_map``) or a non-empty tuple of distinct str (several named axes reduced
    together, as ``jax.lax.psum`` takes them); a list is taken as a tuple."""
    if axis_name is None or isinstance(axis_name, str):
        return axis_name
    if isinstance(axis_name, (tuple, list)) and all(isinstance(n, str) for n in axis_name):
        if not axis_name or len(set(axis_name)) != len(axis_name):
            raise ValueError("axis_name must be a str or a non-empty tuple of distinct str, "
                             f"got {axis_name!r}")
        return tuple(axis_name)
    raise TypeError("axis_name must be a str (the axis name of jax.vmap, jax.pmap or a "
                    f"shard_map mesh), a tuple of str, or None, got {axis_name!r}")


def check_axis_index_groups(axis_index_groups: Any, axis_name: Any) -> Groups | None:
    """``axis_index_groups``: None, or a non-empty list of non-empty lists of ints >= 0 (axis
    indices along ``axis_name``), no index twice; that they cover the axis is checked where
    its size is known (:func:`sync_group_sizes`). Needs ``axis_name``."""
    if axis_index_groups is None:
        return None
    if axis_name is None:
        raise ValueError("axis_index_groups needs axis_name (the groups are indices along "
                         f"that named axis), got axis_index_groups={axis_index_groups!r} "
                         "with axis_name=None")
    message = ("axis_index_groups must be a list of lists of axis indices (ints >= 0), e.g. "
               f"[[0, 1], [2, 3]], got {axis_index_groups!r}")
    if hasattr(axis_index_groups, "tolist") and getattr(axis_index_groups, "ndim", 0) == 2:
        axis_index_groups = axis_index_groups.tolist()  # a 2-D numpy array of indices
    if not isinstance(axis_index_groups, (list, tuple)) or not all(
            isinstance(group, (list, tuple)) for group in axis_index_groups):
        raise TypeError(message)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
               and type(i).__name__ != "bool_" for group in axis_index_groups for i in group):
        raise TypeError(message)
    groups = tuple(tuple(int(i) for i in group) for group in axis_index_groups)
    indices = [i for group in groups for i in group]
    if not groups or not all(groups) or min(indices) < 0 or len(set(indices)) != len(indices):
        raise ValueError("axis_index_groups must be non-empty groups of axis indices >= 0, "
                         f"each index in one group once, got {axis_index_groups!r}")
    return groups


def relaxed_convention(convention: Any) -> Any:
    """The convention without its single-value refusal, for synchronized batch norm: the
    shards of one batch decide it over their union, not each on its own. Unchanged when it
    does not resolve (the first check then raises ``batch_norm``'s error, in its order)."""
    try:
        conv = get_convention(convention)
    except ValueError:
        return convention
    return dataclasses.replace(conv, single_value_error=False) if conv.single_value_error else conv
