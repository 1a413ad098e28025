"""``bnref.tf.BatchNorm`` as a drop-in inside a real Keras model:
``keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)`` in
float64, its 52 batch norms swapped by ``keras.models.clone_model`` (nothing but a
clone_function), the built-in model's weights copied in with ``set_weights``, two ``fit`` steps
of SGD on the same batches, and ``.weights.h5`` files moved between the two models both ways.

The tolerance. ``bnref.testing.tolerances`` bounds one batch-norm call; nothing there bounds a
whole network after optimizer steps, where each layer's rounding is amplified by every later
layer and step. So each array may be ``SAFETY`` times the *built-in's own* rounding spread on
that array away (``tolerances.rounding_spread`` and ``model_tolerance``, per array): the
built-in model trained a second time with the samples of each batch in another order (the same
batches, the same mathematics; every batch statistic, loss mean and weight gradient summed in
another, equally correct order). Per array, not one level for the whole model: MobileNetV2's
linear bottlenecks make some arrays mathematically zero -- a projection BN's beta feeds a
linear 1x1 convolution and then a BN, which removes any shift, so its gradient is 0; that BN's
moving mean is then 0 too -- and those hold pure rounding noise (~1e-17), whose spread relative
to their own size is O(1): one model-wide level would hand that to every other array.

The models train with ``run_eagerly=True``: on two CPU cores a compiled train step of
MobileNetV2 in float64 takes ~20-35 s to trace (``jit_compile=False``) and ~90-110 s to
XLA-compile, per model, against ~5-10 s for the two eager steps. bnref's layer in compiled
``fit`` is covered by ``tests/test_tf.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import assert_close, model_tolerance, rounding_spread

backend_or_skip("tf")  # skips this module without TensorFlow, fails it when tf is required
import keras  # noqa: E402

import bnref.tf as btf  # noqa: E402

BUILTIN = keras.layers.BatchNormalization
BATCH, STEPS, CLASSES = 8, 2, 10


@pytest.fixture(scope="module")
def float64():
    """Keras's float type and global dtype policy set to float64 for the module, and restored
    after it. Both: the policy is fixed (from floatx) the first time any layer asks for it, so
    after other tests floatx alone no longer reaches new layers."""
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)
        keras.config.set_floatx(previous_floatx)


def swap_batch_norm(layer: keras.layers.Layer) -> keras.layers.Layer:
    """The clone_function: every built-in batch norm becomes bnref's, from its config."""
    cls = btf.BatchNorm if type(layer) is BUILTIN else type(layer)
    return cls.from_config(layer.get_config())


def clone(model: keras.Model, swap: bool) -> keras.Model:
    """The same architecture (bnref's batch norms if ``swap``) with ``model``'s weights."""
    copy = keras.models.clone_model(model, clone_function=swap_batch_norm if swap else None)
    copy.set_weights(model.get_weights())
    return copy


def count(model: keras.Model, cls: type) -> int:
    return sum(type(layer) is cls for layer in model.layers)


class StepLosses(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def train(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Two SGD steps with fit; the losses Keras reports after each, and every weight."""
    model.compile(keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
                  "sparse_categorical_crossentropy", run_eagerly=True)
    losses = StepLosses()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[losses])
    assert len(losses.losses) == STEPS
    return {"losses": np.array(losses.losses),
            **{f"{i}:{w.name}": np.asarray(w.numpy(), np.float64)
               for i, w in enumerate(model.weights)}}


def reordered_within_batches(*arrays: np.ndarray) -> list[np.ndarray]:
    """The same batches of ``BATCH`` samples, each batch's samples in reverse order."""
    order = np.arange(BATCH * STEPS).reshape(STEPS, BATCH)[:, ::-1].ravel()
    return [a[order] for a in arrays]


@pytest.fixture(scope="module")
def models(float64):
    keras.utils.set_random_seed(0)
    builtin = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3),
                                             classes=CLASSES)
    assert builtin.dtype == "float64"
    return builtin, clone(builtin, swap=True), clone(builtin, swap=False)


def test_swapped_model_holds_only_bnref_batch_norms(models):
    builtin, ours, _ = models
    assert count(builtin, BUILTIN) == count(ours, btf.BatchNorm) == 52
    assert count(ours, BUILTIN) == 0
    assert all(layer.dtype == "float64" for layer in ours.layers if type(layer) is btf.BatchNorm)
    for a, b in zip(ours.get_weights(), builtin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_trains_like_the_builtin_in_float64(models, tmp_path):
    """Two fit steps from the same weights on the same batches: losses and every weight (moving
    statistics included) within SAFETY times the built-in's own rounding spread on it. Then
    .weights.h5 files of the trained models load into the other architecture unchanged."""
    builtin, ours, reference = models
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (BATCH * STEPS, 32, 32, 3))
    y = rng.integers(0, CLASSES, BATCH * STEPS)
    expected = train(builtin, x, y)
    reference = train(reference, *reordered_within_batches(x, y))
    got = train(ours, x, y)
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        spread = rounding_spread({key: want}, {key: reference[key]})
        assert_close(got[key], want, model_tolerance(want, spread, "float64"), key)

    for source, target in ((ours, clone(builtin, swap=False)), (builtin, clone(ours, swap=True))):
        path = tmp_path / f"{source.name}.weights.h5"
        source.save_weights(path)
        target.set_weights([np.zeros_like(w) for w in target.get_weights()])
        target.load_weights(path)
        assert count(target, BUILTIN if source is ours else btf.BatchNorm) == 52
        for a, b in zip(target.get_weights(), source.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
