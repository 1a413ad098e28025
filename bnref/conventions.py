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

Two JAX libraries add rules that depend on how many training steps came before, kept as data in
their records (:data:`LIBRARY_CONVENTIONS`, pinned by ``tests/test_conventions_jax_libraries.py``):

    Equinox, mode="ema":   the first training batch *replaces* the running statistics, then the
                           "old" rule (``first_batch_seeds``); training outputs are normalised
                           with the updated running statistics (``training_statistics``)
    Equinox, mode="batch": the "old" rule from (0, 1); inference divides the stored average by
                           ``1 - m**k`` after k steps (``debias="zero"``)
    Haiku:                 the "old" rule from (0, 0); inference divides by ``1 - m**k``
                           (``hk.ExponentialMovingAverage(zero_debias=True)``)

Only a layer that counts its training steps can run them: ``bnref.numpy.BatchNorm`` does; every
``batch_norm`` function, and the other backends' layers, refuse them with a ``ValueError``
(``Convention.is_plain`` tells). They
are kept out of :data:`CONVENTIONS`, the framework conventions every backend runs (and the
property suites draw from); :func:`get_convention` resolves both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

__all__ = [
    "ALL_CONVENTIONS",
    "CONVENTIONS",
    "DEFAULT",
    "LIBRARY_CONVENTIONS",
    "Convention",
    "Translation",
    "channel_axis",
    "channel_axis_permutation",
    "convert_momentum",
    "default_momentum",
    "get_convention",
    "move_channel_axis",
    "rule_notes",
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
        name: the key in :data:`CONVENTIONS` (``"torch"``, ``"keras"``, ...) or
            :data:`LIBRARY_CONVENTIONS` (``"equinox"``, ``"equinox_batch"``, ``"haiku"``).
        framework: the human name of the framework.
        layer: the built-in layer or operator these defaults come from.
        momentum_weights: ``"new"`` if ``momentum`` multiplies the new batch statistic
            (PyTorch), ``"old"`` if it multiplies the running value (Keras, Flax, Gluon, ONNX,
            Equinox, Haiku).
        default_momentum, default_eps: the built-in layer's defaults. ``default_momentum`` is
            ``None`` where the built-in has no default (Haiku's ``decay_rate`` is a required
            argument): an omitted momentum is then refused.
        unbiased_running_var: whether the running variance is fed the unbiased batch
            variance ``n / (n - 1) * var`` (PyTorch) rather than the biased one. Normalisation
            always uses the biased variance.
        default_axis: the channel axis (1: channels first, -1: channels last).
        state_names: canonical name -> the built-in's name. Canonical names are ``gamma``,
            ``beta``, ``running_mean``, ``running_var``; nested containers (Flax's variable
            collections) are written as ``"collection/name"`` paths. The running statistics
            are the *stored* moving average, the value the recurrence updates (Haiku's
            ``hidden``, not its debiased ``average``).
        single_value_error: whether the built-in refuses a training batch with one value per
            channel (PyTorch does; the unbiased variance would divide by zero).
        momentum_argument: what the built-in calls ``momentum`` (Haiku: ``decay_rate``).
        first_batch_seeds: whether the first training batch replaces the stored statistics
            instead of being blended into them (Equinox ``mode="ema"``): the first step's
            new-value weight is 1, whatever ``momentum`` is.
        debias: ``"zero"`` if inference divides the stored average by ``1 - d**k`` after
            ``k`` training steps, ``d`` the weight of the old value (Adam's bias correction, as
            Haiku's ``ExponentialMovingAverage(zero_debias=True)`` and Equinox
            ``mode="batch"`` do); ``None`` if inference uses the stored statistics as they are.
        initial_running_var: the stored running variance before any training step (the
            running mean always starts at 0). Haiku's starts at 0, which its debiasing cancels;
            Equinox ``mode="batch"`` debiases a variance that started at 1, so after ``k`` steps
            its inference variance carries an extra ``d**k / (1 - d**k)``.
        one_pass_variance: whether the built-in computes the batch variance as
            E[x²]−E[x]² (Flax's default ``use_fast_variance=True``, Haiku), which cancels
            catastrophically when ``|mean| >> std``. bnref never does.
        training_statistics: what normalises a training batch: ``"batch"``, its own
            statistics (everyone else), or ``"running"``, the running statistics just updated
            with them (Equinox ``mode="ema"``: from the second step on, a training output is
            normalised with ``m * old + (1 - m) * batch``, as inference would be).
    """

    name: str
    framework: str
    layer: str
    momentum_weights: Literal["new", "old"]
    default_momentum: float | None
    default_eps: float
    unbiased_running_var: bool
    default_axis: int
    state_names: Mapping[str, str] = field(default_factory=dict)
    single_value_error: bool = False
    momentum_argument: str = "momentum"
    first_batch_seeds: bool = False
    debias: Literal[None, "zero"] = None
    initial_running_var: float = 1.0
    one_pass_variance: bool = False
    training_statistics: Literal["batch", "running"] = "batch"

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

    # -- rules beyond the plain moving average --------------------------------------------
    @property
    def counts_steps(self) -> bool:
        """Whether the running-statistics rule depends on how many training steps came before
        (first-batch seeding, zero-debiasing): only a layer that counts its steps can run it."""
        return self.first_batch_seeds or self.debias is not None

    @property
    def is_plain(self) -> bool:
        """Whether this is the plain rule every backend runs: one moving-average step per
        training batch, normalised with its own statistics; no seeding, no debiasing."""
        return not self.counts_steps and self.training_statistics == "batch"

    def momentum_for_step(self, momentum: float, step: int) -> float:
        """The ``momentum`` the ``step``-th training batch (1-based) is blended with into the
        stored statistics: ``momentum`` itself, except a first batch that seeds them (weight 1)."""
        if self.first_batch_seeds and step == 1:
            return self.momentum_for_new_value_weight(1.0)
        return momentum

    def inference_divisor(self, momentum: float, steps: int) -> float:
        """What inference divides the stored statistics by after ``steps`` training steps:
        ``1 - d**steps`` under zero-debiasing (``d`` the old value's weight), else 1. Before the
        first step there is nothing to debias (1), as in Equinox; see also :meth:`debiased`."""
        if self.debias is None or steps == 0:
            return 1.0
        decay = 1.0 - self.new_value_weight(momentum)
        return 1.0 - decay**steps

    def debiased(self, stored, momentum: float, steps: int):
        """The statistic inference normalises with, from the stored one after ``steps`` steps."""
        divisor = self.inference_divisor(momentum, steps)
        return stored if divisor == 1.0 else stored / divisor

    def stored_after(self, batch_stats: Iterable, momentum: float, initial):
        """The stored statistic after one training step per value of ``batch_stats`` (each
        the batch statistic fed to the recurrence), from ``initial``: the recurrence replayed,
        seeding included. Pure Python; works on floats and arrays."""
        stored = initial
        for step, batch in enumerate(batch_stats, start=1):
            stored = self.update_running(stored, batch, self.momentum_for_step(momentum, step))
        return stored

    def running_after(self, batch_stats: Iterable, momentum: float, initial):
        """What inference normalises with after one training step per value of ``batch_stats``:
        :meth:`stored_after`, debiased."""
        batch_stats = list(batch_stats)
        return self.debiased(self.stored_after(batch_stats, momentum, initial), momentum,
                             len(batch_stats))

    def plain(self) -> Convention:
        """This record with the plain rule only (no seeding, no debiasing, training batches
        normalised with their own statistics): one step of its stored moving average, which is
        what a pure ``batch_norm`` call runs. ``bnref.numpy.BatchNorm`` feeds it its stored
        statistics and applies the rest itself."""
        if self.is_plain:
            return self
        return dataclasses.replace(self, first_batch_seeds=False, debias=None,
                                   training_statistics="batch")

    @property
    def update_rule(self) -> str:
        """The running-statistics rule in one line (the conventions table's column)."""
        rule = "(1-m)*old + m*batch" if self.momentum_weights == "new" else "m*old + (1-m)*batch"
        if self.first_batch_seeds:
            rule = f"first batch, then {rule}"
        if self.debias == "zero":
            rule = f"{rule} from (0, {self.initial_running_var:g}), / (1-m^k) in inference"
        if self.training_statistics == "running":
            rule = f"{rule}; training uses it too"
        return rule

    @property
    def rule_description(self) -> str:
        """What the step-count rules do, in words (for error messages and notes)."""
        parts = []
        if self.first_batch_seeds:
            parts.append("seeds its running statistics with the first training batch")
        if self.debias == "zero":
            parts.append("zero-debiases its moving average (inference divides it by 1 - m^k "
                         "after k steps)")
        if self.training_statistics == "running":
            parts.append("normalises training batches with the updated running statistics")
        return " and ".join(parts) or "runs the plain moving average"

    @property
    def channels_last(self) -> bool:
        return self.default_axis == -1

    def __str__(self) -> str:
        return self.name

    def __reduce__(self):
        # A registered record pickles as its name (unpickling gives the same object back); any
        # other as its fields, with state_names as a plain dict (a mappingproxy cannot pickle).
        if ALL_CONVENTIONS.get(self.name) is self:
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
            # flax/linen/normalization.py: BatchNorm(momentum=0.99, epsilon=1e-5, axis=-1,
            # use_fast_variance=True): the default batch variance is E[x²]−E[x]².
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
                one_pass_variance=True,
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


LIBRARY_CONVENTIONS: Mapping[str, Convention] = MappingProxyType(
    {
        c.name: c
        for c in (
            # equinox/nn/_batch_norm.py (0.13): BatchNorm(input_size, axis_name, eps=1e-5,
            # momentum=0.99, mode="legacy"), and "legacy" means "ema" (with a warning). The input
            # is one example, (C, *spatial), under jax.vmap(axis_name=...): channels first.
            # mode="ema": on the first training call (ema_first_time_index) the running
            # statistics are set to the batch's (lax.select), then
            # momentum * running + (1 - momentum) * batch; the training output is normalised
            # with these new running statistics, not the batch's. The buffers start as
            # jnp.empty (zeros). The variance is the mean of (x - mean)², biased.
            Convention(
                name="equinox",
                framework="Equinox",
                layer='equinox.nn.BatchNorm(mode="ema")',
                momentum_weights="old",
                default_momentum=0.99,
                default_eps=1e-5,
                unbiased_running_var=False,
                default_axis=1,
                state_names=_names("weight", "bias", "ema_state_index[0]",
                                   "ema_state_index[1]"),
                first_batch_seeds=True,
                initial_running_var=0.0,
                training_statistics="running",
            ),
            # mode="batch": hidden = momentum * hidden + (1 - momentum) * batch from (0, 1),
            # batch_counter += 1; inference divides by 1 - momentum**counter (1 at counter 0).
            Convention(
                name="equinox_batch",
                framework="Equinox",
                layer='equinox.nn.BatchNorm(mode="batch")',
                momentum_weights="old",
                default_momentum=0.99,
                default_eps=1e-5,
                unbiased_running_var=False,
                default_axis=1,
                state_names=_names("weight", "bias", "batch_state_index[0]",
                                   "batch_state_index[1]"),
                debias="zero",
            ),
            # haiku/_src/batch_norm.py (0.0.17): BatchNorm(create_scale, create_offset,
            # decay_rate, eps=1e-5, data_format="channels_last"); decay_rate has no default.
            # var = mean(x²) - mean(x)², fed to mean_ema/var_ema, each an
            # ExponentialMovingAverage(decay_rate) (zero_debias=True): hidden = hidden * decay +
            # value * (1 - decay) from zeros, average = hidden / (1 - decay**counter), and
            # inference normalises with the averages.
            Convention(
                name="haiku",
                framework="Haiku",
                layer="haiku.BatchNorm",
                momentum_weights="old",
                default_momentum=None,
                default_eps=1e-5,
                unbiased_running_var=False,
                default_axis=-1,
                state_names=_names("scale", "offset", "mean_ema/hidden", "var_ema/hidden"),
                momentum_argument="decay_rate",
                debias="zero",
                initial_running_var=0.0,
                one_pass_variance=True,
            ),
        )
    }
)
"""Conventions of libraries built on a framework (Equinox, Haiku on JAX) whose running
statistics follow a step-count rule (seeding, zero-debiasing). Only ``bnref.numpy.BatchNorm``
runs them; they are not drawn by the backends' property suites."""

ALL_CONVENTIONS: Mapping[str, Convention] = MappingProxyType(
    {**CONVENTIONS, **LIBRARY_CONVENTIONS})
"""Every record :func:`get_convention` resolves: :data:`CONVENTIONS`, then
:data:`LIBRARY_CONVENTIONS`."""


def get_convention(convention: str | Convention) -> Convention:
    """Return the :class:`Convention` for a name in :data:`ALL_CONVENTIONS` (or the record
    itself)."""
    if isinstance(convention, Convention):
        return convention
    if isinstance(convention, str) and convention in ALL_CONVENTIONS:
        return ALL_CONVENTIONS[convention]
    # The message names the framework conventions every backend runs (the contract's wording,
    # bnref/testing/checks.py); the library ones are bnref.numpy.BatchNorm's alone.
    raise ValueError(
        f"convention must be one of {sorted(CONVENTIONS)} or a Convention, got {convention!r}"
    )


def default_momentum(convention: str | Convention) -> float:
    """The convention's default momentum; a clear ``ValueError`` where the built-in has none."""
    conv = get_convention(convention)
    if conv.default_momentum is None:
        raise ValueError(
            f"momentum is required under the {conv.name!r} convention: {conv.layer} has no "
            f"default {conv.momentum_argument}"
        )
    return conv.default_momentum


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
    Neither can the step-count rules (first-batch seeding, zero-debiasing, the stored variance's
    starting value): the momentum keeps the new-value weight of every later step, and the notes
    say what differs before that. A source without a default momentum (Haiku) needs
    ``momentum``.
    """
    src_c, dst_c = get_convention(src), get_convention(dst)
    m = default_momentum(src_c) if momentum is DEFAULT else momentum
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
    notes.extend(rule_notes(src_c, dst_c))
    return Translation(dst_c.name, dst_m, chosen_eps, target_axis, tuple(notes))


def rule_notes(src: str | Convention, dst: str | Convention) -> tuple[str, ...]:
    """What differs between two conventions' step-count rules (seeding, debiasing, the stored
    variance's starting value): the parts of a running statistic no momentum can translate."""
    src_c, dst_c = get_convention(src), get_convention(dst)
    notes = []
    if src_c.first_batch_seeds != dst_c.first_batch_seeds:
        seeding, blending = (src_c, dst_c) if src_c.first_batch_seeds else (dst_c, src_c)
        notes.append(
            f"{seeding.name} replaces its running statistics with the first training batch's, "
            f"{blending.name} blends that batch into its initial ones: the stored statistics "
            "differ from the first step on, and every later step keeps part of that difference")
    if src_c.debias != dst_c.debias:
        debiased, plain = (src_c, dst_c) if src_c.debias else (dst_c, src_c)
        notes.append(
            f"{debiased.name} divides its stored moving average by 1 - d^k in inference after "
            f"k steps (d the old value's weight), {plain.name} does not: inference statistics "
            "differ until d^k is negligible")
    elif (src_c.debias and dst_c.debias
          and src_c.initial_running_var != dst_c.initial_running_var):
        notes.append(
            f"the stored running variance starts at {src_c.initial_running_var:g} in "
            f"{src_c.name} and {dst_c.initial_running_var:g} in {dst_c.name}; debiased, that "
            "start adds its value times d^k / (1 - d^k) to the inference variance")
    return tuple(notes)
