"""The convention records, pinned to the installed frameworks, and the adapters between them."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bnref.numpy as bn
from bnref.conventions import (
    CONVENTIONS,
    DEFAULT,
    channel_axis_permutation,
    convert_momentum,
    get_convention,
    move_channel_axis,
    translate_hyperparameters,
)
from bnref.testing import _onnx
from bnref.testing.tolerances import UNIT_ROUNDOFF, assert_close

NAMES = sorted(CONVENTIONS)


def observe_one_step(run_step, momentum: float) -> dict:
    """Feed a fresh BN (running mean 0, var 1) one known batch and read off its rule.

    The batch has per-channel mean [1, 2], biased variance [1, 4] and unbiased [2, 8], so the
    new running mean shows the weight given to the batch, and the running variance shows
    which estimator fed it.
    """
    x = np.array([[0.0, 0.0], [2.0, 4.0]], np.float32)
    new_mean, new_var = run_step(x, momentum)
    weight = float(new_mean[0]) / 1.0
    unbiased = bool(np.isclose(new_var[0], (1 - weight) + weight * 2.0, rtol=1e-6))
    biased = bool(np.isclose(new_var[0], (1 - weight) + weight * 1.0, rtol=1e-6))
    assert unbiased != biased, (new_mean, new_var)
    weights = "new" if np.isclose(weight, momentum) else "old"
    assert np.isclose(weight, momentum if weights == "new" else 1 - momentum)
    return {"momentum_weights": weights, "unbiased_running_var": unbiased}


def test_onnx_record_is_the_operator_schema_and_behaviour():
    import onnx.defs

    schema = onnx.defs.get_schema("BatchNormalization")
    record = CONVENTIONS["onnx"]
    assert schema.attributes["momentum"].default_value.f == pytest.approx(
        record.default_momentum, rel=1e-7)
    assert schema.attributes["epsilon"].default_value.f == pytest.approx(
        record.default_eps, rel=1e-7)
    assert [i.name for i in schema.inputs][1:] == [record.state_names[k] for k in
                                                   ("gamma", "beta", "running_mean",
                                                    "running_var")]

    def step(x, momentum):
        ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
        _, mean, var = _onnx.run_onnx(x, ones, zeros, zeros, ones, training=True,
                                      momentum=momentum, eps=1e-5)
        return mean, var

    observed = observe_one_step(step, 0.25)
    assert observed == {"momentum_weights": record.momentum_weights,
                        "unbiased_running_var": record.unbiased_running_var}


def test_numpy_layer_defaults_are_the_torch_records():
    """bnref.numpy.BatchNorm takes torch-style arguments and defaults to torch's convention."""
    parameters = inspect.signature(bn.BatchNorm).parameters
    assert parameters["convention"].default == "torch"
    assert parameters["momentum"].default is DEFAULT
    layer = bn.BatchNorm(2)
    torch_record = CONVENTIONS["torch"]
    assert (layer.momentum, layer.eps, layer.axis) == (
        torch_record.default_momentum, torch_record.default_eps, torch_record.default_axis)

    def step(x, momentum):
        fresh = bn.BatchNorm(2, momentum=momentum)
        fresh(x, training=True)
        return fresh.running_mean, fresh.running_var

    observed = observe_one_step(step, 0.25)
    assert observed == {"momentum_weights": "new", "unbiased_running_var": True}


@pytest.mark.parametrize("name", NAMES)
def test_numpy_batch_norm_applies_each_records_rule(name):
    record = CONVENTIONS[name]

    def step(x, momentum):
        _, mean, var = bn.batch_norm(x, None, None, np.zeros(2, np.float32),
                                     np.ones(2, np.float32), training=True,
                                     momentum=momentum, axis=1, convention=name)
        return mean, var

    assert observe_one_step(step, 0.25) == {"momentum_weights": record.momentum_weights,
                                            "unbiased_running_var": record.unbiased_running_var}


momenta = st.floats(0, 1)


@given(m=momenta, src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES))
def test_convert_momentum_round_trips_and_keeps_the_new_value_weight(m, src, dst):
    there = convert_momentum(m, src, dst)
    assert 0.0 <= there <= 1.0
    weight = CONVENTIONS[src].new_value_weight(m)
    assert_close(CONVENTIONS[dst].new_value_weight(there), weight,
                 2 * UNIT_ROUNDOFF["float64"], "new-value weight after conversion")
    assert_close(convert_momentum(there, dst, src), m, 2 * UNIT_ROUNDOFF["float64"],
                 "momentum after a round trip")


def test_convert_momentum_examples_and_refusals():
    assert convert_momentum(0.1, "torch", "keras") == pytest.approx(0.9)
    assert convert_momentum(0.99, "flax", "mxnet") == 0.99
    with pytest.raises(ValueError, match="got None"):
        convert_momentum(None, "torch", "keras")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        convert_momentum(1.5, "torch", "keras")
    with pytest.raises(ValueError, match="convention must be one of"):
        get_convention("caffe")


@pytest.mark.parametrize("src", NAMES)
@pytest.mark.parametrize("dst", NAMES)
def test_translated_hyperparameters_reproduce_the_layer(src, dst):
    """A layer configured in src's terms and its translation into dst's give the same outputs
    and running means; the running variances differ exactly as the notes say: by the
    unbiased factor n/(n-1) on the new-value term when only one side is torch."""
    rng = np.random.default_rng(5)
    batches = [(1 + 3 * rng.standard_normal((6, 3, 4))).astype(np.float64) for _ in range(3)]
    t = translate_hyperparameters(src, dst, ndim=3, momentum=0.3, eps=1e-3, dst_axis=1)
    a = bn.BatchNorm(3, momentum=0.3, eps=1e-3, axis=1, convention=src, dtype=np.float64)
    b = bn.BatchNorm(3, momentum=t.momentum, eps=t.eps, axis=t.axis, convention=dst,
                     dtype=np.float64)
    for x in batches:
        assert_close(b(x), a(x), 1e-12, "training output")
        assert_close(b.running_mean, a.running_mean, 1e-12, "running_mean")
    differs = CONVENTIONS[src].unbiased_running_var != CONVENTIONS[dst].unbiased_running_var
    assert any("n/(n-1)" in note for note in t.notes) == differs
    if differs:
        # Replay the variance recurrence with the biased/unbiased estimators swapped.
        weight = CONVENTIONS[src].new_value_weight(0.3)
        n = 6 * 4
        var_a, var_b = np.ones(3), np.ones(3)
        for x in batches:
            batch_var = np.moveaxis(x, 1, -1).reshape(-1, 3).var(axis=0)
            unbiased = batch_var * n / (n - 1)
            src_var = unbiased if CONVENTIONS[src].unbiased_running_var else batch_var
            dst_var = unbiased if CONVENTIONS[dst].unbiased_running_var else batch_var
            var_a = (1 - weight) * var_a + weight * src_var
            var_b = (1 - weight) * var_b + weight * dst_var
        assert_close(a.running_var, var_a, 1e-12, "src running_var")
        assert_close(b.running_var, var_b, 1e-12, "dst running_var")
    else:
        assert_close(b.running_var, a.running_var, 1e-12, "running_var")
        assert_close(b(batches[0], training=False), a(batches[0], training=False), 1e-12,
                     "inference output")


def test_translation_defaults_to_the_source_defaults_and_the_target_layout():
    t = translate_hyperparameters("torch", "keras", ndim=4)
    assert (t.momentum, t.eps, t.axis) == (pytest.approx(0.9), 1e-5, 3)
    assert translate_hyperparameters("torch", "keras", ndim=4, momentum=None).momentum is None


def test_channel_axis_moves_are_inverse_and_commute_with_batch_norm():
    rng = np.random.default_rng(6)
    nchw = rng.standard_normal((2, 3, 4, 5))
    assert channel_axis_permutation(4, 1, -1) == (0, 2, 3, 1)
    nhwc = move_channel_axis(nchw, 1, -1)
    assert nhwc.shape == (2, 4, 5, 3)
    assert_close(move_channel_axis(nhwc, -1, 1), nchw, 0.0, "round trip")
    y_first = bn.batch_norm(nchw, None, None, None, None, training=True, axis=1)[0]
    y_last = bn.batch_norm(nhwc, None, None, None, None, training=True, axis=-1)[0]
    assert_close(move_channel_axis(y_last, -1, 1), y_first, 1e-12, "NHWC vs NCHW")
