"""What each framework means by batch-norm hyperparameters, as data.

Every framework computes the same normalisation,

    y = gamma * (x - mean) / sqrt(var + eps) + beta

with ``mean`` and ``var`` the biased per-channel batch statistics in training and the running
statistics in inference. They differ in how the running statistics move:

    "new" convention (PyTorch):      running = (1 - m) * running + m * batch
    "old" convention (everyone else): running = m * running + (1 - m) * batch

whether ``batch`` for the running *variance* is the unbiased estimate (PyTorch) or the biased
one, their defaults for ``m``, ``eps`` and the channel axis, and the names under which they store
the four tensors. This module keeps those facts as one :class:`Convention` record per framework
and offers the adapters that translate between them. It is pure Python: importing it loads no
framework. Every default below is pinned to the installed framework by a test
(``tests/test_conventions.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

__all__ = [
    "CONVENTIONS",
    "DEFAULT",
    "Convention",
    "Translation",
    "channel_axis",
    "channel_axis_permutation",
    "convert_momentum",
    "get_convention",
    "move_channel_axis",
    "translate_hyperparameters",
]


class _Default:
    """Sentinel for an omitted ``momentum``: ``None`` already means "cumulative average"."""

    _instance: _Default | None = None

    def __new__(cls) -> _Default:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()
"""Marker for "use the convention's default momentum"."""

CANONICAL_STATE = ("gamma", "beta", "running_mean", "running_var")


@dataclass(frozen=True)
class Convention:
    """One framework's batch-norm conventions.

    Attributes:
        name: the key in :data:`CONVENTIONS` (``"torch"``, ``"keras"``, ...).
        framework: the human name of the framework.
        layer: the built-in layer or operator these defaults come from.
        momentum_weights: ``"new"`` if ``momentum`` multiplies the new batch statistic
            (PyTorch), ``"old"`` if it multiplies the running value (Keras, Flax, Gluon, ONNX).
        default_momentum, default_eps: the built-in layer's defaults.
        unbiased_running_var: whether the running variance is fed the unbiased batch
            variance ``n / (n - 1) * var`` (PyTorch) rather than the biased one. Normalisation
            always uses the biased variance.
        default_axis: the channel axis (1: channels first, -1: channels last).
        state_names: canonical name -> the built-in's name. Canonical names are ``gamma``,
            ``beta``, ``running_mean``, ``running_var``; nested containers (Flax's variable
            collections) are written as ``"collection/name"`` paths.
        single_value_error: whether the built-in refuses a training batch with one value per
            channel (PyTorch does; the unbiased variance would divide by zero).
    """

    name: str
    framework: str
    layer: str
    momentum_weights: Literal["new", "old"]
    default_momentum: float
    default_eps: float
    unbiased_running_var: bool
    default_axis: int
    state_names: Mapping[str, str] = field(default_factory=dict)
    single_value_error: bool = False

    def new_value_weight(self, momentum: float) -> float:
        """The weight this convention's ``momentum`` gives the new batch statistic."""
        return momentum if self.momentum_weights == "new" else 1.0 - momentum

    def momentum_for_new_value_weight(self, weight: float) -> float:
        """The ``momentum`` that, in this convention, gives the new batch statistic ``weight``."""
        return weight if self.momentum_weights == "new" else 1.0 - weight

    def update_running(self, running, batch, momentum):
        """One step of the running-statistic recurrence, written the way this framework writes it.

        Works on any array type with ``*`` and ``+`` (and on Python floats).
        """
        if self.momentum_weights == "new":
            return (1.0 - momentum) * running + momentum * batch
        return momentum * running + (1.0 - momentum) * batch

    def running_var_estimate(self, biased_var, count: int):
        """The batch variance this convention feeds the running variance."""
        if self.unbiased_running_var:
            # count > 1 here: the torch convention refuses a training batch of one value.
            return biased_var * (count / (count - 1))
        return biased_var

    @property
    def channels_last(self) -> bool:
        return self.default_axis == -1

    def __str__(self) -> str:
        return self.name

    def __reduce__(self):
        # A registered record pickles as its name (unpickling gives the same object back); any
        # other as its fields, with state_names as a plain dict (a mappingproxy cannot pickle).
        if CONVENTIONS.get(self.name) is self:
            return get_convention, (self.name,)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["state_names"] = dict(self.state_names)
        return _rebuild_convention, (fields,)


def _rebuild_convention(fields: dict) -> Convention:
    return Convention(**{**fields, "state_names": MappingProxyType(dict(fields["state_names"]))})


def _names(gamma: str, beta: str, mean: str, var: str) -> Mapping[str, str]:
    return MappingProxyType(dict(zip(CANONICAL_STATE, (gamma, beta, mean, var), strict=True)))


CONVENTIONS: Mapping[str, Convention] = MappingProxyType(
    {
        c.name: c
        for c in (
            # torch/nn/modules/batchnorm.py: _NormBase(eps=1e-5, momentum=0.1); the running
            # variance is updated with the unbiased variance (aten Normalization.cpp).
            Convention(
                name="torch",
                framework="PyTorch",
                layer="torch.nn.BatchNorm1d/2d/3d",
                momentum_weights="new",
                default_momentum=0.1,
                default_eps=1e-5,
                unbiased_running_var=True,
                default_axis=1,
                state_names=_names("weight", "bias", "running_mean", "running_var"),
                single_value_error=True,
            ),
            # keras/src/layers/normalization/batch_normalization.py: momentum=0.99,
            # epsilon=1e-3, axis=-1; moving_variance takes the biased batch variance.
            Convention(
                name="keras",
                framework="Keras",
                layer="keras.layers.BatchNormalization",
                momentum_weights="old",
                default_momentum=0.99,
                default_eps=1e-3,
                unbiased_running_var=False,
                default_axis=-1,
                state_names=_names("gamma", "beta", "moving_mean", "moving_variance"),
            ),
            # flax/linen/normalization.py: BatchNorm(momentum=0.99, epsilon=1e-5, axis=-1).
            Convention(
                name="flax",
                framework="Flax",
                layer="flax.linen.BatchNorm / flax.nnx.BatchNorm",
                momentum_weights="old",
                default_momentum=0.99,
                default_eps=1e-5,
                unbiased_running_var=False,
                default_axis=-1,
                state_names=_names("params/scale", "params/bias", "batch_stats/mean",
                                   "batch_stats/var"),
            ),
            # mxnet/gluon/nn/basic_layers.py: BatchNorm(axis=1, momentum=0.9, epsilon=1e-5).
            # (The raw mx.nd.BatchNorm operator defaults to eps=1e-3 and fix_gamma=True.)
            Convention(
                name="mxnet",
                framework="MXNet Gluon",
                layer="mxnet.gluon.nn.BatchNorm",
                momentum_weights="old",
                default_momentum=0.9,
                default_eps=1e-5,
                unbiased_running_var=False,
                default_axis=1,
                state_names=_names("gamma", "beta", "running_mean", "running_var"),
            ),
            # onnx BatchNormalization-15: momentum=0.9, epsilon=1e-5, inputs
            # X, scale, B, input_mean, input_var; training_mode uses the biased variance.
            Convention(
                name="onnx",
                framework="ONNX",
                layer="onnx BatchNormalization operator",
                momentum_weights="old",
                default_momentum=0.9,
                default_eps=1e-5,
                unbiased_running_var=False,
                default_axis=1,
                state_names=_names("scale", "B", "input_mean", "input_var"),
            ),
        )
    }
)


def get_convention(convention: str | Convention) -> Convention:
    """Return the :class:`Convention` for a name (or the record itself)."""
    if isinstance(convention, Convention):
        return convention
    if isinstance(convention, str) and convention in CONVENTIONS:
        return CONVENTIONS[convention]
    raise ValueError(
        f"convention must be one of {sorted(CONVENTIONS)} or a Convention, got {convention!r}"
    )


def convert_momentum(
    momentum: float, src: str | Convention, dst: str | Convention
) -> float:
    """Translate ``momentum`` from ``src``'s meaning to ``dst``'s.

    Both conventions then give the new batch statistic the same weight, e.g.
    ``convert_momentum(0.1, "torch", "keras") == 0.9``. PyTorch's ``momentum=None``
    (cumulative average) has no fixed equivalent and is refused.
    """
    src_c, dst_c = get_convention(src), get_convention(dst)
    if momentum is None or isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(
            f"momentum must be a float in [0, 1] to be converted, got {momentum!r}"
            + (" (the cumulative average depends on the batch count)" if momentum is None else "")
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if src_c.momentum_weights == dst_c.momentum_weights:
        return float(momentum)
    return dst_c.momentum_for_new_value_weight(src_c.new_value_weight(float(momentum)))


def channel_axis(convention: str | Convention, ndim: int, axis: int | None = None) -> int:
    """The non-negative channel axis for an array of rank ``ndim`` (``axis`` or the default)."""
    conv = get_convention(convention)
    chosen = conv.default_axis if axis is None else axis
    if not -ndim <= chosen < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim - 1}] for rank {ndim}, got {chosen}")
    return chosen % ndim


def channel_axis_permutation(ndim: int, src_axis: int, dst_axis: int) -> tuple[int, ...]:
    """The axis order that moves the channel axis from ``src_axis`` to ``dst_axis``.

    ``channel_axis_permutation(4, 1, -1) == (0, 2, 3, 1)``: NCHW to NHWC. Feed it to any
    framework's transpose (``np.transpose``, ``torch.permute``, ``tf.transpose``, ...).
    """
    src, dst = src_axis % ndim, dst_axis % ndim
    order = [i for i in range(ndim) if i != src]
    order.insert(dst, src)
    return tuple(order)


def move_channel_axis(x, src_axis: int, dst_axis: int):
    """Move the channel axis of a numpy-like array (``.transpose``) or a torch tensor."""
    order = channel_axis_permutation(len(x.shape), src_axis, dst_axis)
    if hasattr(x, "permute"):  # torch's transpose swaps two axes only
        return x.permute(*order)
    return x.transpose(order)


@dataclass(frozen=True)
class Translation:
    """Hyperparameters that reproduce a layer of one convention in another.

    ``notes`` lists what cannot be carried over exactly.
    """

    convention: str
    momentum: float | None
    eps: float
    axis: int
    notes: tuple[str, ...] = ()


def translate_hyperparameters(
    src: str | Convention,
    dst: str | Convention,
    *,
    ndim: int,
    momentum: float | object | None = DEFAULT,
    eps: float | None = None,
    axis: int | None = None,
    dst_axis: int | None = None,
) -> Translation:
    """Express a ``src`` layer's hyperparameters in ``dst``'s terms.

    ``momentum``/``eps``/``axis`` default to ``src``'s defaults. ``dst_axis`` is where the
    channels sit in the data ``dst`` will see (default: ``dst``'s own default, i.e. the
    layout changes with the framework; pass the source axis to keep the data unchanged).
    The variance estimator fed to the running variance cannot be translated: a torch layer
    reproduced in another convention (or the reverse) normalises identically, but each
    training step then moves ``running_var`` by ``n / (n - 1)`` less (more); ``notes`` says so.
    """
    src_c, dst_c = get_convention(src), get_convention(dst)
    m = src_c.default_momentum if momentum is DEFAULT else momentum
    notes: list[str] = []
    if m is None:
        dst_m = None
        notes.append("momentum=None (cumulative average) is kept as None: only a layer with a "
                     "batch counter can reproduce it")
    else:
        dst_m = convert_momentum(m, src_c, dst_c)
    chosen_eps = src_c.default_eps if eps is None else float(eps)
    channel_axis(src_c, ndim, axis)  # validates the source axis
    target_axis = channel_axis(dst_c, ndim, dst_axis)
    if src_c.unbiased_running_var != dst_c.unbiased_running_var:
        est = {True: "unbiased", False: "biased"}
        notes.append(
            f"{src_c.name} updates running_var with the {est[src_c.unbiased_running_var]} batch "
            f"variance, {dst_c.name} with the {est[dst_c.unbiased_running_var]} one: outputs "
            "match, but after each training step running_var differs by the factor "
            "n/(n-1) applied to the new-value term"
        )
    return Translation(dst_c.name, dst_m, chosen_eps, target_axis, tuple(notes))
