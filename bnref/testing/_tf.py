"""The tf backend's adapter, and TensorFlow's own batch norms as built-ins to compare with:
Keras's ``BatchNormalization`` layer, ``tf.nn.batch_normalization`` fed ``tf.nn.moments``, and
the fused kernel ``tf.compat.v1.nn.fused_batch_norm``.

bnref.tf's math is XLA-compiled once per shape, so the adapter draws from the same small pool
of shapes as the JAX one: compiled functions are reused across examples.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf
from hypothesis import strategies as st

import bnref.tf as btf
from bnref.conventions import DEFAULT
from bnref.testing.backends import Backend, Builtin, LayerBuiltin, LayerConfig

# canonical state name -> the Keras weight's name
_NAMES = {"gamma": "gamma", "beta": "beta", "running_mean": "moving_mean",
          "running_var": "moving_variance", "num_batches_tracked": "num_batches_tracked"}


def to_tensor(array: np.ndarray) -> tf.Tensor:
    return tf.constant(np.array(array, copy=True))


def to_numpy(tensor: tf.Tensor) -> np.ndarray:
    return np.array(tensor)


def _wide(dtype: np.dtype) -> tf.DType:
    return tf.float64 if dtype == np.float64 else tf.float32


class KerasLayer:
    """A Keras layer with BatchNormalization's weight names, built on its first batch (inside
    a ``keras.Sequential`` model when ``sequential``). State moves in and out through
    ``get_weights()``/``set_weights()``, in the layer's own weight order."""

    def __init__(self, layer: keras.layers.Layer, sequential: bool = False) -> None:
        self.layer = layer
        self.sequential = sequential
        self.call = layer
        self.pending: Mapping[str, np.ndarray] | None = None

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        if not self.layer.built:
            if self.sequential:
                self.call = keras.Sequential([keras.Input(x.shape[1:], dtype=x.dtype.name),
                                              self.layer])
            else:
                self.layer.build(x.shape)
            if self.pending is not None:
                self.load_state(self.pending)
        return to_numpy(self.call(to_tensor(x), training=training))

    def _names(self) -> list[str]:
        canonical = {key: name for name, key in _NAMES.items()}
        return [canonical[w.name] for w in self.layer.weights]

    def state(self) -> dict[str, np.ndarray]:
        if not self.layer.built:
            return {}
        return dict(zip(self._names(), self.layer.get_weights(), strict=True))

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if not self.layer.built:
            self.pending = state
            return
        current = self.state()
        self.layer.set_weights([np.asarray(state.get(name, current[name]))
                                .astype(current[name].dtype) for name in current])


def builtin_layer(config: LayerConfig, sequential: bool = False) -> KerasLayer:
    return KerasLayer(keras.layers.BatchNormalization(
        **config.resolved(), center=config.affine, scale=config.affine,
        dtype=config.param_dtype), sequential)


def _keras_functional(x, gamma, beta, running_mean, running_var, *, training, momentum, eps,
                      axis, convention="keras"):
    del convention  # fixed by the cases: Keras's meaning
    layer = keras.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=eps,
                                            center=beta is not None, scale=gamma is not None,
                                            dtype=running_mean.dtype.name)
    layer.build(x.shape)
    layer.set_weights([w for w in (gamma, beta, running_mean, running_var) if w is not None])
    y = to_numpy(layer(to_tensor(x), training=training))
    return y, to_numpy(layer.moving_mean.value), to_numpy(layer.moving_variance.value)


def _keras_gradients(x, gamma, beta, dy, *, eps, axis):
    layer = keras.layers.BatchNormalization(axis=axis, epsilon=eps, center=beta is not None,
                                            scale=gamma is not None, dtype=_wide(x.dtype).name)
    layer.build(x.shape)
    weights = [w for w in (gamma, beta) if w is not None]
    layer.set_weights([*weights, *layer.get_weights()[len(weights):]])
    x_t = to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        y = layer(x_t, training=True)
    wanted = [x_t, *layer.trainable_weights]
    grads = iter(tape.gradient(y, wanted, output_gradients=to_tensor(dy)))
    dx = to_numpy(next(grads))
    dgamma = None if gamma is None else to_numpy(next(grads))
    dbeta = None if beta is None else to_numpy(next(grads))
    return dx, dgamma, dbeta


def _nn_normalize(x, gamma, beta, mean, var, eps, axis):
    shape = [1] * x.shape.rank
    shape[axis] = -1
    gamma, beta = (None if v is None else tf.reshape(v, shape) for v in (gamma, beta))
    return tf.nn.batch_normalization(x, tf.reshape(mean, shape), tf.reshape(var, shape),
                                     beta, gamma, eps)


def _nn_functional(x, gamma, beta, running_mean, running_var, *, training, momentum, eps,
                   axis, convention="keras"):
    """tf.nn.batch_normalization fed tf.nn.moments; the running statistics move by Keras's
    rule, written here as keras/src/layers/normalization/batch_normalization.py does."""
    del convention  # fixed by the cases: Keras's meaning
    x_t, gamma_t, beta_t, mean_t, var_t = (None if a is None else to_tensor(a)
                                           for a in (x, gamma, beta, running_mean, running_var))
    reduce_axes = [i for i in range(x.ndim) if i != axis]
    if training or mean_t is None:
        mean, var = tf.nn.moments(x_t, reduce_axes)
    else:
        mean, var = mean_t, var_t
    y = to_numpy(_nn_normalize(x_t, gamma_t, beta_t, mean, var, eps, axis))
    if mean_t is None or not training:
        return y, running_mean, running_var
    return (y, to_numpy(mean_t * momentum + mean * (1.0 - momentum)),
            to_numpy(var_t * momentum + var * (1.0 - momentum)))


def _nn_gradients(x, gamma, beta, dy, *, eps, axis):
    inputs = [None if a is None else to_tensor(a) for a in (x, gamma, beta)]
    sources = [t for t in inputs if t is not None]
    with tf.GradientTape() as tape:
        tape.watch(sources)
        mean, var = tf.nn.moments(inputs[0], [i for i in range(x.ndim) if i != axis])
        y = _nn_normalize(inputs[0], inputs[1], inputs[2], mean, var, eps, axis)
    grads = iter(tape.gradient(y, sources, output_gradients=to_tensor(dy)))
    return tuple(None if t is None else to_numpy(next(grads)) for t in inputs)


def _fused_functional(x, gamma, beta, running_mean, running_var, *, training, momentum, eps,
                      axis, convention="torch"):
    """The fused kernel, channels moved last (NHWC/NDHWC; the CPU kernel's layout). With
    ``exponential_avg_factor`` it blends running statistics as torch does: new-value weight,
    and the *unbiased* batch variance."""
    del convention  # fixed by the cases: torch's meaning
    last = [i for i in range(x.ndim) if i != axis] + [axis]
    channels = x.shape[axis]
    ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    use_batch = training or running_mean is None
    y, new_mean, new_var = tf.compat.v1.nn.fused_batch_norm(
        to_tensor(np.transpose(x, last)), to_tensor(ones if gamma is None else gamma),
        to_tensor(zeros if beta is None else beta),
        mean=None if running_mean is None else to_tensor(running_mean),
        variance=None if running_var is None else to_tensor(running_var),
        epsilon=eps, data_format="NHWC" if x.ndim == 4 else "NDHWC", is_training=use_batch,
        exponential_avg_factor=momentum if running_mean is not None and training else 1.0)[:3]
    y = np.transpose(to_numpy(y), np.argsort(last))
    if running_mean is None or not training:
        return y, running_mean, running_var
    return y, to_numpy(new_mean), to_numpy(new_var)


def _fused_gradients(x, gamma, beta, dy, *, eps, axis):
    last = [i for i in range(x.ndim) if i != axis] + [axis]
    channels = x.shape[axis]
    x_t = to_tensor(np.transpose(x, last))
    scale = to_tensor(np.ones(channels, np.float32) if gamma is None else gamma)
    offset = to_tensor(np.zeros(channels, np.float32) if beta is None else beta)
    with tf.GradientTape() as tape:
        tape.watch([x_t, scale, offset])
        y = tf.compat.v1.nn.fused_batch_norm(x_t, scale, offset, epsilon=eps,
                                             data_format="NHWC" if x.ndim == 4 else "NDHWC",
                                             is_training=True)[0]
    dx, dgamma, dbeta = tape.gradient(y, [x_t, scale, offset],
                                      output_gradients=to_tensor(np.transpose(dy, last)))
    return (np.transpose(to_numpy(dx), np.argsort(last)),
            None if gamma is None else to_numpy(dgamma),
            None if beta is None else to_numpy(dbeta))


KERAS_MOMENTUM = st.one_of(st.just(DEFAULT), st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1))


class TfBackend(Backend):
    exact_errors = True  # bnref's own tier: the contract's exact exception messages
    name = "tf"
    array_type = btf.functional.ARRAY_TYPE
    dtypes = ("float16", "bfloat16", "float32", "float64")
    # Eager calls on small tensors run op by op (bnref.tf.functional.EAGER_MAX_SIZE): no
    # compile per shape, so tf draws any shape and the full example count, as numpy does.

    def asarray(self, array: np.ndarray) -> tf.Tensor:
        return to_tensor(array)

    def to_numpy(self, array: tf.Tensor) -> np.ndarray:
        return to_numpy(array)

    def batch_norm(self, x, gamma, beta, running_mean, running_var, **kwargs):
        return btf.batch_norm(x, gamma, beta, running_mean, running_var, **kwargs)

    def gradients(self, x, gamma, beta, dy, *, eps=None, axis=None, convention="torch"):
        # Eagerly: the XLA-compiled math and its gradient function are cached per shape,
        # where an outer tf.function keyed on eps would recompile for every new value.
        inputs = [None if a is None else to_tensor(a) for a in (x, gamma, beta)]
        sources = [t for t in inputs if t is not None]
        wide = _wide(x.dtype)
        with tf.GradientTape() as tape:
            tape.watch(sources)
            y = btf.batch_norm(*inputs, None, None, training=True, eps=eps, axis=axis,
                               convention=convention)[0]
            objective = tf.reduce_sum(tf.cast(y, wide) * tf.constant(dy, wide))
        grads = iter(tape.gradient(objective, sources))
        return tuple(None if t is None else to_numpy(next(grads)) for t in inputs)

    def make_layer(self, config: LayerConfig, sequential: bool = False) -> KerasLayer:
        # autocast=False: float16 data stays float16 with float32 weights (as under a
        # mixed_float16 policy) instead of being cast to the weights' dtype.
        return KerasLayer(btf.BatchNorm(
            config.axis, config.momentum, config.eps, center=config.affine,
            scale=config.affine, num_features=config.num_features,
            track_running_stats=config.track_running_stats, convention=config.convention,
            dtype=config.param_dtype, autocast=False), sequential)

    def builtin(self, name: str) -> Builtin:
        keras_cases = {"conventions": ("keras",), "dtypes": ("float32", "float64")}
        if name == "keras.layers.BatchNormalization":
            return Builtin(name, _keras_functional, cases={**keras_cases, "running_stats": True},
                           note="the layer used once: set_weights, then one call",
                           gradients=_keras_gradients)
        if name == "tf.nn.batch_normalization":
            return Builtin(name, _nn_functional, cases=keras_cases,
                           note="fed tf.nn.moments; Keras's running-statistic rule",
                           gradients=_nn_gradients)
        if name == "tf.compat.v1.nn.fused_batch_norm":
            return Builtin(name, _fused_functional,
                           cases={"conventions": ("torch",), "dtypes": ("float32",),
                                  "ranks": (4, 5)},
                           note="ranks 4-5, float32, channels moved last; blends running "
                                "statistics as torch does (unbiased variance)",
                           gradients=_fused_gradients)
        return super().builtin(name)

    def layer_builtin(self, name: str) -> LayerBuiltin:
        if name != "keras.layers.BatchNormalization":
            return super().layer_builtin(name)
        return LayerBuiltin(name, builtin_layer,
                            cases={"conventions": ("keras",), "track_running_stats": True,
                                   "dtypes": ("float32", "float64"),
                                   "momentum": KERAS_MOMENTUM},
                            note="Keras keeps no batch counter: no momentum=None")
