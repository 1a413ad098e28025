"""bnref.convert: a trained layer moves between frameworks with identical inference outputs;
what cannot carry over (the unbiased running variance) is said, and measured here."""

from __future__ import annotations

import numpy as np
import pytest

from bnref.convert import BNState, convert, load, notes_for, read, save, write
from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import assert_close

BUILTINS = ("torch", "keras", "flax", "gluon", "onnx")
OWN = {"bnref.numpy": "torch", "bnref.torch": "torch", "bnref.jax": "flax",
       "bnref.tf": "keras", "bnref.mxnet": "gluon"}
NEEDS = {"torch": "torch", "bnref.torch": "torch", "keras": "tf", "bnref.tf": "tf",
         "flax": "jax", "bnref.jax": "jax", "gluon": "mxnet", "bnref.mxnet": "mxnet",
         "onnx": "numpy", "bnref.numpy": "numpy"}
PAIRS = [(a, b) for a in BUILTINS for b in BUILTINS if a != b] + [
    pair for own, builtin in OWN.items() for pair in ((own, builtin), (builtin, own))]


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
    if kind == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(layer.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        return session.run(None, {"X": x})[0]
    return layer(x, training=False)


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_converted_layer_gives_the_same_inference(source, target):
    for kind in (source, target):
        backend_or_skip(NEEDS[kind])
    from bnref.convert import _CONVENTION

    original = random_state(_CONVENTION[source])
    layer = write(original, source)
    state = read(layer)
    for name in ("gamma", "beta", "running_mean", "running_var"):
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
