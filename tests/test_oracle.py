"""What only the numpy oracle promises: stable statistics, the ONNX operator's documented quirks,
and a layer whose state speaks every convention's names. (Its calculus is checked by the
shared suite's finite-difference property, which every backend runs.)"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bnref.numpy as bn
from bnref.conventions import CONVENTIONS
from bnref.numpy import functional
from bnref.testing import _onnx, load_backend
from bnref.testing.checks import check_forward
from bnref.testing.strategies import bn_cases
from bnref.testing.tolerances import UNIT_ROUNDOFF, assert_close


@contextlib.contextmanager
def smaller_blocks(block_bytes: int, max_run: int):
    """Shrink the oracle's blocks (see bnref.numpy.functional._blocks) for a while."""
    saved = functional._BLOCK_BYTES, functional._MAX_RUN
    functional._BLOCK_BYTES, functional._MAX_RUN = block_bytes, max_run
    try:
        yield
    finally:
        functional._BLOCK_BYTES, functional._MAX_RUN = saved


def test_variance_is_stable_where_the_one_pass_formula_goes_negative():
    """At offset 1e4 in float32, E[x²]−E[x]² returns a negative variance; bnref's two-pass
    blocked variance stays within float32 accuracy of the float64 truth."""
    rng = np.random.default_rng(7)
    x = (1e4 + 1e-2 * rng.standard_normal((512, 3))).astype(np.float32)
    truth = x.astype(np.float64).var(axis=0)
    one_pass = (x * x).mean(axis=0) - x.mean(axis=0) ** 2
    assert np.any(one_pass < 0) or np.any(np.abs(one_pass - truth) > truth), (
        "the one-pass formula was expected to fail here", one_pass, truth)
    _, _, running_var = bn.batch_norm(x, None, None, np.zeros(3, np.float32),
                                      np.ones(3, np.float32), training=True, momentum=0.0,
                                      convention="keras")
    # momentum 0 under keras' meaning: running_var becomes the biased batch variance.
    stable = running_var.astype(np.float64)
    bound = 4 * UNIT_ROUNDOFF["float32"] * np.sqrt(len(x)) * (truth + 1e4 * np.sqrt(truth))
    assert_close(stable, truth, bound, "bnref's batch variance at offset 1e4")


def test_float16_statistics_are_accumulated_in_float32():
    """4096 float16 values of 60 sum to 245760, past float16's 65504: a float16 accumulator
    overflows, bnref's float32 one does not."""
    x = np.full((4096, 2), 60.0, np.float16)
    with np.errstate(over="ignore"):
        assert np.isinf(x.sum(axis=0, dtype=np.float16)).all()
    y, mean, _ = bn.batch_norm(x, None, None, np.zeros(2, np.float32), np.ones(2, np.float32),
                                training=True, momentum=1.0)
    assert y.dtype == np.float16 and mean.dtype == np.float32
    assert_close(mean, np.full(2, 60.0), 0.0, "running_mean after momentum 1 (torch)")
    assert_close(y, np.zeros_like(y), 0.0, "constant input normalises to 0")


def test_onnx_opset9_reference_normalises_with_the_blended_statistics():
    """A known onnx.reference deviation: for opset 9 with a momentum attribute it normalises
    with ``momentum * input_mean + (1 - momentum) * batch_mean`` (and likewise the variance),
    which is neither the batch statistics (training) nor the inputs (inference). bnref follows
    the opset-15 semantics, which onnxruntime and onnx.reference agree on."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    scale, bias = np.array([1.5, 0.5], np.float32), np.array([0.1, -0.2], np.float32)
    mean, var = np.array([2.0, -1.0], np.float32), np.array([4.0, 0.25], np.float32)
    (y9,) = _onnx.run_onnx(x, scale, bias, mean, var, training=True, momentum=0.9, eps=1e-5,
                           engine="reference", opset=9)
    _, blended_mean, blended_var = bn.batch_norm(x, scale, bias, mean, var, training=True,
                                                 momentum=0.9, convention="onnx")
    y_blended = bn.batch_norm(x, scale, bias, blended_mean, blended_var, training=False,
                              convention="onnx")[0]
    y_training = bn.batch_norm(x, scale, bias, mean, var, training=True, convention="onnx")[0]
    assert_close(y9, y_blended, 1e-5, "opset-9 reference Y vs normalising with blended stats")
    assert np.abs(y9 - y_training).max() > 0.1  # so it is not the training output


@pytest.mark.parametrize("names", sorted(CONVENTIONS))
def test_layer_state_round_trips_through_every_conventions_names(names):
    layer = bn.BatchNorm(3, momentum=None)
    rng = np.random.default_rng(1)
    for _ in range(3):
        layer(rng.standard_normal((5, 3, 2)).astype(np.float32))
    layer.weight = rng.standard_normal(3).astype(np.float32)
    state = layer.state_dict(names)
    fresh = bn.BatchNorm(3, momentum=None)
    fresh.load_state_dict(state, names)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert_close(getattr(fresh, attr), getattr(layer, attr), 0.0, attr)
    expected_count = 3 if names == "torch" else 0  # only PyTorch stores the batch counter
    assert fresh.num_batches_tracked == expected_count


def test_layer_names_follow_the_frameworks():
    layer = bn.BatchNorm(2)
    assert set(layer.state_dict("torch")) == {"weight", "bias", "running_mean", "running_var",
                                              "num_batches_tracked"}
    assert set(layer.state_dict("keras")) == {"gamma", "beta", "moving_mean", "moving_variance"}
    flax_state = layer.state_dict("flax")
    assert {k: set(v) for k, v in flax_state.items()} == {"params": {"scale", "bias"},
                                                           "batch_stats": {"mean", "var"}}
    assert set(layer.state_dict("onnx")) == {"scale", "B", "input_mean", "input_var"}


def test_layer_load_state_dict_refuses_a_mismatch_and_changes_nothing():
    layer = bn.BatchNorm(2)
    before = layer.state_dict()
    with pytest.raises(KeyError, match=r"missing \['running_var'\]"):
        layer.load_state_dict({"weight": np.ones(2), "bias": np.zeros(2),
                               "running_mean": np.full(2, 5.0)})
    with pytest.raises(ValueError, match=r"running_var must have shape \(2,\), got shape \(3,\)"):
        layer.load_state_dict({**before, "running_mean": np.full(2, 5.0),
                               "running_var": np.ones(3)})
    for key, value in layer.state_dict().items():
        assert_close(value, before[key], 0.0, key)


def test_layer_backward_is_the_analytic_backward_and_keeps_parameter_gradients():
    rng = np.random.default_rng(2)
    layer = bn.BatchNorm(3, eps=1e-3)
    layer.weight = np.array([0.5, -1.0, 2.0], np.float32)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    with pytest.raises(RuntimeError, match="needs a preceding forward call in training mode"):
        layer.backward(dy)
    layer(x, training=True)
    dx = layer.backward(dy)
    expected = bn.batch_norm_backward(dy, x, layer.weight, eps=1e-3, axis=1)
    assert_close(dx, expected[0], 0.0, "dx")
    assert_close(layer.weight_grad, expected[1], 0.0, "weight_grad")
    assert_close(layer.bias_grad, expected[2], 0.0, "bias_grad")


def test_layer_without_running_stats_uses_batch_statistics_in_eval():
    rng = np.random.default_rng(4)
    x = (3 + 2 * rng.standard_normal((8, 2))).astype(np.float32)
    layer = bn.BatchNorm(2, track_running_stats=False).eval()
    assert "running_mean" not in layer.state_dict()
    y = layer(x)
    expected = bn.batch_norm(x, layer.weight, layer.bias, None, None, training=True)[0]
    assert_close(y, expected, 0.0, "eval output without running stats")


def test_layer_eval_does_not_move_running_statistics():
    layer = bn.BatchNorm(2)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    layer(x, training=True)
    state = layer.state_dict()
    layer(x + 100, training=False)
    for key, value in layer.state_dict().items():
        assert_close(value, state[key], 0.0, key)


@pytest.mark.parametrize(("block_bytes", "max_run"), [(16, 2), (64, 8), (256, 4), (4096, 64)],
                         ids=["tiny-blocks", "channel-runs", "channel-pieces", "row-blocks"])
@given(data=st.data())
def test_blocked_statistics_match_the_oracle_whatever_the_blocking(block_bytes, max_run, data):
    """The oracle reduces big arrays block by block (whole rows, runs of channels, or pieces of
    one channel) and merges blocks with Chan's update; shrinking the blocks makes the small
    drawn cases take every one of those paths, and the results must not move."""
    case = data.draw(bn_cases(dtypes=("float16", "float32", "float64")), label="case")
    expected = check_forward(load_backend("numpy"), case)  # one block: the plain two-pass
    with smaller_blocks(block_bytes, max_run):
        blocked = check_forward(load_backend("numpy"), case)
    for plain, split in zip(expected, blocked, strict=True):
        assert split.passed, f"{split}\ncase: {case!r}"
        assert plain.what == split.what
