"""``bnref.tf.BatchNorm`` as Keras's own layer: Keras's layer test protocol with its own test
file's cases, Keras's correctness/trainable/mask/renorm checks run against the built-in, masks
(Keras's masked moments, propagated to the next layer), the built-in's config (``from_config``,
``clone_model``), batch renormalization over several training steps, ``synchronized=True``
under ``tf.distribute``, and weight files both ways.

Numbers are compared with the built-in run on the same input from the same state (bnref's
layer loaded with the built-in's weights before each call). Each implementation is within the
first-order bound of ``bnref.testing.tolerances`` from the exact result, so the two are within
twice it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import (
    SAFETY,
    UNIT_ROUNDOFF,
    ChannelStats,
    assert_close,
    compare,
    compute_dtype_name,
    forward_tolerance,
    gradient_tolerances,
    model_tolerance,
    rounding_spread,
    running_stat_tolerances,
)

backend_or_skip("tf")  # skips this module without TensorFlow, fails it when tf is required
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras.src.testing import TestCase as KerasTestCase  # noqa: E402

import bnref.tf as btf  # noqa: E402

BUILTIN = keras.layers.BatchNormalization
RENORM_WEIGHTS = ("moving_stddev", "renorm_mean", "renorm_stddev")


# --- helpers ---------------------------------------------------------------------------------

def both(**kwargs) -> tuple[keras.layers.Layer, btf.BatchNorm]:
    return BUILTIN(**kwargs), btf.BatchNorm(**kwargs)


def weights_of(layer: keras.layers.Layer) -> dict[str, np.ndarray]:
    return {w.name: np.asarray(w.numpy()) for w in layer.weights}


def keras_mask(tensor) -> np.ndarray | None:
    mask = getattr(tensor, "_keras_mask", None)
    return None if mask is None else np.asarray(mask)


def flagged_values(x: np.ndarray, axis: int, mask: np.ndarray | None) -> list[np.ndarray]:
    """Per channel, the values of ``x`` that count, in x's dtype: all of them, or those the
    mask flags (Keras's layout: one flag per position of x without its last axis). A channel
    with nothing flagged has Keras's statistics 0 and 0, those of a single 0."""
    flags = (np.ones(x.shape, bool) if mask is None
             else np.broadcast_to(np.asarray(mask).astype(bool)[..., None], x.shape))
    channels = x.shape[axis]
    values = np.moveaxis(x, axis, 0).reshape(channels, -1)
    chosen = np.moveaxis(flags, axis, 0).reshape(channels, -1)
    return [row[keep] if keep.any() else np.zeros(1, x.dtype)
            for row, keep in zip(values, chosen, strict=True)]


def batch_stats(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([v.astype(np.float64).mean() for v in values]),
            np.array([v.astype(np.float64).var() for v in values]))


def running_bounds(values: list[np.ndarray], old_mean: np.ndarray, old_var: np.ndarray,
                   weight: float, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``running_stat_tolerances`` per channel, over that channel's flagged values."""
    bounds = [running_stat_tolerances(v.reshape(-1, 1), 1, old_mean=old_mean[c:c + 1],
                                      old_var=old_var[c:c + 1], new_value_weight=weight,
                                      stat_dtype=dtype)
              for c, v in enumerate(values)]
    return np.concatenate([b[0] for b in bounds]), np.concatenate([b[1] for b in bounds])


def build_both(theirs: keras.layers.Layer, ours: btf.BatchNorm, shape) -> None:
    for layer in (theirs, ours):
        if not layer.built:
            layer.build(tuple(shape))


def call_both(theirs: keras.layers.Layer, ours: btf.BatchNorm, x, *, training: bool,
              mask=None) -> tf.Tensor:
    """Load ``ours`` with the built-in's state, call both on ``x`` and compare the outputs and
    the new moving statistics (unchanged, exactly, outside training). ``x`` may carry a Keras
    mask (from a ``Masking`` layer). Returns the built-in's output."""
    x_np = np.asarray(x)
    mask_np = keras_mask(x) if mask is None else np.asarray(mask)
    build_both(theirs, ours, x_np.shape)
    ours.set_weights(theirs.get_weights())
    before = weights_of(theirs)
    kwargs = {} if mask is None else {"mask": mask}
    y_theirs, y_ours = theirs(x, training=training, **kwargs), ours(x, training=training, **kwargs)
    after_theirs, after_ours = weights_of(theirs), weights_of(ours)
    axis = theirs.axis % x_np.ndim
    x_in = x_np.astype(theirs.compute_dtype)  # what the layers normalize (Keras autocasts)
    moves = training and theirs.trainable
    values = flagged_values(x_in, axis, mask_np)
    mean, var = batch_stats(values) if moves else (before["moving_mean"],
                                                   before["moving_variance"])
    tol = 2 * forward_tolerance(x_in, axis, gamma=before.get("gamma"), beta=before.get("beta"),
                                eps=theirs.epsilon, mean=mean, var=var, batch_stats=moves)
    assert_close(np.asarray(y_ours), np.asarray(y_theirs), tol, "y vs the built-in")
    if not moves:
        for name, value in before.items():
            np.testing.assert_array_equal(after_ours[name], value, err_msg=name)
            np.testing.assert_array_equal(after_theirs[name], value, err_msg=name)
        return y_theirs
    mean_tol, var_tol = running_bounds(values, before["moving_mean"], before["moving_variance"],
                                       1 - theirs.momentum, theirs.variable_dtype)
    assert_close(after_ours["moving_mean"], after_theirs["moving_mean"], 2 * mean_tol,
                 "moving_mean vs the built-in")
    assert_close(after_ours["moving_variance"], after_theirs["moving_variance"], 2 * var_tol,
                 "moving_variance vs the built-in")
    return y_theirs


def modes_bound(layer: btf.BatchNorm, x: np.ndarray) -> np.ndarray:
    """How far ``layer``'s training and inference outputs on ``x`` may be apart when its moving
    statistics are (a rounding of) x's batch statistics: the two modes' forward bounds added
    (the training bound covers the statistics' own rounding)."""
    weights = {name: value.astype(np.float64) for name, value in weights_of(layer).items()}
    axis = layer.axis % x.ndim
    stats = ChannelStats.of(x, axis)
    return sum(forward_tolerance(x, axis, gamma=weights.get("gamma"), beta=weights.get("beta"),
                                 eps=layer.epsilon, mean=mean, var=var, batch_stats=batch)
               for mean, var, batch in ((stats.mean, stats.var, True),
                                        (weights["moving_mean"], weights["moving_variance"],
                                         False)))


def assert_differ(a, b, tolerance, what: str) -> None:
    """``a`` and ``b`` differ by more than ``tolerance`` somewhere (Keras's assertNotAllClose,
    with a tolerance from the bounds)."""
    assert not compare(np.asarray(a), np.asarray(b), tolerance, what).passed, what


# --- Keras's layer test protocol --------------------------------------------------------------

# keras/src/layers/normalization/batch_normalization_test.py: test_bn_basics, test_renorm_basics,
# with a masked call added. (init kwargs, input shape, trainable / non-trainable weights, losses)
MASK = np.array([[True, True, False, False], [True, True, True, False]])
PROTOCOL = {
    "center-scale": ({"center": True, "scale": True}, (2, 3), 2, 2, 0, {}),
    "no-center-no-scale": ({"center": False, "scale": False}, (2, 3), 0, 2, 0, {}),
    "image-regularizers": ({"center": True, "scale": True, "beta_regularizer": "l2",
                            "gamma_regularizer": "l2"}, (2, 4, 4, 3), 2, 2, 2, {}),
    "renorm": ({"center": True, "scale": True, "renorm": True}, (2, 3), 2, 5, 0, {}),
    "renorm-clipping": ({"center": True, "scale": True, "renorm": True,
                         "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}},
                        (2, 4, 4, 3), 2, 5, 0, {}),
    "masked": ({"center": True, "scale": True}, (2, 4, 3), 2, 2, 0, {"mask": MASK}),
}


@pytest.mark.parametrize("layer_cls", [BUILTIN, btf.BatchNorm], ids=["builtin", "bnref"])
@pytest.mark.parametrize("case", list(PROTOCOL), ids=str)
def test_keras_layer_test_protocol(case, layer_cls):
    """``keras.src.testing.TestCase.run_layer_test``: config and serialization round trips,
    weight counts, symbolic and eager calls, a compiled ``fit`` step, mixed precision. Run on
    the built-in too, so a case that Keras itself fails is seen as such."""
    init_kwargs, shape, trainable, non_trainable, losses, extra = PROTOCOL[case]
    keras_test = KerasTestCase()
    keras_test.setUp()
    keras_test.run_layer_test(
        layer_cls, init_kwargs=init_kwargs, call_kwargs={"training": True, **extra},
        input_shape=shape, expected_output_shape=shape,
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=non_trainable, expected_num_seed_generators=0,
        expected_num_losses=losses, supports_masking=True)


# --- Keras's checks, against the built-in -----------------------------------------------------

@pytest.mark.parametrize("initializers", [("zeros", "zeros"), ("zeros", "ones"),
                                          ("ones", "zeros"), ("ones", "ones")],
                         ids=lambda p: f"mean-{p[0]}-var-{p[1]}")
@pytest.mark.parametrize("shape", [(5, 2, 3), (5, 3, 3, 2)], ids=["rank3", "rank4"])
@pytest.mark.parametrize("axis", [-1, 1], ids=["axis-1", "axis1"])
def test_keras_correctness_check(axis, shape, initializers):
    """Keras's test_correctness, every call compared with the built-in's: three training calls
    feeding the output back in (momentum 0), inference before and after, then inputs masked by
    a ``Masking`` layer (ignored in inference, flagged values only in training)."""
    theirs, ours = both(axis=axis, momentum=0.0, moving_mean_initializer=initializers[0],
                        moving_variance_initializer=initializers[1])
    x = np.random.default_rng(0).normal(5.0, 10.0, shape).astype(np.float32)
    out = x
    for _ in range(3):
        out = call_both(theirs, ours, out, training=True)
    inference = call_both(theirs, ours, x, training=False)
    training = call_both(theirs, ours, x, training=True)
    assert_differ(inference, training, modes_bound(ours, x),
                  "inference before training on x matches training")
    inference = call_both(theirs, ours, x, training=False)
    assert_close(np.asarray(ours(x, training=False)), np.asarray(ours(x, training=True)),
                 modes_bound(ours, x), "inference after training (momentum 0) vs training")
    x[:, 1, ...] = 0.0
    masked = keras.layers.Masking()(x)
    assert keras_mask(masked) is not None and not keras_mask(masked).all()
    unmasked_out = call_both(theirs, ours, x, training=False)
    call_both(theirs, ours, masked, training=False)
    np.testing.assert_array_equal(np.asarray(ours(masked)), np.asarray(ours(x)),
                                  err_msg="a mask changed inference")
    masked_out = call_both(theirs, ours, masked, training=True)
    assert_differ(masked_out, unmasked_out, modes_bound(ours, x), "masked training output")


def test_keras_trainable_check():
    """Keras's test_trainable_behavior: trainable=False freezes the weights and means
    inference even with training=True; trainable again, ten training calls (momentum 0.8)."""
    theirs, ours = both(axis=-1, momentum=0.8, epsilon=1e-7)
    build_both(theirs, ours, (1, 4, 4, 3))
    x = np.random.default_rng(1).normal(5.0, 10.0, (200, 4, 4, 3)).astype(np.float32)
    for layer in (theirs, ours):
        layer.trainable = False
    assert ([len(ours.weights), len(ours.trainable_weights), len(ours.non_trainable_weights)]
            == [len(theirs.weights), len(theirs.trainable_weights),
                len(theirs.non_trainable_weights)] == [4, 0, 4])
    call_both(theirs, ours, x, training=True)  # inference: nothing moves (checked exactly)
    for layer in (theirs, ours):
        layer.trainable = True
    assert [len(ours.trainable_weights), len(ours.non_trainable_weights)] == [2, 2]
    for _ in range(10):
        call_both(theirs, ours, x, training=True)


@pytest.mark.parametrize("mask_value", [0.0, 0.1, 1.0], ids=lambda v: f"mask_value={v}")
@pytest.mark.parametrize("run_eagerly", [True, False], ids=["eager", "compiled"])
def test_keras_masked_values_check(run_eagerly, mask_value):
    """Keras's test_bachnorm_ignore_masked_values -- Masking -> BatchNorm(momentum=0), fit --
    and the issue's observation: the moving statistics are those of the unmasked steps only,
    [1.5, 5.0] and [0.25, 0.0] (bnref's were [0.75, 2.5] before masks were supported)."""
    padded = np.array([[[1, 5], [2, 5], [mask_value, mask_value], [mask_value, mask_value]]
                       for _ in range(10)], dtype="float32")
    stats = {}
    for cls in (BUILTIN, btf.BatchNorm):
        inputs = keras.Input((None, 2))
        normed = cls(momentum=0.0)(keras.layers.Masking(mask_value=mask_value)(inputs))
        model = keras.Model(inputs, normed)
        model.compile("rmsprop", loss="mse", run_eagerly=run_eagerly)
        model.fit(padded, padded, batch_size=10, epochs=5, verbose=0)
        stats[cls] = weights_of(model.layers[2])
    values = flagged_values(padded, 2, (padded != mask_value).any(axis=-1))
    exact_mean, exact_var = batch_stats(values)
    np.testing.assert_array_equal(exact_mean, [1.5, 5.0])  # the data are what Keras's test says
    mean_tol, var_tol = running_bounds(values, np.zeros(2), np.ones(2), 1.0, "float32")
    for cls, weights in stats.items():
        assert_close(weights["moving_mean"], exact_mean, mean_tol, f"{cls.__module__} mean")
        assert_close(weights["moving_variance"], exact_var, var_tol, f"{cls.__module__} var")


def test_keras_masked_broadcast_check():
    """Keras's test_masked_broadcast_normalization: a (1, 2, 1) mask on (1, 2, 3, 4) inputs."""
    theirs, ours = both(axis=-1, momentum=0.0, epsilon=1e-3)
    y = call_both(theirs, ours, np.ones((1, 2, 3, 4), np.float32), training=True,
                  mask=np.ones((1, 2, 1), np.float32))
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    np.testing.assert_array_equal(ours.moving_mean.numpy(), 1.0)
    np.testing.assert_array_equal(ours.moving_variance.numpy(), 0.0)


@pytest.mark.parametrize("synchronized", [False, True], ids=["unsynchronized", "synchronized"])
def test_keras_fully_masked_check(synchronized):
    """Keras's test_input_fully_masked: nothing flagged gives statistics 0 and 0 (Keras's
    0 / (0 + 1e-7)), so y = x / sqrt(eps) = 0 here, and the moving statistics decay toward 0,
    as the built-in's do."""
    theirs, ours = both(scale=False, center=False, synchronized=synchronized)
    x, mask = np.zeros((4, 5), np.float32), np.zeros((4,), np.float32)
    for layer in (theirs, ours):
        y = layer(x, mask=mask, training=True)
        np.testing.assert_array_equal(np.asarray(y), 0.0)
    for name, value in weights_of(theirs).items():
        np.testing.assert_array_equal(weights_of(ours)[name], value, err_msg=name)
    np.testing.assert_array_equal(ours.moving_variance.numpy(), np.float32(0.99))


@pytest.mark.parametrize("mask_shape", [(4, 5, 1), (4,)], ids=["rank-equal", "rank-too-low"])
def test_mask_of_the_wrong_rank_is_refused_with_keras_message(mask_shape):
    x, mask = np.ones((4, 5, 3), np.float32), np.ones(mask_shape, bool)
    messages = []
    for layer in both():
        with pytest.raises(ValueError, match="one dimension less than the inputs") as error:
            layer(x, mask=mask, training=True)
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_mask_that_does_not_broadcast_is_refused():
    with pytest.raises(ValueError, match=r"mask must broadcast to the shape of x without its "
                                         r"last axis, \(4, 5\), got shape \(4, 3\)"):
        btf.BatchNorm()(np.ones((4, 5, 3), np.float32), mask=np.ones((4, 3), bool),
                        training=True)


def test_keras_divides_masked_sums_by_count_plus_1e7_bnref_by_the_count():
    """Known difference, pinned: Keras's masked moments divide by ``n + 1e-7``
    (``keras.backend.epsilon()``), a relative bias of 1e-7 / n, below float32's rounding for
    all but tiny n but far above float64's; bnref divides by n. In float64, bnref's moving
    mean is the exact masked mean and the built-in's is n / (n + 1e-7) times it."""
    x = np.random.default_rng(2).normal(3.0, 1.0, (2, 3, 2))
    mask = np.array([[True, False, False], [True, True, False]])
    values = flagged_values(x, 2, mask)
    n, (exact_mean, _) = len(values[0]), batch_stats(values)
    mean_tol, _ = running_bounds(values, np.zeros(2), np.ones(2), 1.0, "float64")
    theirs, ours = both(momentum=0.0, dtype="float64")
    for layer in (theirs, ours):
        layer(x, mask=mask, training=True)
    assert_close(ours.moving_mean.numpy(), exact_mean, mean_tol, "bnref: the masked mean")
    assert_close(theirs.moving_mean.numpy(), exact_mean * n / (n + 1e-7), mean_tol,
                 "Keras: n / (n + 1e-7) times it")
    assert_differ(theirs.moving_mean.numpy(), exact_mean, mean_tol, "Keras's bias")


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum-0.1", "cumulative"])
def test_masked_statistics_follow_the_convention(momentum):
    """Masks under another convention: torch's feeds the running variance the *unbiased*
    variance of the flagged values (n = their count), and ``momentum=None`` averages the
    batches (weight 1/k). Three calls, each against that rule in float64 from ours' state."""
    layer = btf.BatchNorm(momentum=momentum, convention="torch", axis=-1, dtype="float64")
    layer.build((4, 5, 3))
    rng = np.random.default_rng(9)
    for step in range(1, 4):
        x = rng.normal(step, 2.0, (4, 5, 3))
        mask = rng.random((4, 5)) < 0.5
        mask[0, :2] = True  # at least two flagged values per channel
        old_mean, old_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
        layer(x, mask=mask, training=True)
        flagged = x.reshape(-1, 3)[mask.ravel()]
        weight = 0.1 if momentum is not None else 1.0 / step
        expected_mean = (1 - weight) * old_mean + weight * flagged.mean(axis=0)
        expected_var = (1 - weight) * old_var + weight * flagged.var(axis=0, ddof=1)
        mean_tol, var_tol = running_stat_tolerances(flagged, 1, old_mean=old_mean,
                                                    old_var=old_var, new_value_weight=weight,
                                                    stat_dtype="float64")
        assert_close(layer.moving_mean.numpy(), expected_mean, mean_tol, f"{step}: mean")
        assert_close(layer.moving_variance.numpy(), expected_var, var_tol, f"{step}: var")


# --- masks through a model --------------------------------------------------------------------

def masked_lstm(norm: type[keras.layers.Layer]) -> keras.Model:
    inputs = keras.Input((None, 2))
    normed = norm(momentum=0.5)(keras.layers.Masking(mask_value=0.0)(inputs))
    return keras.Model(inputs, keras.layers.LSTM(4)(normed))


def padded_sequences(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(2.0, 3.0, (10, 6, 2)).astype(np.float32)
    x[:, 4:] = 0.0  # padding: the last two steps of every sequence
    x[:3, 2:] = 0.0  # and more of the first three
    return x


def assert_lstm_outputs_match(theirs: keras.Model, ours: keras.Model, x: np.ndarray) -> None:
    """Inference outputs within the built-in model's own rounding spread: the built-in again,
    XLA-compiled (other kernels, other summation orders)."""
    expected = np.asarray(theirs(x, training=False))
    jit = tf.function(lambda v: theirs(v, training=False), jit_compile=True)
    spread = rounding_spread({"lstm": expected}, {"lstm": np.asarray(jit(x))})
    got = np.asarray(ours(x, training=False))
    assert_close(got, expected, model_tolerance(expected, spread, "float32"), "LSTM outputs")


def test_masking_batch_norm_lstm_matches_keras():
    """The issue's model, Masking -> BatchNorm -> LSTM: after a training call the moving
    statistics are the flagged steps' (compared with the built-in's), and the LSTM, which sees
    the mask BatchNorm passes on, gives the built-in's outputs in inference. Without mask
    support both would be off by O(1)."""
    x = padded_sequences(3)
    theirs, ours = masked_lstm(BUILTIN), masked_lstm(btf.BatchNorm)
    ours.set_weights(theirs.get_weights())
    assert type(ours.layers[2]) is btf.BatchNorm and ours.layers[2].supports_masking
    mask = (x != 0).any(axis=-1)
    call_both(theirs.layers[2], ours.layers[2], keras.layers.Masking()(x), training=True)
    theirs(x, training=True)
    ours(x, training=True)
    for layer in (ours.layers[2], theirs.layers[2]):
        assert not np.allclose(layer.moving_mean.numpy(), 0.0)
    np.testing.assert_array_equal(keras_mask(ours.layers[2](keras.layers.Masking()(x))), mask)
    assert_lstm_outputs_match(theirs, ours, x)


# --- the built-in's config --------------------------------------------------------------------

CONFIGS = {
    "defaults": {},
    "options": {"axis": 1, "momentum": 0.9, "epsilon": 1e-5, "center": False,
                "gamma_initializer": "he_normal", "gamma_regularizer": "l2",
                "beta_constraint": "non_neg", "moving_variance_initializer": "ones"},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
               "renorm_momentum": 0.95},
    "synchronized": {"synchronized": True},
}


@pytest.mark.parametrize("kwargs", list(CONFIGS.values()), ids=list(CONFIGS))
def test_builtin_config_makes_the_layer(kwargs):
    """``BatchNorm.from_config(BatchNormalization(...).get_config())``: every key of the
    built-in's config is read and given back unchanged, and the layer computes as the
    built-in."""
    theirs = BUILTIN(**kwargs)
    config = theirs.get_config()
    ours = btf.BatchNorm.from_config(config)
    ours_config = ours.get_config()
    assert {key: ours_config[key] for key in config} == config
    assert btf.BatchNorm.from_config(ours_config).get_config() == ours_config
    x = np.random.default_rng(4).normal(1.0, 2.0, (8, 3, 2)).astype(np.float32)
    if not theirs.renorm:
        call_both(theirs, ours, x, training=True)
        call_both(theirs, ours, x, training=False)


def swap_batch_norm(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A ``clone_model`` clone_function: every built-in batch norm becomes bnref's."""
    cls = btf.BatchNorm if type(layer) is BUILTIN else type(layer)
    return cls.from_config(layer.get_config())


def test_clone_model_swaps_batch_norm_in_a_masked_model():
    """``keras.models.clone_model`` with a clone_function (Keras calls the layer with
    ``mask=``): the clone has bnref's layer under the same name, takes the built-in model's
    weights and computes as it does."""
    x = padded_sequences(5)
    theirs = masked_lstm(BUILTIN)
    ours = keras.models.clone_model(theirs, clone_function=swap_batch_norm)
    assert [type(layer) for layer in ours.layers] == [
        btf.BatchNorm if type(layer) is BUILTIN else type(layer) for layer in theirs.layers]
    # (clone_model renames the input layer, whatever the clone_function)
    assert [layer.name for layer in ours.layers[1:]] == [layer.name for layer in theirs.layers[1:]]
    ours.set_weights(theirs.get_weights())
    call_both(theirs.layers[2], ours.layers[2], keras.layers.Masking()(x), training=True)
    theirs(x, training=True)
    ours(x, training=True)
    assert_lstm_outputs_match(theirs, ours, x)


# --- batch renormalization --------------------------------------------------------------------

def renorm_bounds(x: np.ndarray, dy: np.ndarray, state: dict[str, np.ndarray], *, eps: float,
                  momentum: float, renorm_momentum: float, clipping: dict[str, float],
                  dtype: str) -> dict[str, np.ndarray]:
    """Bounds on one implementation's error in one renorm training step (channels last).

    Renorm is batch norm with scale ``r * gamma`` and offset ``d * gamma + beta``, ``r``, ``d``
    constants to the gradient, so the batch-norm bounds apply with those; the rest is
    first-order propagation. ``d`` carries the mean's error over ``renorm_stddev``, which is
    what the forward bound charges a scale of ``gamma * s / renorm_stddev`` (r unclipped), so
    the output bound takes the larger of the two scales. ``dgamma = r sum(dy xhat) + d sum(dy)``
    adds r's relative error (the variance's, halved) and d's. The standard deviations move
    toward ``s = sqrt(var + eps)``, off by ``dvar / 2s`` and one rounding;
    ``moving_variance = stddev² - eps`` by ``2 stddev dstddev`` and one rounding.
    """
    axis = x.ndim - 1
    stats = ChannelStats.of(x, axis)
    u, v = UNIT_ROUNDOFF[compute_dtype_name(dtype)], UNIT_ROUNDOFF[dtype]
    s = np.sqrt(stats.var + eps)
    gamma = state.get("gamma", np.ones_like(s))
    beta = state.get("beta", np.zeros_like(s))
    renorm_stddev = np.maximum(state["renorm_stddev"], np.sqrt(eps))
    r_free = s / renorm_stddev
    r = np.clip(r_free, clipping.get("rmin", -np.inf), clipping.get("rmax", np.inf))
    d = np.clip((stats.mean - state["renorm_mean"]) / renorm_stddev,
                -clipping.get("dmax", np.inf), clipping.get("dmax", np.inf))
    bounds = {"y": forward_tolerance(x, axis, gamma=gamma * np.maximum(r, r_free),
                                     beta=d * gamma + beta, eps=eps, mean=stats.mean,
                                     var=stats.var, batch_stats=True)}
    dx, dgamma, dbeta = gradient_tolerances(x, dy, axis, gamma=gamma * r, eps=eps,
                                            param_dtype=dtype)
    x64, dy64 = x.astype(np.float64).reshape(-1, x.shape[-1]), dy.reshape(-1, x.shape[-1])
    sum_dy_xhat = np.abs((dy64 * (x64 - stats.mean) / s).sum(axis=0))
    growth_error = u * np.sqrt(stats.count)  # tolerances' u g(n)
    d_error = SAFETY * growth_error * stats.max_abs / renorm_stddev
    r_error = SAFETY * r * growth_error * (1 + stats.max_abs / s)
    bounds.update(dx=dx, dbeta=dbeta,
                  dgamma=r * dgamma + (np.abs(d) + d_error) * dbeta + r_error * sum_dy_xhat)
    _, batch_var_error = running_stat_tolerances(x, axis, old_mean=np.zeros_like(s),
                                                 old_var=np.zeros_like(s), new_value_weight=1.0,
                                                 stat_dtype=dtype)
    s_error = batch_var_error / (2 * s) + SAFETY * v * s
    for name, old, m in (("renorm_mean", state["renorm_mean"], renorm_momentum),
                         ("moving_mean", state["moving_mean"], momentum)):
        bounds[name] = running_stat_tolerances(x, axis, old_mean=old, old_var=np.ones_like(s),
                                               new_value_weight=1 - m, stat_dtype=dtype)[0]
    for name, m in (("renorm_stddev", renorm_momentum), ("moving_stddev", momentum)):
        bounds[name] = (1 - m) * s_error + SAFETY * v * (np.abs(state[name]) + 2 * s)
    new_stddev = momentum * state["moving_stddev"] + (1 - momentum) * s
    bounds["moving_variance"] = (2 * new_stddev * bounds["moving_stddev"]
                                 + SAFETY * v * (new_stddev**2 + eps))
    return bounds


def gradients(layer: keras.layers.Layer, x: np.ndarray, dy: np.ndarray) -> dict[str, np.ndarray]:
    x_t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        y = layer(x_t, training=True)
    weights = layer.trainable_weights
    grads = tape.gradient(y, [x_t, *weights], output_gradients=tf.constant(dy, y.dtype))
    return {"y": y.numpy(), "dx": grads[0].numpy(),
            **{f"d{w.name}": g.numpy() for w, g in zip(weights, grads[1:], strict=True)}}


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("clipping", [None, {"rmax": 1.5, "rmin": 0.7, "dmax": 0.4}],
                         ids=["unclipped", "clipped"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_renorm_matches_keras_over_training_steps(dtype, clipping, affine):
    """Five training steps of batch renormalization from Keras's test_renorm_correctness
    starting state, on batches whose distribution drifts (so r and d move, and clip):
    each step's output, dx, dgamma, dbeta and all five statistics against the built-in's
    from the same state; SGD moves gamma and beta between steps."""
    kwargs = {"axis": -1, "epsilon": 1e-3, "momentum": 0.9, "renorm": True,
              "renorm_momentum": 0.8, "renorm_clipping": clipping, "center": affine,
              "scale": affine, "dtype": dtype}
    theirs, ours = both(**kwargs)
    build_both(theirs, ours, (None, 4, 3))
    rng = np.random.default_rng(1337)
    start = {"moving_mean": rng.normal(0.0, 1.0, 3),
             "moving_variance": np.abs(rng.normal(1.0, 0.5, 3)),
             "renorm_mean": rng.normal(0.0, 1.0, 3),
             "renorm_stddev": np.abs(rng.normal(1.0, 0.5, 3)),
             "gamma": rng.normal(1.0, 0.1, 3), "beta": rng.normal(0.0, 0.1, 3)}
    start["moving_stddev"] = np.sqrt(start["moving_variance"])
    for weight in theirs.weights:
        weight.assign(start[weight.name])
    clipped = False
    for step in range(5):
        x = rng.normal(step - 2.0, 1.0 + step, (6, 4, 3)).astype(dtype)
        dy = rng.normal(size=x.shape)
        ours.set_weights(theirs.get_weights())
        state = {name: value.astype(np.float64) for name, value in weights_of(theirs).items()}
        got, want = gradients(ours, x, dy), gradients(theirs, x, dy)
        bounds = renorm_bounds(x, dy, state, eps=1e-3, momentum=0.9, renorm_momentum=0.8,
                               clipping=clipping or {}, dtype=dtype)
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert_close(got[name], value, 2 * bounds[name], f"step {step}: {name}")
        after_ours, after_theirs = weights_of(ours), weights_of(theirs)
        for name in ("moving_mean", "moving_variance", *RENORM_WEIGHTS):
            assert_close(after_ours[name], after_theirs[name], 2 * bounds[name],
                         f"step {step}: {name}")
        stats = ChannelStats.of(x, 2)
        r_free = (np.sqrt(stats.var + 1e-3)
                  / np.maximum(state["renorm_stddev"], np.sqrt(1e-3)))
        clipped |= bool(np.any((r_free > 1.5) | (r_free < 0.7)))
        for weight in theirs.trainable_weights:
            weight.assign(weight.numpy() - 0.1 * want[f"d{weight.name}"])
    assert clipped, "no step exercised the clipping bounds"


def test_renorm_inference_is_plain_inference():
    """Keras's test_renorm_inference: renorm changes training only."""
    plain, renorm = btf.BatchNorm(), btf.BatchNorm(renorm=True)
    build_both(plain, renorm, (None, 10))
    rng = np.random.default_rng(6)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        value = rng.normal(size=10) ** 2 if name == "moving_variance" else rng.normal(size=10)
        getattr(plain, name).assign(value)
        getattr(renorm, name).assign(value)
    x = rng.normal(size=(4, 10)).astype(np.float32)
    np.testing.assert_array_equal(renorm(x, training=False).numpy(),
                                  plain(x, training=False).numpy())
    theirs = BUILTIN(renorm=True)
    call_both(theirs, renorm, x, training=False)


def test_renorm_stddev_weights_start_at_sqrt_of_the_variance_initializer():
    """Keras's test_renorm_stddev_initializer."""
    theirs, ours = both(renorm=True,
                        moving_variance_initializer=keras.initializers.Constant(4.0))
    build_both(theirs, ours, (None, 5))
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    for name, value in weights_of(theirs).items():
        np.testing.assert_array_equal(weights_of(ours)[name], value, err_msg=name)
    np.testing.assert_array_equal(ours.moving_stddev.numpy(), 2.0)
    np.testing.assert_array_equal(ours.renorm_stddev.numpy(), 2.0)


@pytest.mark.parametrize("clipping, message", [
    ({"random_key": 1.0}, r"Received invalid keys for `renorm_clipping` argument: "
                          r"\{'random_key': 1.0\}. Supported values: \['rmax', 'rmin', 'dmax'\]"),
    ({"rmax": 0.0, "rmin": 1.0}, "rmax should be greater than rmin in the `renorm_clipping` "
                                 "argument. Received: rmax=0.0, rmin=1.0."),
    ({"rmax": 1.0, "dmax": -1.0}, "dmax should be non-negative in the `renorm_clipping` "
                                  "argument. Received: dmax=-1.0."),
], ids=["invalid-key", "rmax-below-rmin", "negative-dmax"])
def test_renorm_clipping_errors_use_keras_wording(clipping, message):
    """Keras's test_renorm_invalid_clipping_keys; its messages, with the values filled in
    (Keras's own rmax/dmax messages print the placeholders: they are not f-strings)."""
    with pytest.raises(ValueError, match=message.split(".")[0]):
        BUILTIN(renorm=True, renorm_clipping=clipping)
    with pytest.raises(ValueError, match=message):
        btf.BatchNorm(renorm=True, renorm_clipping=clipping)


@pytest.mark.parametrize("kwargs, message", [
    ({"renorm": True, "momentum": None}, "renorm=True needs moving statistics with a fixed "
                                         "momentum, got momentum=None"),
    ({"renorm": True, "track_running_stats": False}, "track_running_stats=False"),
    ({"renorm_momentum": 1.5}, r"renorm_momentum must be in \[0, 1\], got 1.5"),
    ({"synchronized": "yes"}, "synchronized must be a bool, got 'yes'"),
], ids=["renorm-cumulative", "renorm-no-running-stats", "renorm-momentum", "synchronized-str"])
def test_refused_combinations(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        btf.BatchNorm(**kwargs)


def test_momentum_errors_where_keras_has_none():
    """Keras's constructor only runs ``float(momentum)``: it takes 1.5 or -1 silently, so there
    is no Keras wording to follow; bnref refuses them with its own."""
    BUILTIN(momentum=1.5)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        btf.BatchNorm(momentum=1.5)


# --- synchronized=True under tf.distribute ----------------------------------------------------

SYNCHRONIZED_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf

    # Two logical CPUs; this must run before TensorFlow initializes its devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import bnref.tf as btf

    results = {}
    x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4)).astype(np.float32)

    def attempt(key, run):
        try:
            run()
            results[key] = "ok"
        except Exception as error:
            results[key] = type(error).__name__ + ": " + str(error)

    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with two.scope():
        layer = btf.BatchNorm(synchronized=True)
        layer.build(x.shape)
        unsynchronized = btf.BatchNorm()
        unsynchronized.build(x.shape)
    shards = next(iter(two.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(8))))
    attempt("two_training", lambda: two.run(lambda b: layer(b, training=True), args=(shards,)))
    results["two_moving_mean_moved"] = bool(np.all(layer.moving_mean.numpy() != 0))
    attempt("two_inference", lambda: two.run(lambda b: layer(b, training=False),
                                             args=(shards,)))
    attempt("two_unsynchronized", lambda: two.run(lambda b: unsynchronized(b, training=True),
                                                  args=(shards,)))
    with two.scope():
        model = keras.Sequential([keras.Input((4,)), btf.BatchNorm(synchronized=True)])
        model.compile("sgd", "mse")
    attempt("two_fit", lambda: model.fit(x, x, batch_size=8, epochs=1, verbose=0))

    one = tf.distribute.MirroredStrategy(["/cpu:0"])
    with one.scope():
        pair = [btf.BatchNorm(synchronized=True), btf.BatchNorm()]
    outputs = [one.run(lambda b, l=l: l(b, training=True), args=(x,)) for l in pair]
    results["one_replica_equal"] = bool(
        np.array_equal(outputs[0].numpy(), outputs[1].numpy())
        and all(np.array_equal(a, b) for a, b in zip(pair[0].get_weights(),
                                                     pair[1].get_weights())))
    plain = [btf.BatchNorm(synchronized=True), btf.BatchNorm()]
    outputs = [l(x, training=True).numpy() for l in plain]
    results["no_strategy_equal"] = bool(
        np.array_equal(outputs[0], outputs[1])
        and all(np.array_equal(a, b) for a, b in zip(plain[0].get_weights(),
                                                     plain[1].get_weights())))
    print("RESULTS " + json.dumps(results))
""")


@pytest.fixture(scope="module")
def synchronized_results() -> dict[str, object]:
    """The script above in a fresh process (logical devices are fixed once TF starts)."""
    done = subprocess.run([sys.executable, "-c", SYNCHRONIZED_SCRIPT], capture_output=True,
                          text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULTS "))


SYNCHRONIZED_CASES = {
    "two_training": "ok", "two_fit": "ok", "two_moving_mean_moved": True,
    "two_inference": "ok", "two_unsynchronized": "ok", "one_replica_equal": True,
    "no_strategy_equal": True,
}


@pytest.mark.parametrize("key, expected", list(SYNCHRONIZED_CASES.items()),
                         ids=list(SYNCHRONIZED_CASES))
def test_synchronized_under_tf_distribute(synchronized_results, key, expected):
    """synchronized=True: with two replicas (MirroredStrategy over two logical CPUs) a training
    call runs, in strategy.run and in fit, and moves the moving statistics; inference and
    unsynchronized layers run. With one replica, or no strategy, it is exactly the
    unsynchronized layer. (Its numbers against the full batch: tests/test_tf_sync.py.)"""
    assert synchronized_results[key] == expected


# --- weight files -----------------------------------------------------------------------------

def small_model(norm: type[keras.layers.Layer]) -> keras.Model:
    """Default layer names; three batch norms: plain, no scale on axis 1, renorm."""
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = keras.layers.ReLU()(norm()(h))
    h = norm(axis=1, scale=False)(h)
    h = keras.layers.Conv2D(3, 1)(h)
    h = norm(renorm=True)(h)
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h)))


def randomized(model: keras.Model, seed: int) -> keras.Model:
    rng = np.random.default_rng(seed)
    model.set_weights([(rng.uniform(0.5, 2.0, w.shape) if "var" in w.name or "stddev" in w.name
                        else rng.normal(0.0, 1.0, w.shape)).astype(w.dtype)
                       for w in model.weights])
    return model


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
@pytest.mark.parametrize("source, target", [(BUILTIN, btf.BatchNorm), (btf.BatchNorm, BUILTIN)],
                         ids=["keras-to-bnref", "bnref-to-keras"])
def test_weight_files_interchange(source, target, suffix, tmp_path):
    """save_weights / save from one, load_weights into the same architecture built with the
    other: no renaming, no custom objects (the layer paths in the files come from the class
    name, which is the built-in's)."""
    saved = randomized(small_model(source), 7)
    path = tmp_path / f"model{suffix}"
    if suffix == ".keras":
        saved.save(path)
    else:
        saved.save_weights(path)
    loaded = small_model(target)
    loaded.load_weights(path)
    assert sum(type(layer) is target for layer in loaded.layers) == 3
    assert [w.name for w in loaded.weights] == [w.name for w in saved.weights]
    for a, b, w in zip(loaded.get_weights(), saved.get_weights(), saved.weights, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=w.path)


def test_builtin_keras_file_becomes_bnref_through_clone_model(tmp_path):
    """A built-in model's ``.keras`` file, loaded and cloned with bnref's layer in place of the
    built-in's: the built-in's config is bnref's too. (``custom_objects`` cannot do it: Keras
    3.15 resolves its own classes before looking at custom objects.)"""
    saved = randomized(small_model(BUILTIN), 8)
    saved.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras",
                                     custom_objects={"BatchNormalization": btf.BatchNorm})
    assert sum(type(layer) is BUILTIN for layer in loaded.layers) == 3
    ours = keras.models.clone_model(loaded, clone_function=swap_batch_norm)
    ours.set_weights(loaded.get_weights())
    assert sum(type(layer) is btf.BatchNorm for layer in ours.layers) == 3
    assert ours.layers[-3].renorm and ours.layers[-3].get_config()["renorm_momentum"] == 0.99
    for a, b in zip(ours.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_default_names_are_the_builtins():
    names = [BUILTIN().name, btf.BatchNorm().name, btf.BatchNormalization().name]
    assert all(name.startswith("batch_normalization") for name in names)
    assert len(set(names)) == 3  # one counter: no clash with the built-in's names
    assert btf.BatchNorm is btf.BatchNormalization
