"""Equinox's and Haiku's batch-norm rules, pinned to the installed libraries.

Each record (``equinox``, ``equinox_batch``, ``haiku`` in ``LIBRARY_CONVENTIONS``) is checked
against its library's signature and state layout, and ``bnref.numpy.BatchNorm`` under each one
is run next to the library for three training steps and an inference step in float64: the
stored running statistics, the step count, the statistics inference normalises with and every
output must agree within the tolerance policy's bounds. Both libraries are test dependencies
(the ``test`` extra); they are skipped with jax, and required when jax is (``BNREF_REQUIRE``).
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import numpy as np
import pytest

from bnref.conventions import (
    CONVENTIONS,
    DEFAULT,
    LIBRARY_CONVENTIONS,
    get_convention,
    translate_hyperparameters,
)
from bnref.testing.backends import required_backends
from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import (
    SAFETY,
    UNIT_ROUNDOFF,
    ChannelStats,
    assert_close,
    forward_tolerance,
    running_stat_tolerances,
)

backend_or_skip("jax")  # also enables jax_enable_x64 (bnref.testing._jax)


def _library(name: str):
    if "jax" in required_backends():
        return importlib.import_module(name)  # required: a missing library fails
    return pytest.importorskip(name)


eqx = _library("equinox")
hk = _library("haiku")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bnref.numpy as bn  # noqa: E402

EQUINOX, EQUINOX_BATCH, HAIKU = (LIBRARY_CONVENTIONS[n] for n in ("equinox", "equinox_batch",
                                                                   "haiku"))
STEPS = 3


# -- running the libraries ------------------------------------------------------------------
def equinox_layer(channels: int, mode: str, **options):
    module, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        channels, "batch", mode=mode, dtype=jnp.float64, **options)
    return module, state


def equinox_call(module, state, x: np.ndarray, training: bool):
    """The module over a batch (channels on axis 1), as Equinox means it: vmapped with the
    ``axis_name`` its statistics are taken over."""
    layer = module if training else eqx.nn.inference_mode(module)
    y, state = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        jnp.asarray(x), state)
    return np.asarray(y), state


def equinox_stored(module, state) -> tuple[np.ndarray, np.ndarray]:
    index = module.batch_state_index if module.mode == "batch" else module.ema_state_index
    return tuple(np.asarray(stat) for stat in state.get(index))


def haiku_layer(decay_rate: float, **options):
    def forward(x, is_training):
        return hk.BatchNorm(True, True, decay_rate, **options)(x, is_training)

    return hk.transform_with_state(forward)


def batches(shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(3.0, 2.0, shape) for _ in range(STEPS + 1)]


# -- tolerances -----------------------------------------------------------------------------
def stored_tolerances(record, momentum: float, xs: list[np.ndarray], axis: int,
                      initial: tuple[np.ndarray, np.ndarray]):
    """Bounds on the stored statistics after one step per batch: each step's bound
    (tolerances.running_stat_tolerances) added up, since the old value's error is carried
    with a weight of at most 1."""
    mean_bound, var_bound = np.zeros_like(initial[0]), np.zeros_like(initial[1])
    old_mean, old_var = initial
    for step, x in enumerate(xs, start=1):
        weight = record.new_value_weight(record.momentum_for_step(momentum, step))
        step_mean, step_var = running_stat_tolerances(
            x, axis, old_mean=old_mean, old_var=old_var, new_value_weight=weight,
            stat_dtype="float64")
        mean_bound, var_bound = mean_bound + step_mean, var_bound + step_var
        stats = ChannelStats.of(x, axis)
        step_momentum = record.momentum_for_new_value_weight(weight)
        old_mean = record.update_running(old_mean, stats.mean, step_momentum)
        old_var = record.update_running(old_var, stats.var, step_momentum)
    return mean_bound, var_bound


def debiased_tolerance(stored_bound: np.ndarray, record, momentum: float, steps: int,
                       value: np.ndarray) -> np.ndarray:
    """The stored statistic's bound through the division by ``1 - d**k``: ``d**k`` is off by
    ``k`` roundings, which the subtraction magnifies by ``d**k / (1 - d**k)``, and the
    quotient rounds once more."""
    divisor = record.inference_divisor(momentum, steps)
    decay_k = 1.0 - divisor if record.debias else 0.0
    relative = (2 + steps * decay_k / divisor) * UNIT_ROUNDOFF["float64"]
    return stored_bound / divisor + SAFETY * relative * np.abs(value)


def output_tolerance(x, axis, layer_gamma, layer_beta, eps, mean, var, training):
    return forward_tolerance(x, axis, gamma=layer_gamma, beta=layer_beta, eps=eps, mean=mean,
                             var=var, batch_stats=training)


# -- the records against the installed signatures -------------------------------------------
def test_equinox_records_are_the_installed_defaults_and_state():
    parameters = inspect.signature(eqx.nn.BatchNorm).parameters
    for record in (EQUINOX, EQUINOX_BATCH):
        assert parameters["momentum"].default == record.default_momentum
        assert parameters["eps"].default == record.default_eps
        assert record.momentum_argument in parameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mode omitted warns that "legacy" means "ema"
        module, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch")
    assert module.mode == "ema"  # the record named "equinox" is the default mode
    for record, mode in ((EQUINOX, "ema"), (EQUINOX_BATCH, "batch")):
        module, state = equinox_layer(2, mode)
        gamma, beta, mean, var = (record.state_names[k] for k in ("gamma", "beta",
                                                                  "running_mean",
                                                                  "running_var"))
        assert (gamma, beta) == ("weight", "bias")
        assert hasattr(module, gamma) and hasattr(module, beta)
        index = mean.split("[")[0]
        assert (mean, var) == (f"{index}[0]", f"{index}[1]")
        initial = equinox_stored(module, state)
        # The stored statistics start at (0, initial_running_var): Equinox's jnp.empty buffers
        # are zeros in mode="ema", (0, 1) in mode="batch".
        np.testing.assert_array_equal(initial[0], np.zeros(2))
        np.testing.assert_array_equal(initial[1], np.full(2, record.initial_running_var))
    assert not EQUINOX.debias and EQUINOX.first_batch_seeds
    assert EQUINOX_BATCH.debias == "zero" and not EQUINOX_BATCH.first_batch_seeds


def test_haiku_record_is_the_installed_defaults_and_state():
    parameters = inspect.signature(hk.BatchNorm).parameters
    assert HAIKU.momentum_argument == "decay_rate"
    assert parameters["decay_rate"].default is inspect.Parameter.empty  # required: no default
    assert HAIKU.default_momentum is None
    assert parameters["eps"].default == HAIKU.default_eps
    assert hk.get_channel_index(parameters["data_format"].default) == HAIKU.default_axis
    ema = inspect.signature(hk.ExponentialMovingAverage).parameters
    assert ema["zero_debias"].default is True and ema["warmup_length"].default == 0
    forward = haiku_layer(0.9)
    x = batches((6, 4, 3), 0)[0]
    params, state = forward.init(None, jnp.asarray(x), True)
    assert set(params["batch_norm"]) == {HAIKU.state_names["gamma"], HAIKU.state_names["beta"]}
    for canonical in ("running_mean", "running_var"):
        ema_name, stored = HAIKU.state_names[canonical].split("/")
        assert set(state[f"batch_norm/~/{ema_name}"]) == {stored, "average", "counter"}
        np.testing.assert_array_equal(state[f"batch_norm/~/{ema_name}"][stored], 0.0)
    assert HAIKU.initial_running_var == 0.0
    # One step, read off as tests/test_conventions.py does for the frameworks: the stored
    # ("hidden") mean is the new-value weight times the batch mean (decay weighs the OLD
    # value), the variance fed is the biased one, and the average is hidden / (1 - decay).
    x = np.array([[0.0, 0.0], [2.0, 4.0]])  # means [1, 2], biased variances [1, 4]
    forward = haiku_layer(0.75, data_format="channels_last")
    params, state = forward.init(None, jnp.asarray(x), True)
    _, state = forward.apply(params, state, None, jnp.asarray(x), True)
    mean_ema, var_ema = state["batch_norm/~/mean_ema"], state["batch_norm/~/var_ema"]
    weight = HAIKU.new_value_weight(0.75)
    assert HAIKU.momentum_weights == "old" and weight == 0.25
    assert_close(np.asarray(mean_ema["hidden"]).ravel(), weight * np.array([1.0, 2.0]),
                 2 * UNIT_ROUNDOFF["float64"] * 2, "hidden mean")
    assert_close(np.asarray(var_ema["hidden"]).ravel(), weight * np.array([1.0, 4.0]),
                 2 * UNIT_ROUNDOFF["float64"] * 4, "hidden var (biased)")
    assert not HAIKU.unbiased_running_var
    assert_close(np.asarray(var_ema["average"]).ravel(), np.array([1.0, 4.0]),
                 4 * UNIT_ROUNDOFF["float64"] * 4, "average = hidden / (1 - decay)")


# -- bnref.numpy.BatchNorm next to the libraries --------------------------------------------
@pytest.mark.parametrize("momentum", [DEFAULT, 0.9], ids=["default-momentum", "momentum-0.9"])
@pytest.mark.parametrize("name", ["equinox", "equinox_batch"])
def test_numpy_layer_is_equinox(name, momentum):
    record = LIBRARY_CONVENTIONS[name]
    m = record.default_momentum if momentum is DEFAULT else momentum
    options = {} if momentum is DEFAULT else {"momentum": momentum}
    rng = np.random.default_rng(1)
    gamma, beta = rng.normal(1.0, 0.5, 3), rng.normal(0.0, 1.0, 3)
    module, state = equinox_layer(3, "batch" if name == "equinox_batch" else "ema", **options)
    module = eqx.tree_at(lambda mod: (mod.weight, mod.bias), module,
                         (jnp.asarray(gamma), jnp.asarray(beta)))
    layer = bn.BatchNorm(3, convention=name, dtype=np.float64, **options)
    layer.weight, layer.bias = gamma.copy(), beta.copy()
    assert (layer.momentum, layer.eps, layer.axis) == (m, record.default_eps, 1)
    xs = batches((6, 3, 4), 2)
    axis = record.default_axis
    initial = (layer.running_mean.copy(), layer.running_var.copy())
    for step, x in enumerate(xs[:STEPS], start=1):
        y_eqx, state = equinox_call(module, state, x, training=True)
        y_ours = layer(x, training=True)
        stats = ChannelStats.of(x, axis)
        assert_close(y_ours, y_eqx, output_tolerance(x, axis, gamma, beta, record.default_eps,
                                                     stats.mean, stats.var, True),
                     f"training output, step {step}")
    assert layer.num_batches_tracked == STEPS
    if name == "equinox_batch":
        assert int(state.get(module.batch_counter)) == STEPS
    mean_bound, var_bound = stored_tolerances(record, m, xs[:STEPS], axis, initial)
    stored_mean, stored_var = equinox_stored(module, state)
    assert_close(layer.running_mean, stored_mean, mean_bound, "stored running mean")
    assert_close(layer.running_var, stored_var, var_bound, "stored running var")
    # The record's recurrence, replayed in pure Python, is the library's too.
    batch_means = [ChannelStats.of(x, axis).mean for x in xs[:STEPS]]
    batch_vars = [ChannelStats.of(x, axis).var for x in xs[:STEPS]]
    assert_close(record.stored_after(batch_means, m, initial[0]), stored_mean, mean_bound,
                 "record.stored_after (mean)")
    assert_close(record.stored_after(batch_vars, m, initial[1]), stored_var, var_bound,
                 "record.stored_after (var)")
    # Inference: equinox_batch divides by 1 - m^k, equinox uses the stored statistics.
    divisor = record.inference_divisor(m, STEPS)
    assert (divisor == 1.0) == (name == "equinox")
    mean, var = layer.inference_statistics()
    assert_close(mean, stored_mean / divisor,
                 debiased_tolerance(mean_bound, record, m, STEPS, mean), "inference mean")
    assert_close(var, stored_var / divisor,
                 debiased_tolerance(var_bound, record, m, STEPS, var), "inference var")
    x = xs[STEPS]
    y_eqx, _ = equinox_call(module, state, x, training=False)
    assert_close(layer(x, training=False), y_eqx,
                 output_tolerance(x, axis, gamma, beta, record.default_eps, mean, var, False),
                 "inference output")


@pytest.mark.parametrize("decay_rate", [0.9, 0.99])
def test_numpy_layer_is_haiku(decay_rate):
    rng = np.random.default_rng(3)
    gamma, beta = rng.normal(1.0, 0.5, 3), rng.normal(0.0, 1.0, 3)
    forward = haiku_layer(decay_rate)
    xs = batches((5, 4, 3), 4)  # channels last, haiku's default
    params, state = forward.init(None, jnp.asarray(xs[0]), True)
    params = {"batch_norm": {"scale": jnp.asarray(gamma.reshape(1, 1, 3)),
                             "offset": jnp.asarray(beta.reshape(1, 1, 3))}}
    with pytest.raises(ValueError, match="momentum is required under the 'haiku' convention"):
        bn.BatchNorm(3, convention="haiku")
    layer = bn.BatchNorm(3, convention="haiku", momentum=decay_rate, dtype=np.float64)
    layer.weight, layer.bias = gamma.copy(), beta.copy()
    assert (layer.eps, layer.axis) == (HAIKU.default_eps, -1)
    axis = 2
    initial = (layer.running_mean.copy(), layer.running_var.copy())
    for step, x in enumerate(xs[:STEPS], start=1):
        y_hk, state = forward.apply(params, state, None, jnp.asarray(x), True)
        y_ours = layer(x, training=True)
        stats = ChannelStats.of(x, axis)
        assert_close(y_ours, np.asarray(y_hk),
                     output_tolerance(x, axis, gamma, beta, HAIKU.default_eps, stats.mean,
                                      stats.var, True), f"training output, step {step}")
    mean_ema, var_ema = state["batch_norm/~/mean_ema"], state["batch_norm/~/var_ema"]
    assert int(mean_ema["counter"]) == int(var_ema["counter"]) == layer.num_batches_tracked
    mean_bound, var_bound = stored_tolerances(HAIKU, decay_rate, xs[:STEPS], axis, initial)
    assert_close(layer.running_mean, np.asarray(mean_ema["hidden"]).ravel(), mean_bound,
                 "stored mean (hidden)")
    assert_close(layer.running_var, np.asarray(var_ema["hidden"]).ravel(), var_bound,
                 "stored var (hidden)")
    mean, var = layer.inference_statistics()
    mean_tolerance = debiased_tolerance(mean_bound, HAIKU, decay_rate, STEPS, mean)
    assert_close(mean, np.asarray(mean_ema["average"]).ravel(), mean_tolerance,
                 "inference mean (average)")
    assert_close(var, np.asarray(var_ema["average"]).ravel(),
                 debiased_tolerance(var_bound, HAIKU, decay_rate, STEPS, var),
                 "inference var (average)")
    # Zero-debiased from 0, the average is a weighted mean of the batch statistics: step i
    # weighs (1 - d) d^(k - i) / (1 - d^k), and these weights sum to 1.
    batch_means = [ChannelStats.of(x, axis).mean for x in xs[:STEPS]]
    divisor = HAIKU.inference_divisor(decay_rate, STEPS)
    weights = [(1 - decay_rate) * decay_rate ** (STEPS - i) / divisor
               for i in range(1, STEPS + 1)]
    assert_close(HAIKU.running_after(batch_means, decay_rate, 0.0),
                 sum(w * b for w, b in zip(weights, batch_means, strict=True)),
                 mean_tolerance, "record.running_after")
    x = xs[STEPS]
    y_hk, _ = forward.apply(params, state, None, jnp.asarray(x), False)
    assert_close(layer(x, training=False), np.asarray(y_hk),
                 output_tolerance(x, axis, gamma, beta, HAIKU.default_eps, mean, var, False),
                 "inference output")


# -- the quirks, measured -------------------------------------------------------------------
def test_equinox_batch_mode_debiases_a_variance_that_started_at_one():
    """Equinox mode="batch" starts its stored variance at 1 and still divides by 1 - m^k, so
    its inference variance carries an extra m^k / (1 - m^k): measured here at the default
    m = 0.99 after 3 steps, 32.67 on top of batch variances near 4 (Haiku's starts at 0, which
    the division cancels)."""
    xs = batches((6, 2, 3), 5)[:STEPS]
    module, state = equinox_layer(2, "batch")
    for x in xs:
        _, state = equinox_call(module, state, x, training=True)
    m = EQUINOX_BATCH.default_momentum
    divisor = EQUINOX_BATCH.inference_divisor(m, STEPS)
    inference_var = equinox_stored(module, state)[1] / divisor
    batch_vars = [ChannelStats.of(x, 1).var for x in xs]
    from_zero = EQUINOX_BATCH.running_after(batch_vars, m, 0.0)
    extra = m**STEPS / (1 - m**STEPS)
    assert_close(inference_var - from_zero, np.full(2, extra),
                 SAFETY * 4 * UNIT_ROUNDOFF["float64"] * (inference_var + extra),
                 "extra inference variance")
    assert f"{extra:.4g}" == "32.67"  # the number quoted above and in docs/conventions.md
    layer = bn.BatchNorm(2, convention="equinox_batch", dtype=np.float64)
    for x in xs:
        layer(x, training=True)
    assert_close(layer.inference_statistics()[1], inference_var,
                 SAFETY * 4 * UNIT_ROUNDOFF["float64"] * inference_var,
                 "bnref's inference variance keeps the quirk")


@pytest.mark.parametrize("name", ["equinox", "equinox_batch"])
def test_a_fresh_equinox_layer_in_inference(name):
    """Before any training step mode="ema" normalises with its zero buffers (y = x /
    sqrt(eps): Equinox issue #955) and mode="batch" with (0, 1); bnref's layer does the same."""
    x = batches((4, 2, 3), 6)[0]
    module, state = equinox_layer(2, "batch" if name == "equinox_batch" else "ema",
                                  channelwise_affine=False)
    y_eqx, _ = equinox_call(module, state, x, training=False)
    layer = bn.BatchNorm(2, convention=name, affine=False, dtype=np.float64)
    var = np.full(2, LIBRARY_CONVENTIONS[name].initial_running_var)
    assert_close(layer(x, training=False), y_eqx,
                 output_tolerance(x, 1, None, None, 1e-5, np.zeros(2), var, False),
                 "fresh inference output")
    expected = x / np.sqrt(var.reshape(1, 2, 1) + 1e-5)
    assert_close(y_eqx, expected, output_tolerance(x, 1, None, None, 1e-5, np.zeros(2), var,
                                                   False), "y = x / sqrt(var0 + eps)")


def test_haiku_one_pass_variance_fails_at_large_offsets_and_bnref_does_not():
    """hk.BatchNorm computes the batch variance as mean(x²) - mean(x)², with no clamp. Measured
    here (float32, 256 values per channel at offset 1e4, spread 1, the Flax pin's batch): the
    variances it finds are [-8, -16, 8, 0] where the true ones are ~1 (E[x²] ~ 1e8 has a
    spacing of 8), so two of four channels come out NaN and the others off by ~1.05e3; bnref's
    two-pass output is off by ~2.2e-7, and Equinox's (two-pass) by ~5e-4."""
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((256, 4))).astype(np.float32)
    x64 = x.astype(np.float64)
    truth = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    forward = hk.transform_with_state(lambda v: hk.BatchNorm(False, False, 0.9)(v, True))
    params, state = forward.init(None, jnp.asarray(x))
    y_hk, state = forward.apply(params, state, None, jnp.asarray(x))
    y_hk = np.asarray(y_hk, np.float64)
    one_pass = np.asarray(jnp.mean(jnp.asarray(x) ** 2, 0) - jnp.mean(jnp.asarray(x), 0) ** 2)
    haiku_var = np.asarray(state["batch_norm/~/var_ema"]["average"]).ravel()
    np.testing.assert_array_equal(haiku_var, one_pass)  # the formula, to the bit
    assert (haiku_var <= 0).sum() == 3 and np.isnan(y_hk).any(axis=0).sum() == 2
    haiku_error = float(np.nanmax(np.abs(y_hk - truth)))
    assert haiku_error > 1e3, haiku_error
    stats = ChannelStats.of(x, 1)
    tolerance = forward_tolerance(x, 1, gamma=None, beta=None, eps=1e-5, mean=stats.mean,
                                  var=stats.var, batch_stats=True)
    y_ours = bn.batch_norm(x, None, None, None, None, training=True, axis=-1)[0]
    ours = assert_close(y_ours, truth, tolerance, "bnref two-pass output")
    assert ours.max_error * 1e6 < haiku_error, (ours.max_error, haiku_error)
    module, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        4, "batch", channelwise_affine=False, mode="batch", dtype=jnp.float32)
    y_eqx = np.asarray(jax.vmap(module, axis_name="batch", in_axes=(0, None),
                                out_axes=(0, None))(jnp.asarray(x), eqx_state)[0], np.float64)
    assert_close(y_eqx, truth, tolerance, "equinox output (two-pass)")


@pytest.mark.parametrize("name", ["flax", "equinox", "haiku"])
def test_one_pass_variance_flag_is_the_library(name):
    """The record's ``one_pass_variance`` is what the library computes: its training batch
    variance at offset 1e4 in float32 equals E[x²]−E[x]² to the bit (one-pass; Flax clamps it
    at 0) or is within the tolerance policy's bound of the true one (two-pass)."""
    import flax.linen as nn

    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((256, 4))).astype(np.float32)
    if name == "flax":
        module = nn.BatchNorm(use_running_average=False, momentum=0.0)
        variables = module.init(jax.random.key(0), jnp.asarray(x))
        _, updates = module.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        var = np.asarray(updates["batch_stats"]["var"])
    elif name == "equinox":
        module, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            4, "batch", channelwise_affine=False, mode="ema", dtype=jnp.float32)
        x_first = x.reshape(256, 4, 1)  # equinox takes (C, *spatial) per example
        _, state = jax.vmap(module, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(jnp.asarray(x_first), state)
        var = np.asarray(state.get(module.ema_state_index)[1])  # seeded: the batch variance
    else:
        forward = hk.transform_with_state(lambda v: hk.BatchNorm(False, False, 0.0)(v, True))
        params, state = forward.init(None, jnp.asarray(x))
        _, state = forward.apply(params, state, None, jnp.asarray(x))
        var = np.asarray(state["batch_norm/~/var_ema"]["average"]).ravel()
    one_pass = np.asarray(jnp.mean(jnp.asarray(x) ** 2, 0) - jnp.mean(jnp.asarray(x), 0) ** 2)
    stats = ChannelStats.of(x, 1)
    _, var_bound = running_stat_tolerances(x, 1, old_mean=np.zeros(4), old_var=np.ones(4),
                                           new_value_weight=1.0, stat_dtype="float32")
    two_pass = bool(np.all(np.abs(var - stats.var) <= var_bound))
    # Flax clamps the one-pass variance at 0 (jnp.maximum); Haiku does not.
    clamped = np.maximum(one_pass, 0) if name == "flax" else one_pass
    assert two_pass != bool(np.array_equal(var, clamped))
    record = get_convention(name)
    assert record.one_pass_variance == (not two_pass)


# -- the other backends refuse the step-count rules -----------------------------------------
@pytest.mark.parametrize("name", sorted(LIBRARY_CONVENTIONS))
def test_the_jax_backend_refuses_step_count_rules(name):
    """bnref.jax (like every backend but the numpy layer) runs the plain moving average only:
    a library convention is refused, not silently run as the plain rule."""
    import bnref.jax as bj

    with pytest.raises(ValueError, match=f"convention '{name}' .*bnref.numpy.BatchNorm"):
        bj.batch_norm(jnp.ones((4, 3)), None, None, jnp.zeros(3), jnp.ones(3), training=True,
                      momentum=0.9, convention=name)
    with pytest.raises(ValueError, match="this layer runs the plain moving average only"):
        bj.BatchNorm(3, momentum=0.9, convention=name)


def test_library_conventions_are_not_drawn_by_the_backends():
    """The property suites draw from CONVENTIONS, the five frameworks every backend runs."""
    from bnref.testing.backends import Backend

    assert not set(LIBRARY_CONVENTIONS) & set(CONVENTIONS)
    assert set(Backend.conventions) == set(CONVENTIONS)
    assert all(c.is_plain for c in CONVENTIONS.values())


def test_translation_into_haiku_names_the_rules_that_do_not_carry_over():
    t = translate_hyperparameters("torch", "haiku", ndim=4, momentum=0.1)
    assert t.momentum == pytest.approx(0.9) and t.axis == 3
    assert any("1 - d^k" in note for note in t.notes)
    t = translate_hyperparameters("equinox_batch", "haiku", ndim=4)
    assert any("starts at 1 in equinox_batch and 0 in haiku" in note for note in t.notes)
    with pytest.raises(ValueError, match=r"haiku\.BatchNorm has no default decay_rate"):
        translate_hyperparameters("haiku", "torch", ndim=4)
