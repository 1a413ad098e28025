"""What only the TensorFlow backend promises: Keras's defaults, weights and training semantics,
a layer inside Keras models (fit, save/load, mixed precision), the same results eagerly, in
tf.function and under jit_compile, the fused kernel's unbiased batch variance, and arrays other
than tensors (numpy, tf.Variable, keras.Variable). The layer as Keras's own (masks, renorm,
config, files, Keras's layer tests) is tests/test_tf_keras.py; in a real model,
tests/test_tf_model.py."""

from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnref.conventions import CONVENTIONS
from bnref.testing.checks import check_forward, check_gradients, check_layer
from bnref.testing.fixtures import backend_or_skip
from bnref.testing.strategies import SHAPE_POOL, bn_cases, layer_cases, with_dy
from bnref.testing.suite import assert_all
from bnref.testing.tolerances import ChannelStats, assert_close, forward_tolerance

backend_or_skip("tf")  # skips this module without TensorFlow, fails it when tf is required
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import bnref.tf as btf  # noqa: E402
from bnref.testing._tf import KERAS_MOMENTUM, LayerBuiltin, TfBackend, builtin_layer  # noqa: E402
from tests.test_conventions import observe_one_step  # noqa: E402

RECORD = CONVENTIONS["keras"]
BACKEND = TfBackend()


def examples(share: float = 0.4):
    """The active profile's example budget, scaled down: the properties here trace or compile
    (tf.function, XLA, Keras models) for every new shape, ~0.1-0.3 s each."""
    return settings(max_examples=max(10, round(settings.default.max_examples * share)))


def random_weights(layer: keras.layers.Layer, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.uniform(0.5, 2, w.shape) if "variance" in w.name else rng.normal(0, 1, w.shape))
            .astype(w.dtype) for w in layer.weights]


def test_keras_record_is_the_installed_defaults():
    layer = keras.layers.BatchNormalization()
    assert (layer.momentum, layer.epsilon, layer.axis) == (
        RECORD.default_momentum, RECORD.default_eps, RECORD.default_axis)
    layer.build((2, 3))
    assert [w.name for w in layer.weights] == [RECORD.state_names[k] for k in (
        "gamma", "beta", "running_mean", "running_var")]

    def step(x, momentum):
        bn = keras.layers.BatchNormalization(momentum=momentum)
        bn(tf.constant(x), training=True)
        return bn.moving_mean.numpy(), bn.moving_variance.numpy()

    assert observe_one_step(step, 0.25) == {"momentum_weights": RECORD.momentum_weights,
                                            "unbiased_running_var": RECORD.unbiased_running_var}
    ours = btf.BatchNorm()
    assert (ours.momentum, ours.epsilon, ours.axis) == (layer.momentum, layer.epsilon, layer.axis)


@pytest.mark.parametrize("axis", [1, -1], ids=["axis1", "axis-1"])
@examples()
@given(data=st.data())
def test_layer_in_a_sequential_model_matches_keras(axis, data):
    """Both layers inside keras.Sequential, loaded with the same random weights through
    set_weights, trained on the same batches, then run in inference."""
    rank = data.draw(st.integers(2, 5), label="rank")
    case = data.draw(layer_cases(conventions=("keras",), dtypes=("float32", "float64"),
                                 momentum=KERAS_MOMENTUM, track_running_stats=True,
                                 load_state=True, ranks=(rank, rank), channel_axis=axis % rank,
                                 shapes=SHAPE_POOL), label="layer case")

    class InSequential(TfBackend):
        def make_layer(self, config, sequential=True):
            return super().make_layer(config, sequential)

    reference = LayerBuiltin("keras.layers.BatchNormalization in keras.Sequential",
                             functools.partial(builtin_layer, sequential=True), cases={})
    assert_all(check_layer(InSequential(), case, reference=reference), case)


@pytest.mark.parametrize("axis", [1, -1], ids=["axis1", "axis-1"])
def test_weights_move_between_keras_and_bnref_both_ways(axis):
    x = tf.constant(np.random.default_rng(0).normal(3, 2, (8, 3, 4, 5)).astype(np.float32))
    keras_bn, ours = keras.layers.BatchNormalization(axis=axis), btf.BatchNorm(axis=axis)
    keras_bn.build(x.shape)
    ours.build(x.shape)
    assert [w.name for w in ours.weights] == [w.name for w in keras_bn.weights]
    assert [w.trainable for w in ours.weights] == [w.trainable for w in keras_bn.weights]
    keras_bn.set_weights(random_weights(keras_bn, 1))
    ours.set_weights(keras_bn.get_weights())
    assert_close(ours(x).numpy(), keras_bn(x).numpy(), 1e-5, "inference after Keras -> bnref")
    for _ in range(3):
        ours(x, training=True)
    keras_bn.set_weights(ours.get_weights())
    assert_close(keras_bn(x).numpy(), ours(x).numpy(), 1e-5, "inference after bnref -> Keras")


def test_fused_batch_norm_returns_the_unbiased_batch_variance():
    """tf.compat.v1.nn.fused_batch_norm in training normalizes with the biased variance but
    returns the unbiased one (n / (n - 1) times it), for the caller's running average: the
    torch convention, not Keras's."""
    x = np.random.default_rng(2).normal(1, 2, (3, 2, 2, 4)).astype(np.float32)
    n = x.size // 4
    y, mean, var = tf.compat.v1.nn.fused_batch_norm(tf.constant(x), tf.ones(4), tf.zeros(4),
                                                    epsilon=1e-3, is_training=True)[:3]
    biased = x.astype(np.float64).var(axis=(0, 1, 2))
    assert_close(var.numpy(), biased * n / (n - 1), 1e-5 * biased.max(), "returned variance")
    ours, _, _ = btf.batch_norm(tf.constant(x), None, None, None, None, training=True, eps=1e-3,
                                axis=-1)
    assert_close(y.numpy(), ours.numpy(), 1e-5, "output uses the biased variance")
    assert_close(mean.numpy(), x.astype(np.float64).mean(axis=(0, 1, 2)), 1e-5, "mean")


@functools.cache
def _compiled(mode, training, momentum, eps, axis, convention, ndim=None):
    # One outer function per rank: with reduce_retracing, TF relaxes a function that has seen
    # two ranks to unknown rank, which bnref.tf refuses (tested below).
    del ndim

    def run(x, gamma, beta, mean, var):
        return btf.batch_norm(x, gamma, beta, mean, var, training=training, momentum=momentum,
                              eps=eps, axis=axis, convention=convention)

    if mode == "eager":
        return run
    return tf.function(run, jit_compile=mode == "jit_compile", autograph=False,
                       reduce_retracing=True)


@pytest.mark.parametrize("mode", ["tf.function", "jit_compile"])
@examples()
@given(data=st.data())
def test_eager_tf_function_and_jit_compile_agree(mode, data):
    # A few constants: each new Python value is a new trace of the outer function.
    case = data.draw(bn_cases(dtypes=BACKEND.dtypes, shapes=SHAPE_POOL,
                              eps=st.sampled_from([None, 1e-3]),
                              momentum=st.sampled_from([0.1, 0.9])), label="case")
    key = (case.training, case.momentum, case.eps, case.axis, case.convention, case.x.ndim)
    arrays = [None if a is None else tf.constant(a) for a in case.arrays]
    eager = _compiled("eager", *key)(*arrays)
    traced = _compiled(mode, *key)(*arrays)
    stats = ChannelStats.of(case.x, case.channel_axis)
    batch = case.training or case.running_mean is None
    tol = 2 * forward_tolerance(case.x, case.channel_axis, gamma=case.gamma, beta=case.beta,
                                eps=case.resolved_eps,
                                mean=stats.mean if batch else case.running_mean,
                                var=stats.var if batch else case.running_var,
                                batch_stats=batch)
    assert traced[0].dtype == eager[0].dtype
    assert_close(traced[0].numpy().astype(np.float64), eager[0].numpy().astype(np.float64),
                 tol, f"y, {mode} vs eager")
    for got, want, name in zip(traced[1:], eager[1:], ("running_mean", "running_var"),
                               strict=True):
        assert (got is None) == (want is None), name
        if got is not None:
            scale = np.abs(want.numpy()).max() + 1
            assert_close(got.numpy(), want.numpy(), 1e-5 * scale, f"{name}, {mode} vs eager")


def test_only_large_eager_inputs_are_compiled():
    compiled = btf.functional._normalise
    limit = btf.functional.EAGER_MAX_SIZE
    small = tf.ones((limit // 8, 8))
    large = tf.ones((limit // 8 + 1, 8))
    before = compiled.experimental_get_tracing_count()
    btf.batch_norm(small, None, None, None, None, training=True, axis=1, convention="onnx")
    assert compiled.experimental_get_tracing_count() == before, "a small eager input compiled"
    btf.batch_norm(large, None, None, None, None, training=True, axis=1, convention="onnx")
    assert compiled.experimental_get_tracing_count() == before + 1, "a large one did not"


@examples()
@given(data=st.data())
def test_compiled_path_matches_the_oracle(data):
    """The shared suite's small eager inputs run op by op: here the same checks go through the
    XLA-compiled function that large inputs and traced callers use."""
    case = data.draw(bn_cases(dtypes=BACKEND.dtypes, shapes=SHAPE_POOL), label="case")
    grad_case, dy = data.draw(with_dy(bn_cases(dtypes=BACKEND.dtypes, shapes=SHAPE_POOL,
                                               training=True)), label="gradient case")
    with mock.patch.object(btf.functional, "EAGER_MAX_SIZE", -1):
        assert_all(check_forward(BACKEND, case), case)
        assert_all(check_gradients(BACKEND, grad_case, dy), grad_case)


@pytest.mark.parametrize("mode", ["eager", "tf.function", "jit_compile"])
def test_gradient_tape_works_in_every_mode(mode):
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(1, 2, (6, 3)))
    gamma, beta = tf.Variable(rng.normal(size=3)), tf.Variable(rng.normal(size=3))
    dy = tf.constant(rng.normal(size=(6, 3)))
    run = _compiled(mode, True, 0.1, 1e-5, 1, "torch")
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = run(x, gamma, beta, None, None)[0]
    dx, dgamma, dbeta = tape.gradient(y, [x, gamma, beta], output_gradients=dy)
    from bnref.numpy import batch_norm_backward

    ref = batch_norm_backward(dy.numpy(), x.numpy(), gamma.numpy(), beta=beta.numpy(), eps=1e-5,
                              axis=1)
    for got, want, name in zip((dx, dgamma, dbeta), ref, ("dx", "dgamma", "dbeta"), strict=True):
        assert_close(got.numpy(), want, 1e-10, name)


def test_training_semantics_are_keras():
    """Statistics move only on training=True; trainable=False means inference even then."""
    x = tf.constant(np.random.default_rng(4).normal(5, 3, (16, 3)).astype(np.float32))
    for layer in (keras.layers.BatchNormalization(), btf.BatchNorm()):
        layer.build(x.shape)
        untouched = [w.copy() for w in layer.get_weights()]
        y_default, y_false = layer(x), layer(x, training=False)
        np.testing.assert_array_equal(y_default.numpy(), y_false.numpy())
        assert all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), untouched,
                                                        strict=True)), type(layer)
        layer.trainable = False
        y_frozen = layer(x, training=True)
        np.testing.assert_array_equal(y_frozen.numpy(), y_false.numpy())
        assert all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), untouched,
                                                        strict=True)), type(layer)
        layer.trainable = True
        layer(x, training=True)
        assert not np.array_equal(layer.get_weights()[2], untouched[2]), type(layer)


def test_fit_trains_like_keras_with_the_same_weights():
    """model.fit (a traced graph whose batch dimension becomes None after the first retrace)
    moves gamma, beta and the moving statistics as Keras's own layer does."""
    rng = np.random.default_rng(5)
    x = rng.normal(2, 3, (37, 4, 3)).astype(np.float32)  # batches of 8, then a batch of 5
    target = rng.normal(size=(37, 4, 3)).astype(np.float32)
    models = []
    for layer in (keras.layers.BatchNormalization(momentum=0.8),
                  btf.BatchNorm(momentum=0.8)):
        model = keras.Sequential([keras.Input((4, 3)), layer])
        model.set_weights(random_weights(model.layers[0], 6))
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(x, target, batch_size=8, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    for theirs, ours, weight in zip(models[0].get_weights(), models[1].get_weights(),
                                    models[0].layers[0].weights, strict=True):
        assert_close(ours, theirs, 1e-4 * (1 + np.abs(theirs).max()), weight.name)


OPTIONS = {"center": False, "epsilon": 0.1, "gamma_initializer": "he_normal",
           "beta_regularizer": "l2", "gamma_constraint": "non_neg"}


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None, "convention": "torch", "axis": 1},
                                    OPTIONS], ids=["defaults", "torch-cumulative", "options"])
def test_config_and_keras_file_round_trip(kwargs, tmp_path):
    layer = btf.BatchNorm(**kwargs)
    again = btf.BatchNorm.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    x = np.random.default_rng(7).normal(1, 2, (10, 3)).astype(np.float32)
    model = keras.Sequential([keras.Input((3,)), layer])
    model(x, training=True)  # moves the statistics away from their initial values
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")  # no custom_objects needed
    assert type(loaded.layers[0]) is btf.BatchNorm
    assert loaded.layers[0].get_config() == layer.get_config()
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_mixed_float16_policy_keeps_float32_weights_and_float16_outputs():
    x = tf.constant(np.random.default_rng(8).normal(100, 4, (32, 4)).astype(np.float16))
    ours = btf.BatchNorm(dtype="mixed_float16")
    theirs = keras.layers.BatchNormalization(dtype="mixed_float16")
    y, y_ref = ours(x, training=True), theirs(x, training=True)
    assert y.dtype == tf.float16 and ours.moving_mean.dtype == "float32"
    assert_close(y.numpy().astype(np.float64), y_ref.numpy().astype(np.float64), 4e-3, "y")
    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        assert_close(a, b, 1e-5 * (1 + np.abs(b).max()), "weights")


def test_unknown_batch_dimension_and_unknown_rank():
    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def train(x):
        return btf.batch_norm(x, None, None, tf.zeros(3), tf.ones(3), training=True,
                              convention="torch")

    x = np.random.default_rng(9).normal(size=(5, 3)).astype(np.float32)
    _, _, var = train(tf.constant(x))
    assert_close(var.numpy(), 0.9 + 0.1 * x.astype(np.float64).var(axis=0, ddof=1), 1e-6,
                 "unbiased running variance with a batch size known only at run time")

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def any_rank(x):
        return btf.batch_norm(x, None, None, None, None, training=True)

    with pytest.raises(ValueError, match="x must have a known rank"):
        any_rank.get_concrete_function()


# --- array-likes ------------------------------------------------------------------------------

ARRAY_KINDS = {"numpy": np.asarray, "tf.Variable": tf.Variable, "keras.Variable": keras.Variable}
ARGUMENT_GROUPS = {"x": ("x",), "gamma": ("gamma",), "beta": ("beta",),
                   "running-stats": ("running_mean", "running_var")}


def bn_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(2, 3, (6, 4, 3)).astype(np.float32),
            "gamma": rng.normal(1, 0.5, 3).astype(np.float32),
            "beta": rng.normal(0, 0.5, 3).astype(np.float32),
            "running_mean": rng.normal(0, 1, 3).astype(np.float32),
            "running_var": rng.uniform(0.5, 2, 3).astype(np.float32)}


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("group", list(ARGUMENT_GROUPS))
@pytest.mark.parametrize("kind", list(ARRAY_KINDS))
def test_batch_norm_takes_arrays_tf_convert_to_tensor_takes(kind, group, training):
    """numpy arrays, tf.Variable and keras.Variable anywhere an array goes: the same results
    as tensors, and variables are read, never assigned."""
    arrays = bn_arrays(10)
    tensors = {name: tf.constant(value) for name, value in arrays.items()}
    given = {**tensors, **{name: ARRAY_KINDS[kind](arrays[name])
                           for name in ARGUMENT_GROUPS[group]}}
    expected = btf.batch_norm(**tensors, training=training, convention="keras")
    got = btf.batch_norm(**given, training=training, convention="keras")
    for a, b, name in zip(got, expected, ("y", "running_mean", "running_var"), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    for name in ARGUMENT_GROUPS[group]:
        np.testing.assert_array_equal(np.asarray(given[name]), arrays[name], err_msg=name)


_ARRAY = btf.functional.ARRAY_TYPE
_FLOATING = "float16, bfloat16, float32, float64"


@pytest.mark.parametrize("name, make, message", [
    ("x", lambda: object(), f"x must be a {_ARRAY}, got builtins.object"),
    ("x", lambda: {"a": 1.0}, f"x must be a {_ARRAY}, got builtins.dict"),
    ("x", lambda: np.array([[object()] * 3] * 2), f"x must be a {_ARRAY}, got numpy.ndarray"),
    ("x", lambda: np.full((2, 3), "a"), f"x must have a floating dtype ({_FLOATING}), got string"),
    ("gamma", lambda: np.ones(3, np.int64),
     f"gamma must have a floating dtype ({_FLOATING}), got int64"),
    ("beta", lambda: keras.Variable(np.ones(3, np.int32), dtype="int32", trainable=False),
     f"beta must have a floating dtype ({_FLOATING}), got int32"),
    ("running_var", lambda: tf.Variable(np.ones(3, np.int32)),
     f"running_var must have a floating dtype ({_FLOATING}), got int32"),
], ids=["object", "dict", "object-array", "string-array", "int-numpy", "int-keras-variable",
        "int-tf-variable"])
def test_batch_norm_refuses_what_tf_refuses_and_non_floating_dtypes(name, make, message):
    arrays = {key: tf.constant(value) for key, value in bn_arrays(11).items()}
    with pytest.raises(TypeError) as error:
        btf.batch_norm(**{**arrays, name: make()}, training=True, convention="keras")
    assert str(error.value) == message


class OwnBatchNorm(keras.layers.Layer):
    """A user's own Keras layer over ``bnref.tf.batch_norm`` and its own ``add_weight``
    variables, passed as they are."""

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.gamma = self.add_weight(shape=shape, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=shape, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                           name="moving_mean")
        self.moving_variance = self.add_weight(shape=shape, initializer="ones", trainable=False,
                                               name="moving_variance")

    def call(self, x, training=False):
        y, mean, var = btf.batch_norm(x, self.gamma, self.beta, self.moving_mean,
                                      self.moving_variance, training=bool(training),
                                      convention="keras")
        if training:
            self.moving_mean.assign(mean)
            self.moving_variance.assign(var)
        return y


def test_a_keras_layer_can_pass_its_own_weights_to_batch_norm():
    """Trained with fit, such a layer moves exactly as bnref's own layer (the same ops)."""
    rng = np.random.default_rng(12)
    x = rng.normal(2, 3, (24, 5)).astype(np.float32)
    target = rng.normal(size=(24, 5)).astype(np.float32)
    trained = []
    for layer in (OwnBatchNorm(), btf.BatchNorm()):
        model = keras.Sequential([keras.Input((5,)), layer])
        initial = random_weights(layer, 13)
        model.set_weights(initial)
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(x, target, batch_size=8, epochs=2, shuffle=False, verbose=0)
        trained.append(model.get_weights())
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    for own, ours, start, name in zip(*trained, initial, names, strict=True):
        assert not np.array_equal(own, start), f"{name} did not move"
        np.testing.assert_array_equal(own, ours, err_msg=name)
