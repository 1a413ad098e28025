"""bnref.convert: a trained layer moves between frameworks with identical inference outputs;
what cannot carry over (the unbiased running variance, Equinox's and Haiku's step-count rules)
is said, and measured here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bnref.conventions import get_convention
from bnref.convert import BNState, convert, debiased_count, load, notes_for, read, save, write
from bnref.testing.backends import required_backends
from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import SAFETY, UNIT_ROUNDOFF, ChannelStats, assert_close

BUILTINS = ("torch", "keras", "flax", "gluon", "onnx")
OWN = {"bnref.numpy": "torch", "bnref.torch": "torch", "bnref.jax": "flax",
       "bnref.tf": "keras", "bnref.mxnet": "gluon"}
LIBRARIES = ("equinox", "equinox_batch", "haiku")  # JAX libraries, test dependencies
NEEDS = {"torch": "torch", "bnref.torch": "torch", "keras": "tf", "bnref.tf": "tf",
         "flax": "jax", "bnref.jax": "jax", "gluon": "mxnet", "bnref.mxnet": "mxnet",
         "onnx": "numpy", "bnref.numpy": "numpy", "equinox": "jax", "equinox_batch": "jax",
         "haiku": "jax"}
PAIRS = [(a, b) for a in BUILTINS for b in BUILTINS if a != b] + [
    pair for own, builtin in OWN.items() for pair in ((own, builtin), (builtin, own))] + [
    pair for library in LIBRARIES for other in (*BUILTINS, "bnref.numpy", *LIBRARIES)
    if other != library for pair in ((library, other), (other, library))
    if other not in LIBRARIES or pair[0] == library]


def needs(kind: str) -> None:
    """Skip (or fail, when required) without ``kind``'s framework; Equinox and Haiku come with
    jax in the test extra."""
    backend_or_skip(NEEDS[kind])
    if kind in LIBRARIES:
        module = "haiku" if kind == "haiku" else "equinox"
        if "jax" in required_backends():
            __import__(module)
        else:
            pytest.importorskip(module)


def equinox_apply(layer, x: np.ndarray, training: bool):
    """An ``(eqx.nn.BatchNorm, State)`` pair over a channels-first batch."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    module, state = layer
    module = module if training else eqx.nn.inference_mode(module)
    y, state = jax.vmap(module, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        jnp.asarray(x), state)
    return np.asarray(y), (layer[0], state)


def haiku_apply(layer, x_last: np.ndarray, training: bool):
    """A ``(kwargs, params, state)`` haiku triple over a channels-last batch."""
    import haiku as hk
    import jax.numpy as jnp

    options, params, state = layer
    forward = hk.transform_with_state(lambda v: hk.BatchNorm(**options)(v, training))
    y, state = forward.apply(params, state, None, jnp.asarray(x_last))
    return np.asarray(y), (options, params, state)


def random_state(convention: str, seed: int = 0) -> BNState:
    rng = np.random.default_rng(seed)
    vector = lambda low, high: rng.uniform(low, high, 3).astype(np.float32)  # noqa: E731
    return BNState(vector(0.5, 2), vector(-1, 1), vector(-2, 2), vector(0.5, 3), 1e-3, 0.1,
                   convention, 4)


def infer(kind: str, layer, x: np.ndarray) -> np.ndarray:
    """Inference on channels-first ``x`` in ``kind``'s own layout, back to channels first."""
    last = np.moveaxis(x, 1, -1)
    if kind in ("torch", "bnref.torch"):
        import torch

        layer.eval()
        with torch.no_grad():
            return layer(torch.from_numpy(x)).numpy()
    if kind in ("keras", "bnref.tf"):
        return np.moveaxis(np.asarray(layer(last, training=False)), -1, 1)
    if kind == "flax":
        module, variables = layer
        return np.moveaxis(np.asarray(module.apply(variables, last, use_running_average=True)),
                           -1, 1)
    if kind == "bnref.jax":
        import jax.numpy as jnp

        module, variables = layer
        y = module.apply(variables, jnp.asarray(last), training=False)[0]
        return np.moveaxis(np.asarray(y), -1, 1)
    if kind in ("gluon", "bnref.mxnet"):
        from mxnet import nd

        return layer(nd.array(x)).asnumpy()
    if kind in ("equinox", "equinox_batch"):
        return equinox_apply(layer, x, training=False)[0]
    if kind == "haiku":
        return np.moveaxis(haiku_apply(layer, last, training=False)[0], -1, 1)
    if kind == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(layer.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        return session.run(None, {"X": x})[0]
    return layer(x, training=False)


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_converted_layer_gives_the_same_inference(source, target):
    for kind in (source, target):
        needs(kind)
    from bnref.convert import _CONVENTION

    original = random_state(_CONVENTION[source])
    layer = write(original, source)
    state = read(layer)
    for name in ("gamma", "beta", "running_mean", "running_var"):
        if source == "equinox_batch" and name.startswith("running"):
            # Stored as running * (1 - d^k) and read back divided: two float32 roundings.
            value = getattr(original, name)
            assert_close(getattr(state, name), value,
                         2 * UNIT_ROUNDOFF["float32"] * np.abs(value), name)
            continue
        np.testing.assert_array_equal(getattr(state, name), getattr(original, name), name)
    assert state.eps == pytest.approx(original.eps, rel=1e-7)
    assert state.new_value_weight == pytest.approx(original.new_value_weight, rel=1e-6)
    converted, notes = convert(layer, target)
    x = np.random.default_rng(1).normal(0.5, 2, (6, 3, 4, 5)).astype(np.float32)
    assert_close(infer(target, converted, x), infer(source, layer, x), 2e-6, f"{notes}")
    assert read(converted).new_value_weight == pytest.approx(original.new_value_weight,
                                                             rel=1e-6)


def test_torch_to_keras_next_step_differs_by_the_unbiased_correction():
    """The note's promise, measured: after one training step on n values per channel the
    running variances differ by w * var_B / (n - 1)."""
    backend_or_skip("torch")
    backend_or_skip("tf")
    import torch

    source = write(random_state("torch"), "torch")
    (target, notes) = convert(source, "keras")
    assert any("unbiased" in note for note in notes)
    x = np.random.default_rng(2).normal(1, 2, (4, 3, 2, 2)).astype(np.float32)
    n = x.size // 3
    source.train()
    with torch.no_grad():
        source(torch.from_numpy(x))
    target(np.moveaxis(x, 1, -1), training=True)
    var_b = x.astype(np.float64).var(axis=(0, 2, 3))
    difference = source.running_var.numpy() - np.asarray(target.moving_variance.value)
    assert_close(difference, 0.1 * var_b / (n - 1), 1e-5, "unbiased minus biased")


def test_cumulative_average_becomes_the_next_steps_weight():
    state = BNState(None, None, np.zeros(3), np.ones(3), 1e-5, None, "torch", 4)
    assert any("1/5" in note for note in notes_for(state, "keras"))
    backend_or_skip("tf")
    assert write(state, "keras").momentum == pytest.approx(1 - 1 / 5)


def test_state_files_are_read_without_pickle(tmp_path):
    state = random_state("keras")
    save(state, tmp_path / "bn.npz")
    again = load(tmp_path / "bn.npz")
    for name in ("gamma", "beta", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(again, name), getattr(state, name))
    assert (again.eps, again.new_value_weight, again.convention, again.num_batches_tracked) == (
        state.eps, state.new_value_weight, state.convention, state.num_batches_tracked)
    with np.load(tmp_path / "bn.npz", allow_pickle=False) as data:
        assert all(data[key].dtype != object for key in data.files)


# -- Equinox and Haiku: the step-count rules ------------------------------------------------
def one_step_expected(state: BNState, x_last: np.ndarray, weight: float):
    """The plain moving average's next statistics (biased variance), in float64."""
    stats = ChannelStats.of(x_last, x_last.ndim - 1)
    mean64 = state.running_mean.astype(np.float64)
    var64 = state.running_var.astype(np.float64)
    return ((1 - weight) * mean64 + weight * stats.mean,
            (1 - weight) * var64 + weight * stats.var)


def stat_tolerance(expected: np.ndarray, steps: int = 4) -> np.ndarray:
    """A float32 statistic after a few roundings (the blend's products and sum, the stored
    average's scaling): ``steps`` roundings of the largest term."""
    return SAFETY * steps * UNIT_ROUNDOFF["float32"] * (np.abs(expected) + 1)


@pytest.mark.parametrize("target", ["haiku", "equinox_batch"])
def test_a_debiased_target_continues_the_plain_average(target):
    """From a plain moving average (Keras's, 4 steps), a zero-debiased target is written at
    the step K where 1 - d^K rounds to 1 in float32 (d = 0.9: K = 165), so its next step gives
    the batch the source's weight 0.1, not 0.1 / (1 - 0.9^5) = 0.244 as the count 4 would."""
    needs(target)
    state = random_state("keras")
    assert debiased_count(state, target) == 165
    layer, notes = write(state, target, ndim=2), notes_for(state, target)
    assert any("is written at step 165" in note for note in notes)
    x_last = np.random.default_rng(7).normal(1, 2, (8, 3)).astype(np.float32)
    if target == "haiku":
        _, (_, _, hk_state) = haiku_apply(layer, x_last, training=True)
        mean = np.asarray(hk_state["batch_norm/~/mean_ema"]["average"]).ravel()
        var = np.asarray(hk_state["batch_norm/~/var_ema"]["average"]).ravel()
    else:
        _, trained = equinox_apply(layer, x_last, training=True)
        after = read(trained)
        mean, var = after.running_mean, after.running_var
    expected_mean, expected_var = one_step_expected(state, x_last, 0.1)
    assert_close(mean, expected_mean, stat_tolerance(expected_mean), "running mean")
    assert_close(var, expected_var, stat_tolerance(expected_var), "running var")


def test_a_debiased_source_says_its_next_weight_and_the_plain_target_differs_by_it():
    """Haiku at step 3 (d = 0.9) would give its next batch 0.1 / (1 - 0.9^4) = 0.291; a plain
    target gives 0.1. Both measured after one more step."""
    needs("haiku")
    state = dataclasses.replace(random_state("haiku"), num_batches_tracked=3)
    source = write(state, "haiku", ndim=2)
    target, notes = convert(source, "bnref.numpy", ndim=2)
    debiased_weight = 0.1 / (1 - 0.9**4)
    assert any(f"{debiased_weight:.6g}" in note for note in notes), notes
    x_last = np.random.default_rng(8).normal(1, 2, (8, 3)).astype(np.float32)
    _, (_, _, hk_state) = haiku_apply(source, x_last, training=True)
    target(np.moveaxis(x_last, -1, 1), training=True)
    for weight, mean in ((debiased_weight,
                          np.asarray(hk_state["batch_norm/~/mean_ema"]["average"]).ravel()),
                         (0.1, target.running_mean)):
        expected_mean, _ = one_step_expected(state, x_last, weight)
        assert_close(mean, expected_mean, stat_tolerance(expected_mean), f"weight {weight:.3g}")


def test_haiku_and_equinox_batch_continue_each_other_exactly():
    """Both zero-debiased: the count carries over, and after one more step each gives the
    other's statistics (whatever their stored variances started from)."""
    needs("haiku")
    needs("equinox_batch")
    state = random_state("haiku")
    haiku_layer = write(state, "haiku", ndim=2)
    equinox_layer, notes = convert(haiku_layer, "equinox_batch")
    assert not any("counter" in note or "debiasing" in note for note in notes), notes
    assert read(equinox_layer).num_batches_tracked == state.num_batches_tracked
    x_last = np.random.default_rng(9).normal(1, 2, (8, 3)).astype(np.float32)
    _, (_, _, hk_state) = haiku_apply(haiku_layer, x_last, training=True)
    _, trained = equinox_apply(equinox_layer, x_last, training=True)
    after = read(trained)
    for key, value in (("mean_ema", after.running_mean), ("var_ema", after.running_var)):
        expected = np.asarray(hk_state[f"batch_norm/~/{key}"]["average"]).ravel()
        assert_close(value, expected, stat_tolerance(expected), key)


def test_a_numpy_layer_under_the_haiku_convention_converts_with_its_count():
    """bnref.numpy.BatchNorm(convention="haiku") carries its debiased statistics and count into
    haiku, which then continues it step for step."""
    needs("haiku")
    import bnref.numpy as bn

    rng = np.random.default_rng(10)
    layer = bn.BatchNorm(3, convention="haiku", momentum=0.9)
    for _ in range(3):
        layer(rng.normal(1, 2, (8, 3)).astype(np.float32), training=True)
    converted, notes = convert(layer, "haiku", ndim=2)
    state = read(converted)
    mean, var = layer.inference_statistics()
    np.testing.assert_array_equal(state.running_mean, mean)
    np.testing.assert_array_equal(state.running_var, var)
    assert state.num_batches_tracked == 3 and state.convention == "haiku"
    assert not any("counter" in note for note in notes), notes
    x = rng.normal(1, 2, (8, 3)).astype(np.float32)
    _, (_, _, hk_state) = haiku_apply(converted, x, training=True)
    layer(x, training=True)
    expected = np.asarray(hk_state["batch_norm/~/mean_ema"]["average"]).ravel()
    assert_close(layer.inference_statistics()[0], expected, stat_tolerance(expected),
                 "mean after one more step")
    assert get_convention("haiku").default_momentum is None


def test_notes_name_equinox_training_statistics_and_a_source_that_has_not_trained():
    torch_state = random_state("torch")
    assert any(note.startswith("training: equinox normalises a training batch with the "
                               "running statistics") for note in notes_for(torch_state, "equinox"))
    assert not any(note.startswith("training:") for note in notes_for(torch_state,
                                                                      "equinox_batch"))
    untrained = dataclasses.replace(random_state("equinox"), num_batches_tracked=0)
    assert any(note.startswith("seeding: the source (equinox) had not trained")
               for note in notes_for(untrained, "keras"))
