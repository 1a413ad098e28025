"""The convention records, pinned to the installed frameworks, and the adapters between them."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bnref.numpy as bn
from bnref._checks import check_layer_args
from bnref.conventions import (
    ALL_CONVENTIONS,
    CONVENTIONS,
    DEFAULT,
    LIBRARY_CONVENTIONS,
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


# -- the library conventions (Equinox, Haiku): rules as data --------------------------------
def test_library_records_resolve_by_name_and_pickle_as_themselves():
    import pickle

    assert set(ALL_CONVENTIONS) == set(CONVENTIONS) | set(LIBRARY_CONVENTIONS)
    for name, record in LIBRARY_CONVENTIONS.items():
        assert get_convention(name) is record
        assert pickle.loads(pickle.dumps(record)) is record
        assert not record.is_plain and record.plain().is_plain
        assert record.plain().momentum_weights == record.momentum_weights
    # The contract's message for an unknown name is unchanged (bnref/testing/checks.py).
    with pytest.raises(ValueError, match=r"one of \['flax', 'keras', 'mxnet', 'onnx', "
                                         r"'torch'\] or a Convention, got 'pytorch'"):
        get_convention("pytorch")


def test_the_recurrences_in_plain_python():
    """Seeding, zero-debiasing and the debiased start value, on floats."""
    equinox, equinox_batch, haiku = (LIBRARY_CONVENTIONS[n] for n in
                                     ("equinox", "equinox_batch", "haiku"))
    m, a, b, c = 0.75, 2.0, 6.0, 10.0
    # Equinox mode="ema": the first batch replaces whatever was there, then the old rule.
    assert equinox.stored_after([a], m, initial=123.0) == a
    assert equinox.stored_after([a, b], m, initial=123.0) == m * a + (1 - m) * b
    assert equinox.running_after([a, b], m, initial=123.0) == m * a + (1 - m) * b
    # Haiku: from 0, divided by 1 - m^k: a weighted mean of the batches.
    assert haiku.running_after([a], m, 0.0) == pytest.approx(a, rel=1e-15)
    weights = np.array([m**2, m, 1.0]) * (1 - m) / (1 - m**3)
    assert haiku.running_after([a, b, c], m, 0.0) == pytest.approx(weights @ [a, b, c])
    assert haiku.inference_divisor(m, 0) == 1.0 and haiku.inference_divisor(m, 2) == 1 - m**2
    # Equinox mode="batch": the same rule from a variance of 1, which the division inflates.
    extra = m**3 / (1 - m**3)
    assert equinox_batch.running_after([a, b, c], m, 1.0) == pytest.approx(
        haiku.running_after([a, b, c], m, 0.0) + extra)
    assert equinox.momentum_for_step(m, 1) == 0.0 and equinox.momentum_for_step(m, 2) == m


def test_backends_refuse_library_rules_and_the_numpy_layer_runs_them():
    x = np.ones((4, 3), np.float32)
    for name in LIBRARY_CONVENTIONS:
        with pytest.raises(ValueError, match=f"convention '{name}' .*which batch_norm does "
                                             "not run"):
            bn.batch_norm(x, None, None, np.zeros(3, np.float32), np.ones(3, np.float32),
                          training=True, momentum=0.9, convention=name)
        with pytest.raises(ValueError, match="this layer runs the plain moving average only"):
            check_layer_args(3, momentum=0.9, eps=None, convention=name)
        layer = bn.BatchNorm(3, momentum=0.9, convention=name)
        assert layer.convention is LIBRARY_CONVENTIONS[name]
    with pytest.raises(ValueError, match="momentum is required under the 'haiku' convention"):
        bn.batch_norm(x, None, None, None, None, training=True,
                      convention=get_convention("haiku").plain())
    with pytest.raises(ValueError, match="momentum=None"):
        bn.BatchNorm(3, momentum=None, convention="haiku")
    with pytest.raises(ValueError, match="nonzero weight"):
        bn.BatchNorm(3, momentum=1.0, convention="equinox_batch")


def test_numpy_layer_keeps_the_count_in_library_state_and_refuses_a_blended_backward():
    rng = np.random.default_rng(11)
    layer = bn.BatchNorm(3, momentum=0.9, convention="haiku", dtype=np.float64)
    assert (layer.running_mean == 0).all() and (layer.running_var == 0).all()  # Haiku's start
    for _ in range(2):
        layer(rng.normal(1, 2, (5, 3)))
    state = layer.state_dict("haiku")
    assert set(state) == {"scale", "offset", "mean_ema", "var_ema", "num_batches_tracked"}
    fresh = bn.BatchNorm(3, momentum=0.9, convention="haiku", dtype=np.float64)
    fresh.load_state_dict(state, "haiku")
    assert fresh.num_batches_tracked == 2
    for got, want in zip(fresh.inference_statistics(), layer.inference_statistics(),
                         strict=True):
        assert_close(got, want, 0.0, "inference statistics after a state round trip")
    # Equinox mode="ema": the first step is normalised with the batch's statistics (its
    # gradient is the usual one), later ones with the blended running statistics.
    layer = bn.BatchNorm(3, momentum=0.9, convention="equinox", axis=-1, dtype=np.float64)
    x = rng.normal(1, 2, (5, 3))
    assert_close(layer(x), bn.batch_norm(x, layer.weight, layer.bias, None, None,
                                         training=True, axis=-1)[0], 0.0, "seeded step")
    layer.backward(np.ones_like(x))
    layer(rng.normal(1, 2, (5, 3)))
    with pytest.raises(NotImplementedError, match="blended running statistics"):
        layer.backward(np.ones_like(x))


@pytest.mark.parametrize("name", sorted(LIBRARY_CONVENTIONS))
def test_readme_and_guide_rows_of_the_library_records_are_the_records(name):
    """tests/test_readme.py and tests/test_docs.py check the five frameworks' rows; these are
    the libraries' (README: the `bnref conventions` columns; guide: its own table)."""
    from pathlib import Path

    from bnref.cli import conventions_table

    root = Path(__file__).parent.parent
    record = LIBRARY_CONVENTIONS[name]
    momentum = "required" if record.default_momentum is None else f"{record.default_momentum:g}"
    for path, columns in (("README.md", (2, 3, 4, 6)), ("docs/conventions.md", (2, 3, 4, 5))):
        row = next(line for line in (root / path).read_text().splitlines()
                   if line.startswith(f"| {name} |"))
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        rule, default_m, eps, axis = (cells[i] for i in columns)
        assert (rule, default_m, eps, axis) == (f"`{record.update_rule}`", momentum,
                                                f"{record.default_eps:g}",
                                                str(record.default_axis)), path
    readme_row = next(line for line in (root / "README.md").read_text().splitlines()
                      if line.startswith(f"| {name} |"))
    cells = [cell.strip() for cell in readme_row.strip().strip("|").split("|")]
    assert cells[5] == ("unbiased" if record.unbiased_running_var else "biased")
    assert cells[7] == ", ".join(record.state_names[k] for k in
                                 ("gamma", "beta", "running_mean", "running_var"))
    cli_row = next(line for line in conventions_table().splitlines()
                   if line.startswith(f"{name} "))
    assert record.update_rule in cli_row and record.layer in cli_row and momentum in cli_row
