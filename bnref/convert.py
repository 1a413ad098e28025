"""Move a trained batch-norm layer between frameworks: its state, eps and momentum.

    from bnref.convert import convert
    keras_layer, notes = convert(torch.nn.BatchNorm2d(64), "keras")

Sources and targets (``kind``): ``"torch"`` (``torch.nn.BatchNorm1d/2d/3d``), ``"keras"``
(``keras.layers.BatchNormalization``), ``"flax"`` (a ``(flax.linen.BatchNorm, variables)``
pair), ``"gluon"`` (``mxnet.gluon.nn.BatchNorm``), ``"onnx"`` (an ``onnx.ModelProto`` holding
one ``BatchNormalization`` node and its initializers), ``"equinox"`` / ``"equinox_batch"`` (an
``(equinox.nn.BatchNorm, equinox.nn.State)`` pair, ``mode="ema"`` / ``mode="batch"``; call it
under ``jax.vmap(..., axis_name="batch")``), ``"haiku"`` (a ``(kwargs, params, state)`` triple:
the ``haiku.BatchNorm`` constructor arguments, with ``name`` defaulting to ``"batch_norm"``,
and the ``params``/``state`` of ``haiku.transform_with_state``), and bnref's layers
``"bnref.numpy"``, ``"bnref.torch"``, ``"bnref.jax"`` (a ``(layer, variables)`` pair),
``"bnref.tf"`` and ``"bnref.mxnet"``. Sources are recognised by type; nothing is imported until
needed.

What carries over exactly: gamma, beta, the running statistics and eps (ONNX stores eps as
float32), so the converted layer's inference output is the source's. The momentum is
translated to keep the weight the next batch gets. What cannot carry over is said in the
notes: PyTorch feeds its running variance the *unbiased* batch variance and the others the
biased one, so after the next training step on ``n`` values per channel the two running
variances differ by ``w * var_B / (n - 1)`` (``w`` the new-value weight); PyTorch's cumulative
average (``momentum=None``) exists only in PyTorch and bnref, so elsewhere it becomes the
fixed weight ``1 / (k + 1)`` its next step would have used. The channel axis becomes the
target's own default (channels first for torch, Gluon and ONNX, last for Keras and Flax):
the layer is for the target framework's layout.

Equinox and Haiku keep rules that depend on the step count (see :mod:`bnref.conventions`); the
state carries what inference normalises with, and the count. Under a zero-debiased target
(``"equinox_batch"``, ``"haiku"``) the stored average is written as ``running * (1 - d**k)``.
From a debiased source the count ``k`` carries over and the next steps are the source's; from
any other source the count is raised to the first ``K`` at which ``1 - d**K`` rounds to 1 in
the statistics' dtype, so the debiasing is spent and the target continues the plain moving
average with the source's weight. The reverse cannot carry over: a debiased source would give
its next batch the weight ``(1 - d) / (1 - d**(k + 1))``, the plain target gives ``1 - d``
(said in the notes). An ``"equinox"`` (``mode="ema"``) target is marked as already seeded
(``ema_first_time_index`` False), so its next step blends like the source's. Haiku computes its
training batch variance as E[x²]−E[x]²; a note says so.

:func:`save`/:func:`load` keep a :class:`BNState` in an ``.npz`` file read without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnref.conventions import CONVENTIONS, Convention, get_convention

__all__ = ["KINDS", "BNState", "Conversion", "convert", "kind_of", "load", "notes_for", "read",
           "save", "write"]

KINDS = ("torch", "keras", "flax", "gluon", "onnx", "equinox", "equinox_batch", "haiku",
         "bnref.numpy", "bnref.torch", "bnref.jax", "bnref.tf", "bnref.mxnet")
# The convention each kind's layer follows by default.
_CONVENTION = {"torch": "torch", "keras": "keras", "flax": "flax", "gluon": "mxnet",
               "onnx": "onnx", "equinox": "equinox", "equinox_batch": "equinox_batch",
               "haiku": "haiku", "bnref.numpy": "torch", "bnref.torch": "torch",
               "bnref.jax": "flax", "bnref.tf": "keras", "bnref.mxnet": "mxnet"}
# Kinds whose layer keeps a batch counter and so runs momentum=None (the cumulative average).
_CUMULATIVE = ("torch", "bnref.numpy", "bnref.torch", "bnref.jax", "bnref.tf", "bnref.mxnet")
# Kinds whose layer has gamma and beta together (one affine flag).
_JOINT_AFFINE = ("torch", "bnref.torch", "bnref.numpy", "onnx", "equinox", "equinox_batch")
_HAIKU_NAME = "batch_norm"  # haiku.BatchNorm's default module name


@dataclass(frozen=True)
class BNState:
    """A batch-norm layer's state in framework-neutral terms (arrays in float64 or float32).

    ``running_mean``/``running_var`` are what inference normalises with (debiased, under a
    zero-debiased convention); ``num_batches_tracked`` counts the training steps where the
    source counts them (Equinox ``mode="ema"`` only knows whether it has trained: 0 or 1)."""

    gamma: np.ndarray | None
    beta: np.ndarray | None
    running_mean: np.ndarray
    running_var: np.ndarray
    eps: float
    # The weight the next batch gets in the moving average (under zero-debiasing, before the
    # division by 1 - d^k); None: cumulative average.
    new_value_weight: float | None
    convention: str  # whose rule the running statistics followed (torch: unbiased variance)
    num_batches_tracked: int = 0

    @property
    def num_features(self) -> int:
        return int(self.running_mean.shape[0])

    def momentum_for(self, convention: str) -> float | None:
        if self.new_value_weight is None:
            return None
        return get_convention(convention).momentum_for_new_value_weight(self.new_value_weight)


@dataclass(frozen=True)
class Conversion:
    layer: Any
    state: BNState
    notes: tuple[str, ...]

    def __iter__(self):  # layer, notes = convert(...)
        return iter((self.layer, self.notes))


def _np(value: Any) -> np.ndarray:
    if hasattr(value, "asnumpy"):  # mxnet
        return value.asnumpy()
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
    return np.array(value)


def kind_of(source: Any) -> str:
    """Which of :data:`KINDS` ``source`` is."""
    if isinstance(source, tuple) and len(source) == 3 and isinstance(source[0], dict) and (
            "decay_rate" in source[0]):
        return "haiku"
    if isinstance(source, tuple) and len(source) == 2:
        module = type(source[0]).__module__
        if module.startswith("equinox"):
            return "equinox_batch" if source[0].mode == "batch" else "equinox"
        return "bnref.jax" if module.startswith("bnref.jax") else "flax"
    module = type(source).__module__
    for prefix, kind in (("bnref.numpy", "bnref.numpy"), ("bnref.torch", "bnref.torch"),
                         ("bnref.tf", "bnref.tf"), ("bnref.mxnet", "bnref.mxnet"),
                         ("torch.", "torch"), ("keras", "keras"), ("mxnet.", "gluon"),
                         ("onnx", "onnx")):
        if module.startswith(prefix):
            return kind
    raise TypeError(f"source must be a batch-norm layer of one of {KINDS}, got "
                    f"{type(source).__module__}.{type(source).__qualname__}")


def read(source: Any) -> BNState:
    """The state of any supported layer (see the module docstring for what ``source`` is)."""
    kind = kind_of(source)
    conv = _CONVENTION[kind]
    if kind in ("torch", "bnref.torch"):
        momentum = source.momentum
        convention = getattr(source, "convention", get_convention("torch"))
        conv = convention.name
        return BNState(
            None if source.weight is None else _np(source.weight),
            None if source.bias is None else _np(source.bias),
            _np(source.running_mean), _np(source.running_var), float(source.eps),
            None if momentum is None else convention.new_value_weight(momentum), conv,
            int(source.num_batches_tracked))
    if kind in ("keras", "bnref.tf"):
        weights = {w.name: _np(w.value) for w in source.weights}
        conv = getattr(source, "convention", get_convention("keras")).name
        momentum = source.momentum
        return BNState(weights.get("gamma"), weights.get("beta"), weights["moving_mean"],
                       weights["moving_variance"], float(source.epsilon),
                       None if momentum is None
                       else get_convention(conv).new_value_weight(momentum), conv,
                       int(weights.get("num_batches_tracked", 0)))
    if kind in ("flax", "bnref.jax"):
        module, variables = source
        params, stats = variables.get("params", {}), variables["batch_stats"]
        conv = getattr(module, "convention", get_convention("flax")).name
        momentum = module.momentum
        return BNState(
            _np(params["scale"]) if "scale" in params else None,
            _np(params["bias"]) if "bias" in params else None,
            _np(stats["mean"]), _np(stats["var"]), float(module.epsilon),
            None if momentum is None else get_convention(conv).new_value_weight(momentum),
            conv, int(_np(stats.get("num_batches_tracked", 0))))
    if kind in ("gluon", "bnref.mxnet"):
        params = source._reg_params
        if kind == "gluon":
            kwargs = source._kwargs
            scale, center = not kwargs["fix_gamma"], params["beta"].grad_req != "null"
            eps, momentum, conv = kwargs["eps"], kwargs["momentum"], "mxnet"
        else:
            scale, center = source.scale, source.center
            eps, momentum, conv = source.epsilon, source.momentum, source.convention.name
        counter = params.get("num_batches_tracked")
        return BNState(
            _np(params["gamma"].data()) if scale else None,
            _np(params["beta"].data()) if center else None,
            _np(params["running_mean"].data()), _np(params["running_var"].data()),
            float(eps), None if momentum is None
            else get_convention(conv).new_value_weight(momentum), conv,
            0 if counter is None else int(_np(counter.data())[0]))
    if kind == "onnx":
        return _read_onnx(source)
    if kind in ("equinox", "equinox_batch"):
        return _read_equinox(source)
    if kind == "haiku":
        return _read_haiku(source)
    state = source.state_dict()  # bnref.numpy
    mean, var = source.inference_statistics()
    return BNState(state.get("weight"), state.get("bias"), mean, var, float(source.eps),
                   None if source.momentum is None
                   else source.convention.new_value_weight(source.momentum),
                   source.convention.name, int(state.get("num_batches_tracked", 0)))


def _debiased(conv: Convention, stored: Any, momentum: float, steps: int) -> np.ndarray:
    """``stored`` divided by ``conv``'s inference divisor (in float64, rounded once)."""
    stored = _np(stored)
    return (stored.astype(np.float64) / conv.inference_divisor(momentum, steps)).astype(
        stored.dtype)


def _read_equinox(source: Any) -> BNState:
    module, eqx_state = source
    conv = get_convention("equinox_batch" if module.mode == "batch" else "equinox")
    if module.mode == "batch":
        steps = int(_np(eqx_state.get(module.batch_counter)))
        mean, var = (_debiased(conv, stat, module.momentum, steps)
                     for stat in eqx_state.get(module.batch_state_index))
    else:
        steps = 0 if bool(_np(eqx_state.get(module.ema_first_time_index))) else 1
        mean, var = (_np(stat) for stat in eqx_state.get(module.ema_state_index))
    affine = module.channelwise_affine
    return BNState(_np(module.weight) if affine else None, _np(module.bias) if affine else None,
                   mean, var, float(module.eps), conv.new_value_weight(module.momentum),
                   conv.name, steps)


def _read_haiku(source: Any) -> BNState:
    options, params, hk_state = source
    name = options.get("name") or _HAIKU_NAME
    conv = get_convention("haiku")
    module_params = params.get(name, {})
    mean_ema, var_ema = hk_state[f"{name}/~/mean_ema"], hk_state[f"{name}/~/var_ema"]
    ravel = lambda value: _np(value).reshape(-1)  # noqa: E731  haiku keeps (1, ..., 1, C)
    return BNState(
        ravel(module_params["scale"]) if "scale" in module_params else None,
        ravel(module_params["offset"]) if "offset" in module_params else None,
        ravel(mean_ema["average"]), ravel(var_ema["average"]),
        float(options.get("eps", conv.default_eps)),
        conv.new_value_weight(float(options["decay_rate"])), conv.name,
        int(_np(mean_ema["counter"])))


def _read_onnx(model: Any) -> BNState:
    from onnx import numpy_helper

    graph = model.graph
    node = next(n for n in graph.node if n.op_type == "BatchNormalization")
    attrs = {a.name: a for a in node.attribute}
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    gamma, beta, mean, var = (arrays[name] for name in node.input[1:5])
    record = CONVENTIONS["onnx"]
    eps = attrs["epsilon"].f if "epsilon" in attrs else record.default_eps
    momentum = attrs["momentum"].f if "momentum" in attrs else record.default_momentum
    return BNState(gamma, beta, mean, var, float(eps), record.new_value_weight(float(momentum)),
                   "onnx")


def write(state: BNState, kind: str, *, ndim: int = 4) -> Any:
    """A new layer of ``kind`` holding ``state`` (for ``ndim``-dimensional input: it picks
    torch's BatchNorm1d/2d/3d and builds Keras's weights)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    momentum = _target_momentum(state, kind)
    affine_gamma = state.gamma if state.gamma is not None else (
        None if state.beta is None else np.ones_like(state.running_mean))
    affine_beta = state.beta if state.beta is not None else (
        None if state.gamma is None else np.zeros_like(state.running_mean))
    channels = state.num_features
    if kind in ("torch", "bnref.torch"):
        import torch

        dtype = torch.float64 if state.running_mean.dtype == np.float64 else torch.float32
        if kind == "torch":
            cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                   5: torch.nn.BatchNorm3d}[ndim]
            layer = cls(channels, eps=state.eps, momentum=momentum,
                        affine=affine_gamma is not None,
                        dtype=dtype)
        else:
            import bnref.torch as bt

            layer = bt.BatchNorm(channels, eps=state.eps, momentum=momentum,
                                 affine=affine_gamma is not None,
                                 dtype=dtype)
        values = {"running_mean": state.running_mean, "running_var": state.running_var,
                  "num_batches_tracked": np.asarray(state.num_batches_tracked, np.int64)}
        if affine_gamma is not None:
            values.update(weight=affine_gamma, bias=affine_beta)
        layer.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in values.items()})
        return layer
    if kind in ("keras", "bnref.tf"):
        import keras

        options = {"momentum": momentum, "epsilon": state.eps,
                   "center": state.beta is not None, "scale": state.gamma is not None,
                   "dtype": state.running_mean.dtype.name}
        if kind == "keras":
            layer = keras.layers.BatchNormalization(**options)
        else:
            import bnref.tf as btf

            layer = btf.BatchNorm(**options)
        shape = (None,) * (ndim - 1) + (channels,)
        layer.build(shape)
        values = {"gamma": state.gamma, "beta": state.beta, "moving_mean": state.running_mean,
                  "moving_variance": state.running_var,
                  "num_batches_tracked": np.asarray(state.num_batches_tracked, np.int64)}
        layer.set_weights([values[w.name] for w in layer.weights])
        return layer
    if kind in ("flax", "bnref.jax"):
        import jax.numpy as jnp

        dtype = jnp.dtype(state.running_mean.dtype)
        if kind == "flax":
            import flax.linen as nn

            module = nn.BatchNorm(momentum=momentum, epsilon=state.eps,
                                  use_scale=state.gamma is not None,
                                  use_bias=state.beta is not None, param_dtype=dtype,
                                  use_fast_variance=False)
        else:
            import bnref.jax as bj

            module = bj.BatchNorm(channels, momentum=momentum, epsilon=state.eps,
                                  use_scale=state.gamma is not None,
                                  use_bias=state.beta is not None, param_dtype=dtype)
        params = {**({"scale": jnp.asarray(state.gamma)} if state.gamma is not None else {}),
                  **({"bias": jnp.asarray(state.beta)} if state.beta is not None else {})}
        stats = {"mean": jnp.asarray(state.running_mean), "var": jnp.asarray(state.running_var)}
        if kind == "bnref.jax" and momentum is None:
            stats["num_batches_tracked"] = jnp.asarray(state.num_batches_tracked, jnp.int32)
        return module, {**({"params": params} if params else {}), "batch_stats": stats}
    if kind in ("gluon", "bnref.mxnet"):
        import bnref.mxnet as bm  # restores numpy.bool before mxnet is imported

        # isort: split
        from mxnet import gluon, nd

        options = {"momentum": momentum, "epsilon": state.eps, "scale": state.gamma is not None,
                   "center": state.beta is not None, "in_channels": channels}
        if kind == "gluon":
            block = gluon.nn.BatchNorm(**options)
        else:
            block = bm.BatchNorm(**options)
        block.initialize()
        if state.running_mean.dtype == np.float64:
            block.cast("float64")
        values = {"gamma": affine_gamma if state.gamma is not None else None,
                  "beta": state.beta, "running_mean": state.running_mean,
                  "running_var": state.running_var,
                  "num_batches_tracked": np.asarray([state.num_batches_tracked])}
        for name, param in block._reg_params.items():
            if values.get(name) is not None:
                param.set_data(nd.array(values[name], dtype=param.dtype))
        return block
    if kind == "onnx":
        return _write_onnx(state, ndim, affine_gamma, affine_beta)
    if kind in ("equinox", "equinox_batch"):
        return _write_equinox(state, kind, momentum, affine_gamma, affine_beta)
    if kind == "haiku":
        return _write_haiku(state, ndim, momentum)
    import bnref.numpy as bn

    layer = bn.BatchNorm(channels, momentum=momentum, eps=state.eps,
                         affine=affine_gamma is not None, dtype=state.running_mean.dtype)
    values = {"running_mean": state.running_mean, "running_var": state.running_var,
              "num_batches_tracked": np.asarray(state.num_batches_tracked, np.int64)}
    if affine_gamma is not None:
        values.update(weight=affine_gamma, bias=affine_beta)
    layer.load_state_dict(values)
    return layer


def _write_onnx(state: BNState, ndim: int, gamma, beta) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    channels = state.num_features
    dtype = state.running_mean.dtype
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    arrays = {"scale": np.ones(channels, dtype) if gamma is None else gamma,
              "B": np.zeros(channels, dtype) if beta is None else beta,
              "input_mean": state.running_mean, "input_var": state.running_var}
    node = helper.make_node("BatchNormalization", ["X", *arrays], ["Y"], epsilon=state.eps,
                            momentum=_target_momentum(state, "onnx"))
    shape = ["N", channels] + [f"d{i}" for i in range(ndim - 2)]
    graph = helper.make_graph(
        [node], "bnref_batch_norm", [helper.make_tensor_value_info("X", elem, shape)],
        [helper.make_tensor_value_info("Y", elem, shape)],
        [numpy_helper.from_array(np.asarray(v, dtype), name) for name, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def debiased_count(state: BNState, kind: str) -> int:
    """The step count a zero-debiased ``kind`` is written with (see the module docstring): the
    source's own count when the source debiases too and has trained, else the first ``K`` (at
    least the source's count) at which ``1 - d**K`` rounds to 1 in the statistics' dtype."""
    source = get_convention(state.convention)
    if source.debias is not None and state.num_batches_tracked > 0:
        return state.num_batches_tracked
    weight = _target_new_value_weight(state, kind)
    if weight == 1.0:
        return max(state.num_batches_tracked, 1)
    if weight == 0.0:
        raise ValueError(f"a zero-debiased {kind} needs a nonzero new-value weight (its "
                         "inference divides by 1 - d^k), got momentum giving the batch weight 0")
    dtype = state.running_mean.dtype
    decay = dtype.type(1.0 - weight)
    # A quarter of the spacing at 1 keeps the rounding clear whichever pow the target uses.
    steps = max(1, int(np.ceil(np.log(np.finfo(dtype).eps / 4) / np.log(float(decay)))))
    while dtype.type(1) - np.power(decay, steps, dtype=dtype) != 1:
        steps += 1
    steps = max(steps, state.num_batches_tracked)
    if steps > np.iinfo(np.int32).max:
        raise ValueError(f"momentum {1.0 - weight!r} is too close to 1 for a zero-debiased "
                         f"{kind} to continue a plain moving average ({steps} steps)")
    return steps


def _target_new_value_weight(state: BNState, kind: str) -> float:
    return get_convention(_CONVENTION[kind]).new_value_weight(_target_momentum(state, kind))


def _write_equinox(state: BNState, kind: str, momentum: float, gamma, beta) -> Any:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    conv = get_convention(_CONVENTION[kind])
    dtype = jnp.dtype(state.running_mean.dtype)
    module, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        state.num_features, "batch", eps=state.eps, momentum=momentum,
        channelwise_affine=gamma is not None, dtype=dtype,
        mode="batch" if kind == "equinox_batch" else "ema")
    if gamma is not None:
        module = eqx.tree_at(lambda m: (m.weight, m.bias), module,
                             (jnp.asarray(gamma, dtype), jnp.asarray(beta, dtype)))
    mean, var = state.running_mean, state.running_var
    if kind == "equinox":
        eqx_state = eqx_state.set(module.ema_state_index,
                                  (jnp.asarray(mean, dtype), jnp.asarray(var, dtype)))
        # Already seeded: the next step blends, as the source's would.
        return module, eqx_state.set(module.ema_first_time_index, jnp.array(False))
    steps = debiased_count(state, kind)
    divisor = conv.inference_divisor(momentum, steps)
    stored = tuple(jnp.asarray(np.asarray(stat, np.float64) * divisor, dtype)
                   for stat in (mean, var))
    # lax.full_like keeps the counter's weak type, which State.set requires to match.
    counter = jax.lax.full_like(eqx_state.get(module.batch_counter), steps)
    eqx_state = eqx_state.set(module.batch_state_index, stored)
    return module, eqx_state.set(module.batch_counter, counter)


def _write_haiku(state: BNState, ndim: int, momentum: float) -> Any:
    import jax.numpy as jnp

    conv = get_convention("haiku")
    dtype = jnp.dtype(state.running_mean.dtype)
    shape = (1,) * (ndim - 1) + (state.num_features,)  # haiku keeps (1, ..., 1, C)
    options = {"create_scale": state.gamma is not None, "create_offset": state.beta is not None,
               "decay_rate": momentum, "eps": state.eps, "data_format": "channels_last",
               "name": _HAIKU_NAME}
    params = {key: jnp.asarray(value, dtype).reshape(shape)
              for key, value in (("scale", state.gamma), ("offset", state.beta))
              if value is not None}
    steps = debiased_count(state, "haiku")
    divisor = conv.inference_divisor(momentum, steps)
    hk_state = {
        f"{_HAIKU_NAME}/~/{ema}": {
            "counter": jnp.asarray(steps, jnp.int32),
            "hidden": jnp.asarray(np.asarray(stat, np.float64) * divisor, dtype).reshape(shape),
            "average": jnp.asarray(stat, dtype).reshape(shape),
        }
        for ema, stat in (("mean_ema", state.running_mean), ("var_ema", state.running_var))
    }
    return options, ({_HAIKU_NAME: params} if params else {}), hk_state


def _target_momentum(state: BNState, kind: str) -> float | None:
    conv = _CONVENTION[kind]
    if state.new_value_weight is None and kind not in _CUMULATIVE:
        weight = 1.0 / (state.num_batches_tracked + 1)
        return get_convention(conv).momentum_for_new_value_weight(weight)
    return state.momentum_for(conv)


def notes_for(state: BNState, kind: str) -> tuple[str, ...]:
    """What does not carry over from ``state`` to a ``kind`` layer."""
    notes = []
    target = get_convention(_CONVENTION[kind])
    source = get_convention(state.convention)
    if source.unbiased_running_var != target.unbiased_running_var:
        fed = "unbiased" if target.unbiased_running_var else "biased"
        was = "unbiased" if source.unbiased_running_var else "biased"
        notes.append(
            f"running_var: {kind} feeds it the {fed} batch variance where the source fed the "
            f"{was} one; after the next training step on n values per channel the two differ "
            "by w * var_B / (n - 1), w the new-value weight (inference now is identical)")
    if state.new_value_weight is None and _target_momentum(state, kind) is not None:
        notes.append(
            f"momentum: the cumulative average (momentum=None) does not exist in {kind}; it "
            f"becomes the fixed weight 1/{state.num_batches_tracked + 1} of its next step")
    if kind == "onnx" and float(np.float32(state.eps)) != state.eps:
        notes.append(f"eps: ONNX stores it as float32, {float(np.float32(state.eps))!r}")
    if state.gamma is None or state.beta is None:
        if kind in _JOINT_AFFINE and (state.gamma is not None or state.beta is not None):
            notes.append(f"affine: {kind} has gamma and beta together; the missing one is "
                         "written as its identity (ones or zeros)")
    notes.extend(_step_count_notes(state, kind, source, target))
    if target.one_pass_variance and kind == "haiku":
        notes.append("variance: haiku computes the training batch variance as E[x²]−E[x]² "
                     "without a clamp, which loses its digits when |mean| >> std (float32 at "
                     "offset 1e4: negative variances, NaN outputs); the carried statistics "
                     "are exact")
    return tuple(notes)


def _step_count_notes(state: BNState, kind: str, source: Convention,
                      target: Convention) -> list[str]:
    """What the seeding, debiasing and training-statistics rules change about the next training
    steps."""
    notes = []
    steps = state.num_batches_tracked
    if source.training_statistics != target.training_statistics:
        blended = source if source.training_statistics == "running" else target
        notes.append(
            f"training: {blended.name} normalises a training batch with the running statistics "
            "just updated with it, the other with the batch's own: training outputs differ "
            "(inference is identical)")
    if steps == 0 and source.counts_steps:
        notes.append(
            f"seeding: the source ({source.name}) had not trained; its next step would have "
            "given the batch weight 1 (" + ("replacing the statistics" if source.first_batch_seeds
                                            else "the debiasing divides by 1 - d") + f"), "
            f"{kind} blends it with the carried statistics")
    if target.debias is not None and _target_momentum(state, kind) is not None:
        count = debiased_count(state, kind)
        if source.debias is None or steps == 0:
            notes.append(
                f"counter: {kind} is written at step {count}, where 1 - d^{count} rounds to 1 "
                f"in {state.running_mean.dtype.name}: its debiasing is spent and it continues "
                f"the plain moving average (the source's count, {steps}, is not kept)")
    elif source.debias is not None and steps > 0 and state.new_value_weight is not None:
        weight = state.new_value_weight
        debiased_weight = weight / (1.0 - (1.0 - weight) ** (steps + 1))
        notes.append(
            f"debiasing: the source ({source.name}, step {steps}) would give the next batch the "
            f"weight w / (1 - (1-w)^{steps + 1}) = {debiased_weight:.6g}, {kind} gives it "
            f"w = {weight:.6g}; the two converge as the steps add up")
    return notes


def convert(source: Any, target: str, *, ndim: int = 4) -> Conversion:
    """``source`` as a new ``target`` layer, with notes on what does not carry over."""
    state = read(source)
    return Conversion(write(state, target, ndim=ndim), state, notes_for(state, target))


def save(state: BNState, path: str | Path) -> None:
    """Write ``state`` to an ``.npz`` file (no pickled objects)."""
    arrays = {"running_mean": state.running_mean, "running_var": state.running_var,
              "eps": np.float64(state.eps), "convention": np.str_(state.convention),
              "num_batches_tracked": np.int64(state.num_batches_tracked),
              "new_value_weight": np.float64(np.nan if state.new_value_weight is None
                                             else state.new_value_weight)}
    arrays.update({k: v for k, v in (("gamma", state.gamma), ("beta", state.beta))
                   if v is not None})
    np.savez(path, **arrays)


def load(path: str | Path) -> BNState:
    """Read a :func:`save` file with ``allow_pickle=False``."""
    with np.load(path, allow_pickle=False) as data:
        weight = float(data["new_value_weight"])
        return BNState(
            data["gamma"] if "gamma" in data else None, data["beta"] if "beta" in data else None,
            data["running_mean"], data["running_var"], float(data["eps"]),
            None if np.isnan(weight) else weight, str(data["convention"]),
            int(data["num_batches_tracked"]))
