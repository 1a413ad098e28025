"""Hypothesis strategies for batch-norm cases: the only place test inputs are drawn.

Inputs are built as ``offset_c + spread_c * unit`` per channel, with ``unit`` in [-1, 1] from
``hypothesis.extra.numpy.arrays`` (which fills many positions with one repeated value, so
constant and near-constant channels come for free), offsets up to 1e4 in magnitude and spreads
from 1e-3 to 1e2 (or exactly 0: a constant channel), then rounded to the case's dtype. The
float64 oracle always sees exactly the rounded values.

No drawn value is subnormal unless a strategy is asked for them (``subnormals=True``): some
frameworks refuse subnormal scalars (MXNet: "Out of range value for scalar") or flush them to
zero, which says nothing about their batch norm. :func:`cases_for` and
:func:`layer_cases_for` draw within what a :class:`~bnref.testing.backends.Backend` declares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bnref.conventions import CONVENTIONS, DEFAULT, get_convention
from bnref.testing.backends import LayerConfig
from bnref.testing.tolerances import MAX_FINITE

__all__ = [
    "SHAPE_POOL",
    "BNCase",
    "LayerCase",
    "Unsupported",
    "bn_cases",
    "cases_for",
    "layer_cases",
    "layer_cases_for",
    "numpy_dtype",
    "param_dtype",
    "with_directions",
    "with_dy",
]

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")
# A small pool of shapes for backends that compile per shape (JAX, TensorFlow's XLA): ranks
# 2-5, and every axis of each is drawn as the channel axis, so C runs from 1 to 4 and the
# values per channel from 1 to 48.
SHAPE_POOL = ((6, 2), (16, 1), (2, 3, 4), (4, 1, 3), (2, 3, 2, 2), (1, 2, 3, 2, 2))
# Largest side per rank keeps every array small (at most a few hundred values).
_MAX_SIDE = {2: 24, 3: 8, 4: 5, 5: 3}


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a name; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def param_dtype(dtype: str) -> str:
    """Parameters and running statistics: float64 with float64 data, float32 otherwise."""
    return "float64" if dtype == "float64" else "float32"


@dataclass(frozen=True)
class BNCase:
    """One ``batch_norm`` call: arrays in numpy, arguments as the user would pass them."""

    x: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    training: bool
    momentum: Any = DEFAULT
    eps: float | None = None
    axis: int | None = None
    convention: str = "torch"

    @property
    def arrays(self) -> tuple[np.ndarray | None, ...]:
        return (self.x, self.gamma, self.beta, self.running_mean, self.running_var)

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"training": self.training, "eps": self.eps, "axis": self.axis,
                               "convention": self.convention}
        if self.momentum is not DEFAULT:
            out["momentum"] = self.momentum
        return out

    @property
    def channel_axis(self) -> int:
        axis = get_convention(self.convention).default_axis if self.axis is None else self.axis
        return axis % self.x.ndim

    @property
    def resolved_eps(self) -> float:
        return get_convention(self.convention).default_eps if self.eps is None else self.eps

    @property
    def resolved_momentum(self) -> float:
        conv = get_convention(self.convention)
        return conv.default_momentum if self.momentum is DEFAULT else self.momentum

    @property
    def dtype(self) -> str:
        return self.x.dtype.name

    def with_(self, **changes: Any) -> BNCase:
        return replace(self, **changes)

    def as_float64(self) -> BNCase:
        """The same case with every array widened (exactly) to float64: the oracle's input."""
        return replace(self, **{
            name: None if value is None else value.astype(np.float64)
            for name, value in zip(("x", "gamma", "beta", "running_mean", "running_var"),
                                   self.arrays, strict=True)
        })


@dataclass(frozen=True)
class LayerCase:
    """A layer run: several training batches, then one inference batch."""

    config: LayerConfig
    batches: tuple[np.ndarray, ...]
    eval_batch: np.ndarray
    initial_state: dict[str, np.ndarray] | None = field(default=None)

    @property
    def channel_axis(self) -> int:
        conv = get_convention(self.config.convention)
        axis = conv.default_axis if self.config.axis is None else self.config.axis
        return axis % self.eval_batch.ndim


def _floats(low: float, high: float, subnormals: bool = False):
    return st.floats(low, high, allow_subnormal=subnormals)


def _flush(array: np.ndarray, subnormals: bool) -> np.ndarray:
    """``array`` with its subnormal values set to zero (unless they were asked for): a
    product such as spread * unit can land below the dtype's smallest normal once rounded."""
    if subnormals or (array.dtype.kind != "f" and array.dtype.name != "bfloat16"):
        return array
    smallest = float(np.finfo(np.float32).tiny) if array.dtype.name == "bfloat16" else float(
        np.finfo(array.dtype).tiny)
    magnitude = np.abs(array.astype(np.float64))
    out = np.array(array, copy=True)
    out[(magnitude < smallest) & (magnitude > 0)] = 0
    return out


_offsets = st.one_of(st.just(0.0), _floats(-10, 10), _floats(-1e4, 1e4))
_spreads = st.one_of(st.just(0.0), st.floats(-3, 2).map(lambda e: 10.0**e))
_units = _floats(-1, 1)


@st.composite
def _shape(draw, rank: int, channel_axis: int, channels: int, min_per_channel: int):
    side = _MAX_SIDE[rank]
    dims = draw(st.lists(st.integers(1, side), min_size=rank - 1, max_size=rank - 1))
    if math.prod(dims) < min_per_channel:
        dims[0] = min_per_channel
    dims.insert(channel_axis, channels)
    return tuple(dims)


@st.composite
def _values(draw, shape: tuple[int, ...], channel_axis: int, dtype: str,
            offsets: np.ndarray | None = None, spreads: np.ndarray | None = None,
            subnormals: bool = False):
    """(x in dtype, offsets, spreads): per channel offset + spread * unit."""
    channels = shape[channel_axis]
    if offsets is None:
        offsets = np.array(draw(st.lists(_offsets, min_size=channels, max_size=channels)))
    if spreads is None:
        spreads = np.array(draw(st.lists(_spreads, min_size=channels, max_size=channels)))
    unit = draw(arrays(np.float64, shape, elements=_floats(-1, 1, subnormals)))
    per_channel = [1] * len(shape)
    per_channel[channel_axis] = channels
    x = offsets.reshape(per_channel) + spreads.reshape(per_channel) * unit
    return _flush(x.astype(numpy_dtype(dtype)), subnormals), offsets, spreads


def _vector(draw, channels: int, dtype: str, elements, subnormals: bool = False) -> np.ndarray:
    return _flush(draw(arrays(np.float64, (channels,), elements=elements)).astype(dtype),
                  subnormals)


_running_var = st.floats(-3, 4).map(lambda e: 10.0**e)


def _keep_inference_finite(x, channel_axis, gamma, beta, running_mean, running_var):
    """Raise running_var where inference would overflow x's dtype (float16 tops out at 65504):
    an overflowing output has no finite reference to compare with."""
    limit = 0.25 * MAX_FINITE[x.dtype.name]
    x64 = np.moveaxis(x.astype(np.float64), channel_axis, -1).reshape(-1, x.shape[channel_axis])
    reach = np.abs(x64 - running_mean.astype(np.float64)).max(axis=0)
    g = 1.0 if gamma is None else np.abs(gamma.astype(np.float64))
    b = 0.0 if beta is None else np.abs(beta.astype(np.float64))
    needed = (g * reach / np.maximum(limit - b, 1.0)) ** 2
    return np.maximum(running_var, needed).astype(running_var.dtype)
_momentum = st.one_of(st.just(DEFAULT), st.sampled_from([0.0, 0.1, 0.9, 0.99, 1.0]),
                      _floats(0, 1))
_eps = st.one_of(st.none(), st.sampled_from([1e-5, 1e-3, 0.1]), st.floats(-6, 0).map(
    lambda e: 10.0**e))


@st.composite
def _axis(draw, rank: int, convention: str, channel_axis: int | None = None):
    """(channel axis as a non-negative int, axis as passed: non-negative, negative or None)."""
    default = get_convention(convention).default_axis % rank
    if channel_axis is None:
        # The convention's own axis half the time: it is where real models put the channels,
        # and the only place an implementation's default axis (axis=None) shows.
        channel_axis = draw(st.one_of(st.just(default), st.integers(0, rank - 1)))
    explicit = st.sampled_from([channel_axis, channel_axis - rank])
    if channel_axis == default:
        return channel_axis, draw(st.one_of(st.none(), explicit))
    return channel_axis, draw(explicit)


@st.composite
def _geometry(draw, convention: str, ranks: tuple[int, int], max_channels: int,
              min_per_channel: int, channel_axis: int | None, shapes):
    """(shape, channel axis, axis as passed): drawn freely, or from a fixed pool of shapes.

    A pool keeps the number of distinct shapes small for backends that compile per shape
    (JAX); the channel axis is still drawn, so one shape serves several channel counts.
    """
    if shapes is None:
        rank = draw(st.integers(*ranks))
        pinned = None if channel_axis is None else channel_axis % rank
        channel_axis, axis = draw(_axis(rank, convention, pinned))
        channels = draw(st.integers(1, max_channels))
        return draw(_shape(rank, channel_axis, channels, min_per_channel)), channel_axis, axis
    choices = [
        (shape, a) for shape in shapes if ranks[0] <= len(shape) <= ranks[1]
        for a in range(len(shape))
        if (channel_axis is None or a == channel_axis % len(shape)) and shape[a] <= max_channels
        and math.prod(shape) // shape[a] >= min_per_channel
    ]
    shape, chosen = draw(st.sampled_from(choices))
    return shape, *draw(_axis(len(shape), convention, chosen))


@st.composite
def bn_cases(
    draw,
    *,
    dtypes: tuple[str, ...] = ("float32",),
    conventions: tuple[str, ...] = tuple(CONVENTIONS),
    training: bool | None = None,
    running_stats: bool | None = None,
    affine: bool | None = None,
    ranks: tuple[int, int] = (2, 5),
    max_channels: int = 4,
    min_per_channel: int = 2,
    offsets: bool = True,
    channel_axis: int | None = None,
    float32_constants: bool = False,
    shapes: tuple[tuple[int, ...], ...] | None = None,
    eps: Any = None,
    momentum: Any = None,
    subnormals: bool = False,
) -> BNCase:
    """A valid ``batch_norm`` call. ``None`` for a flag means "either".

    ``affine=True`` gives both gamma and beta, ``False`` neither, ``None`` any of the four
    combinations. ``offsets=False`` keeps every channel centred (offset 0). ``channel_axis``
    pins where the channels are (``-1``: the last axis whatever the rank).
    ``float32_constants`` rounds eps and momentum to float32 values, for built-ins that store
    them as float32 (ONNX attributes). ``eps``/``momentum`` are strategies replacing the
    default draws. ``subnormals`` lets drawn values be subnormal.
    """
    dtype = draw(st.sampled_from(dtypes))
    convention = draw(st.sampled_from(conventions))
    shape, channel_axis, axis = draw(_geometry(convention, ranks, max_channels, min_per_channel,
                                               channel_axis, shapes))
    channels = shape[channel_axis]
    zero = np.zeros(channels) if not offsets else None
    x, _, _ = draw(_values(shape, channel_axis, dtype, offsets=zero, subnormals=subnormals))
    pdtype = param_dtype(dtype)
    # gamma and beta are independent in the API: affine=None draws each on its own.
    use_gamma = draw(st.booleans()) if affine is None else affine
    use_beta = draw(st.booleans()) if affine is None else affine
    gamma = _vector(draw, channels, pdtype, _floats(-2, 2, subnormals),
                    subnormals) if use_gamma else None
    beta = _vector(draw, channels, pdtype, _floats(-5, 5, subnormals),
                   subnormals) if use_beta else None
    with_stats = draw(st.booleans()) if running_stats is None else running_stats
    running_mean = _vector(draw, channels, pdtype, _offsets, subnormals) if with_stats else None
    running_var = _vector(draw, channels, pdtype, _running_var) if with_stats else None
    if with_stats:
        running_var = _keep_inference_finite(x, channel_axis, gamma, beta, running_mean,
                                             running_var)
    momentum = draw(_momentum if momentum is None else momentum)
    eps = draw(_eps if eps is None else eps)
    if float32_constants:
        conv = get_convention(convention)
        momentum = float(np.float32(conv.default_momentum if momentum is DEFAULT else momentum))
        eps = float(np.float32(conv.default_eps if eps is None else eps))
    return BNCase(
        x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var,
        training=draw(st.booleans()) if training is None else training,
        momentum=momentum, eps=eps, axis=axis, convention=convention,
    )


@st.composite
def layer_cases(
    draw,
    *,
    dtypes: tuple[str, ...] = ("float32",),
    conventions: tuple[str, ...] = tuple(CONVENTIONS),
    momentum=None,
    track_running_stats: bool | None = None,
    ranks: tuple[int, int] = (2, 5),
    max_channels: int = 4,
    max_steps: int = 4,
    load_state: bool | None = None,
    channel_axis: int | None = None,
    shapes: tuple[tuple[int, ...], ...] | None = None,
    eps: Any = None,
    affine: bool | None = None,
    subnormals: bool = False,
) -> LayerCase:
    """Several training batches (same channels, same per-channel offsets) and an eval batch.

    ``momentum`` is a strategy (default: DEFAULT, None or a float in [0, 1]);
    ``channel_axis`` pins where the channels are; with a pool of ``shapes`` every batch has
    the same shape. ``affine`` ``None`` means either.
    """
    dtype = draw(st.sampled_from(dtypes))
    convention = draw(st.sampled_from(conventions))
    first_shape, channel_axis, axis = draw(_geometry(convention, ranks, max_channels, 2,
                                                     channel_axis, shapes))
    channels = first_shape[channel_axis]
    momentum_strategy = momentum if momentum is not None else st.one_of(st.none(), _momentum)
    pdtype = param_dtype(dtype)
    config = LayerConfig(
        num_features=channels, convention=convention, momentum=draw(momentum_strategy),
        eps=draw(_eps if eps is None else eps),
        affine=draw(st.booleans()) if affine is None else affine,
        track_running_stats=(draw(st.booleans()) if track_running_stats is None
                             else track_running_stats),
        axis=axis, param_dtype=pdtype,
    )
    steps = draw(st.integers(1, max_steps))
    first, offsets, spreads = draw(_values(first_shape, channel_axis, dtype,
                                           subnormals=subnormals))
    batches = [first]
    for _ in range(steps):  # later batches may change size, not channels or distribution
        shape = first_shape if shapes is not None else draw(
            _shape(len(first_shape), channel_axis, channels, 2))
        batches.append(draw(_values(shape, channel_axis, dtype, offsets, spreads,
                                    subnormals))[0])
    initial_state = None
    if load_state if load_state is not None else draw(st.booleans()):
        initial_state = {}
        if config.affine:
            initial_state["gamma"] = _vector(draw, channels, pdtype, _floats(-2, 2))
            initial_state["beta"] = _vector(draw, channels, pdtype, _floats(-5, 5))
        if config.track_running_stats:
            # Loaded statistics come from data like this (a model trained on it), so the
            # inference output stays in float16's range.
            near = _vector(draw, channels, "float64", _floats(-10, 10))
            initial_state["running_mean"] = (offsets + near).astype(pdtype)
            initial_state["running_var"] = _vector(draw, channels, pdtype, _running_var)
            initial_state["num_batches_tracked"] = np.asarray(draw(st.integers(0, 5)), np.int64)
    return LayerCase(config, tuple(batches[:-1]), batches[-1], initial_state)


@st.composite
def with_dy(draw, cases) -> tuple[BNCase, np.ndarray]:
    """(case, dy): an upstream gradient in [-1, 1] of ``case.x``'s shape and dtype."""
    case = draw(cases)
    dy = draw(arrays(np.float64, case.x.shape, elements=_floats(-1, 1)), label="dy")
    return case, _flush(dy.astype(case.x.dtype), False)


@st.composite
def with_directions(draw, cases) -> tuple[BNCase, np.ndarray, dict[str, np.ndarray]]:
    """(case, dy, direction): dy plus a random direction in (x, gamma, beta) space, in
    float64, for central differences."""
    case, dy = draw(with_dy(cases))
    channels = case.x.shape[case.channel_axis]
    unit = _floats(-1, 1)
    direction = {
        "x": draw(arrays(np.float64, case.x.shape, elements=unit), label="x direction"),
        "gamma": draw(arrays(np.float64, (channels,), elements=unit), label="gamma direction"),
        "beta": draw(arrays(np.float64, (channels,), elements=unit), label="beta direction"),
    }
    return case, dy, direction


class Unsupported(Exception):
    """A property asks for cases outside what a backend declares (the message says which)."""


_ROUND_TRIPS: set[int] = set()


def _check_float64(backend) -> None:
    """Refuse loudly an adapter that declares float64 but computes it in another dtype (JAX
    without x64 turns float64 arrays into float32 silently)."""
    if id(backend) in _ROUND_TRIPS or "float64" not in backend.dtypes:
        return
    got = np.asarray(backend.to_numpy(backend.asarray(np.zeros(2)))).dtype
    if got != np.float64:
        raise ValueError(
            f"backend {backend.name!r} declares float64, but a float64 array comes back "
            f"{got} through its asarray/to_numpy; for JAX enable x64 first "
            "(jax.config.update('jax_enable_x64', True)), or declare dtypes without float64")
    _ROUND_TRIPS.add(id(backend))


def _restrict(backend, wanted: dict[str, Any], layer: bool) -> dict[str, Any]:
    _check_float64(backend)
    name = backend.name
    out: dict[str, Any] = {"dtypes": tuple(backend.dtypes),
                           "conventions": tuple(backend.conventions),
                           "shapes": backend.shape_pool, "ranks": tuple(backend.ranks),
                           "subnormals": backend.subnormals}
    if backend.channel_axis is not None:
        out["channel_axis"] = backend.channel_axis
    if backend.fixed_eps is not None:
        out["eps"] = st.just(backend.fixed_eps)
    if backend.fixed_momentum is not None:
        out["momentum"] = st.just(backend.fixed_momentum)
    elif layer and not backend.cumulative:
        out["momentum"] = _momentum
    if layer:
        if backend.always_tracks:
            out["track_running_stats"] = True
        if not backend.layer_affine_optional:
            out["affine"] = True
    else:
        if not backend.optional_affine:
            out["affine"] = True
        if not backend.optional_running_stats:
            out["running_stats"] = True
    for key, value in wanted.items():
        if key in ("dtypes", "conventions"):
            kept = tuple(v for v in value if v in out[key])
            if not kept:
                raise Unsupported(f"backend {name!r} declares {key} {out[key]}, this property "
                                  f"needs one of {tuple(value)}")
            out[key] = kept
        elif key == "ranks":
            low, high = max(value[0], out["ranks"][0]), min(value[1], out["ranks"][1])
            if low > high:
                raise Unsupported(f"backend {name!r} declares ranks {out['ranks']}, this "
                                  f"property needs {tuple(value)}")
            out["ranks"] = (low, high)
        elif key in ("eps", "momentum") and value is not None and getattr(
                backend, f"fixed_{key}") is None:
            out[key] = value  # replaces the default draws (never None for cumulative=False)
        elif key in ("eps", "momentum") and key in out and value is not None:
            raise Unsupported(f"backend {name!r} declares fixed_{key}="
                              f"{getattr(backend, f'fixed_{key}')!r}, this property varies "
                              f"{key}")
        elif (key in ("affine", "running_stats", "track_running_stats", "channel_axis")
              and value is not None and out.get(key) is not None and out[key] != value):
            raise Unsupported(f"backend {name!r} always has {key}={out[key]!r}, this "
                              f"property needs {key}={value!r}")
        elif value is not None or key not in out:
            out[key] = value
    return out


def cases_for(backend, **wanted: Any):
    """:func:`bn_cases` within what ``backend`` declares, further restricted by ``wanted``
    (``bn_cases`` arguments). Raises :class:`Unsupported` when the two cannot both hold."""
    return bn_cases(**_restrict(backend, wanted, layer=False))


def layer_cases_for(backend, **wanted: Any):
    """:func:`layer_cases` within what ``backend`` declares (see :func:`cases_for`)."""
    return layer_cases(**_restrict(backend, wanted, layer=True))
