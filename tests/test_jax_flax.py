"""``bnref.jax.flax``: bnref's math as a ``flax.linen`` and a ``flax.nnx`` module, drop-ins for
Flax's own ``BatchNorm`` (``use_fast_variance=False``, the stable variance bnref always uses).

What is checked: the constructors and defaults are Flax's; variables (linen) and state (nnx)
move between Flax's module and bnref's unchanged, in both directions; the dtype rules are
Flax's; the modules work under ``jax.jit``/``nnx.jit``, in ``nn.Sequential``, in a compact
parent and through ``nnx.split``/``merge``; a small MLP trains for 5 optax SGD steps exactly as
with Flax's layer in float64; what is not supported says so.

Tolerances. A single batch-norm call is compared with Flax's through the per-call bounds of
``bnref.testing.tolerances`` (twice the bound: each side is within it of the exact result). The
trained MLP is compared through ``rounding_spread``/``model_tolerance``: Flax's model trained a
second time on the same batches with their rows permuted (the same loss and gradients, summed
in another order) gives its own rounding spread.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import numpy as np
import pytest

from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import (
    assert_close,
    compare,
    forward_tolerance,
    model_tolerance,
    rounding_spread,
    running_stat_tolerances,
)

backend_or_skip("jax")  # skips this module without jax, fails it when jax is required
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402  (a dependency of flax)
from flax import nnx  # noqa: E402
from jax.experimental import enable_x64  # noqa: E402

import bnref.jax.flax as bf  # noqa: E402

APIS = ["linen", "nnx"]
by_api = pytest.mark.parametrize("api", APIS)


def linen_builtin(**kwargs) -> nn.BatchNorm:
    return nn.BatchNorm(use_fast_variance=False, **kwargs)


def nnx_builtin(num_features: int, **kwargs) -> nnx.BatchNorm:
    return nnx.BatchNorm(num_features, use_fast_variance=False, **kwargs)


def batch(shape=(8, 5, 3), dtype="float32", seed: int = 0, offset: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(offset, 3.0, shape).astype(dtype)


def as_numpy(tree) -> dict:
    return jax.tree.map(lambda a: np.asarray(a), tree)


def assert_same_values(got, expected, what: str) -> None:
    """Equal trees, dtypes and values (for what must be copied, not recomputed)."""
    assert jax.tree.structure(got) == jax.tree.structure(expected), what
    for have, want in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert have.dtype == want.dtype, f"{what}: {have.dtype} != {want.dtype}"
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want), err_msg=what)


def assert_bn_agrees(y, stats, y_flax, stats_flax, x, params, old_stats, *, momentum: float,
                     eps: float, training: bool, what: str) -> None:
    """One call of ours against one of Flax's: y within twice the forward bound, the running
    statistics within twice theirs (each implementation is within one bound of the truth)."""
    x = np.asarray(x)
    axis = x.ndim - 1
    reduced = tuple(range(x.ndim - 1))
    x64 = x.astype(np.float64)
    mean, var = ((x64.mean(reduced), x64.var(reduced)) if training else
                 (np.asarray(old_stats["mean"], np.float64), np.asarray(old_stats["var"],
                                                                       np.float64)))
    gamma, beta = (None if params.get(k) is None else np.asarray(params[k])
                   for k in ("scale", "bias"))
    tol = 2 * forward_tolerance(x, axis, gamma=gamma, beta=beta, eps=eps, mean=mean, var=var,
                                batch_stats=training)
    assert np.asarray(y).dtype == np.asarray(y_flax).dtype, what
    assert_close(np.asarray(y), np.asarray(y_flax), tol, f"{what}: y")
    if not training or stats is None:
        return
    mean_tol, var_tol = running_stat_tolerances(
        x, axis, old_mean=np.asarray(old_stats["mean"], np.float64),
        old_var=np.asarray(old_stats["var"], np.float64), new_value_weight=1 - momentum,
        stat_dtype=np.asarray(stats_flax["mean"]).dtype.name)
    for key, bound in (("mean", mean_tol), ("var", var_tol)):
        assert np.asarray(stats[key]).dtype == np.asarray(stats_flax[key]).dtype, what
        assert_close(np.asarray(stats[key]), np.asarray(stats_flax[key]), 2 * bound,
                     f"{what}: {key}")


# --- 1. the constructors are Flax's ----------------------------------------------------------

def test_linen_module_has_every_field_of_flax_linen_batchnorm_with_its_defaults():
    ours, theirs = bf.BatchNorm(), nn.BatchNorm()
    assert isinstance(ours, nn.Module)
    fields = {f.name for f in dataclasses.fields(nn.BatchNorm)} - {"parent", "name"}
    assert fields <= {f.name for f in dataclasses.fields(bf.BatchNorm)}
    for name in sorted(fields):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.convention == "flax"


def test_nnx_module_takes_every_argument_of_flax_nnx_batchnorm_with_its_defaults():
    theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
    ours = inspect.signature(bf.NNXBatchNorm.__init__).parameters
    assert set(theirs) <= set(ours)
    module, builtin = bf.NNXBatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert isinstance(module, nnx.Module)
    for name in sorted(set(theirs) - {"self", "rngs"}):
        assert getattr(module, name) == getattr(builtin, name), name


@by_api
def test_an_omitted_momentum_epsilon_and_axis_are_the_conventions(api):
    if api == "linen":
        module = bf.BatchNorm(convention="torch")
    else:
        module = bf.NNXBatchNorm(3, convention="torch", rngs=nnx.Rngs(0))
    assert (module.momentum, module.epsilon, module.axis) == (0.1, 1e-5, 1)


@pytest.mark.parametrize("mistake", ["eps-zero", "momentum-above-1", "unknown-convention"])
@by_api
def test_bad_arguments_are_refused_at_construction_with_bnrefs_messages(api, mistake):
    kwargs, error, message = {
        "eps-zero": ({"epsilon": 0.0}, ValueError, "eps must be a finite float > 0, got 0.0"),
        "momentum-above-1": ({"momentum": 1.5}, ValueError, "momentum must be in [0, 1], got 1.5"),
        "unknown-convention": ({"convention": "pytorch"}, ValueError, "convention must be one of"),
    }[mistake]
    with pytest.raises(error) as raised:
        if api == "linen":
            bf.BatchNorm(**kwargs)
        else:
            bf.NNXBatchNorm(3, rngs=nnx.Rngs(0), **kwargs)
    assert str(raised.value).startswith(message)


# --- 2. variables move between Flax's modules and bnref's unchanged ---------------------------

LAYOUTS = {
    "default": {},
    "bfloat16-params": {"param_dtype": jnp.bfloat16},
    "no-scale": {"use_scale": False},
    "no-bias-no-scale": {"use_bias": False, "use_scale": False},
    "stats-in-param-dtype": {"param_dtype": jnp.float16, "force_float32_reductions": False},
    "random-init": {"scale_init": jax.nn.initializers.normal(1.0),
                    "bias_init": jax.nn.initializers.uniform(1.0)},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_linen_init_gives_flax_linen_variables(layout):
    x = batch()
    kwargs = LAYOUTS[layout]
    ours = bf.BatchNorm(use_running_average=False, **kwargs).init(jax.random.key(1), x)
    theirs = linen_builtin(use_running_average=False, **kwargs).init(jax.random.key(1), x)
    assert_same_values(ours, theirs, layout)


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "stats-in-param-dtype"])
def test_nnx_module_has_flax_nnx_state(layout):
    kwargs = LAYOUTS[layout]
    ours = bf.NNXBatchNorm(3, rngs=nnx.Rngs(1), **kwargs)
    theirs = nnx_builtin(3, rngs=nnx.Rngs(1), **kwargs)
    assert_same_values(nnx.state(ours), nnx.state(theirs), layout)
    for name in ("scale", "bias", "mean", "var"):
        slot, builtin_slot = getattr(ours, name), getattr(theirs, name)
        assert type(slot) is type(builtin_slot), name  # Param, BatchStat, or None


def _trained_linen_variables(x):
    """Flax linen variables away from their initial values (random scale/bias, moved stats)."""
    rng = np.random.default_rng(7)
    channels = x.shape[-1]
    return {"params": {"scale": jnp.asarray(rng.normal(1, 0.5, channels), jnp.float32),
                       "bias": jnp.asarray(rng.normal(0, 1, channels), jnp.float32)},
            "batch_stats": {"mean": jnp.asarray(rng.normal(0, 1, channels), jnp.float32),
                            "var": jnp.asarray(rng.uniform(0.5, 2, channels), jnp.float32)}}


def test_linen_variables_go_back_and_forth_with_flax_linen_batchnorm():
    """Three training steps, alternating: Flax's variables into ours, ours into Flax's."""
    momentum = 0.8
    ours, theirs = (bf.BatchNorm(use_running_average=False, momentum=momentum),
                    linen_builtin(use_running_average=False, momentum=momentum))
    variables = _trained_linen_variables(batch())
    for step in range(3):
        x = batch(seed=step)
        y, updates = ours.apply(variables, x, mutable=["batch_stats"])
        y_flax, updates_flax = theirs.apply(variables, x, mutable=["batch_stats"])
        assert_bn_agrees(y, updates["batch_stats"], y_flax, updates_flax["batch_stats"], x,
                         variables["params"], variables["batch_stats"], momentum=momentum,
                         eps=1e-5, training=True, what=f"step {step}")
        assert jax.tree.structure(updates) == jax.tree.structure(updates_flax)
        source = updates if step % 2 == 0 else updates_flax
        variables = {**variables, **source}
    x = batch(seed=9)
    y = bf.BatchNorm(use_running_average=True).apply(variables, x)
    y_flax = linen_builtin(use_running_average=True).apply(variables, x)
    assert_bn_agrees(y, None, y_flax, None, x, variables["params"], variables["batch_stats"],
                     momentum=momentum, eps=1e-5, training=False, what="inference")


def test_nnx_state_goes_back_and_forth_with_flax_nnx_batchnorm():
    momentum = 0.8
    ours = bf.NNXBatchNorm(3, momentum=momentum, rngs=nnx.Rngs(0))
    theirs = nnx_builtin(3, momentum=momentum, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(7)  # a trained-looking scale and bias, to be carried over
    theirs.scale.value = jnp.asarray(rng.normal(1, 0.5, 3), jnp.float32)
    theirs.bias.value = jnp.asarray(rng.normal(0, 1, 3), jnp.float32)
    for step in range(3):
        x = batch(seed=step)
        source, target = (theirs, ours) if step % 2 == 0 else (ours, theirs)
        nnx.update(target, nnx.state(source))
        params = {"scale": ours.scale.value, "bias": ours.bias.value}
        old = {"mean": ours.mean.value, "var": ours.var.value}
        y, y_flax = ours(x), theirs(x)
        assert_bn_agrees(y, {"mean": ours.mean.value, "var": ours.var.value}, y_flax,
                         {"mean": theirs.mean.value, "var": theirs.var.value}, x, params, old,
                         momentum=momentum, eps=1e-5, training=True, what=f"step {step}")
    nnx.update(ours, nnx.state(theirs))
    ours.eval()
    theirs.eval()
    x = batch(seed=9)
    assert_bn_agrees(ours(x), None, theirs(x), None, x,
                     {"scale": ours.scale.value, "bias": ours.bias.value},
                     {"mean": ours.mean.value, "var": ours.var.value}, momentum=momentum,
                     eps=1e-5, training=False, what="eval()")


# Flax's dtype rules (linen/normalization.py, _compute_stats and _normalize): (x, param_dtype,
# dtype) -> the output's dtype and the statistics' (computed, then stored after a step).
DTYPE_CASES = {
    "bfloat16-x-float32-params": ("bfloat16", jnp.float32, None, "float32", "float32"),
    "float32-x-bfloat16-result": ("float32", jnp.float32, jnp.bfloat16, "bfloat16", "float32"),
    "float32-x-float64-params": ("float32", jnp.float64, None, "float64", "float32"),
    "float64-x-float32-params": ("float64", jnp.float32, None, "float64", "float64"),
    "float16-x-float16-params": ("float16", jnp.float16, None, "float16", "float32"),
}


@pytest.mark.parametrize("case", list(DTYPE_CASES))
@by_api
def test_dtypes_follow_flaxs_rules(api, case):
    x_dtype, param_dtype, dtype, y_dtype, stats_dtype = DTYPE_CASES[case]
    x = batch(dtype=x_dtype)
    kwargs = {"param_dtype": param_dtype, "dtype": dtype}
    if api == "linen":
        variables = linen_builtin(**kwargs).init(jax.random.key(0), x, use_running_average=False)
        results = [module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
                   for module in (bf.BatchNorm(**kwargs), linen_builtin(**kwargs))]
        (y, updates), (y_flax, updates_flax) = results
        stats, stats_flax = updates["batch_stats"], updates_flax["batch_stats"]
        params = variables["params"]
    else:
        modules = (bf.NNXBatchNorm(3, rngs=nnx.Rngs(0), **kwargs),
                   nnx_builtin(3, rngs=nnx.Rngs(0), **kwargs))
        params = {"scale": modules[0].scale.value, "bias": modules[0].bias.value}
        y, y_flax = (module(x) for module in modules)
        stats, stats_flax = ({"mean": m.mean.value, "var": m.var.value} for m in modules)
    assert (y.dtype, y_flax.dtype) == (y_dtype, y_dtype)
    assert {stats["mean"].dtype, stats_flax["mean"].dtype, stats_flax["var"].dtype,
            stats["var"].dtype} == {jnp.dtype(stats_dtype)}
    # The bound for x computed in the statistics' dtype and rounded to the output's: x in the
    # narrower of the two (the tolerance module takes both roundoffs from x's dtype).
    bound_dtype = max(stats_dtype, y_dtype, key=lambda d: float(jnp.finfo(d).eps))
    assert_bn_agrees(y, None, y_flax, None, x.astype(bound_dtype), params,
                     {"mean": np.zeros(3), "var": np.ones(3)}, momentum=0.99, eps=1e-5,
                     training=True, what=case)
    # The statistics against the exact update rather than Flax's, which rounds its first
    # float64 update of float32 statistics (the next test).
    assert_first_update_is_exact(stats, x.astype(stats_dtype), "bnref", check=True)


def test_linen_without_float32_reductions_keeps_flaxs_dtypes_but_reduces_in_float32():
    """force_float32_reductions=False: Flax keeps float16 statistics and computes them in
    float16; bnref stores the same dtypes but reduces in float32 (its contract), so its result
    is within bnref's float16 bound of the exact one."""
    x = batch(dtype="float16")
    kwargs = {"param_dtype": jnp.float16, "force_float32_reductions": False}
    variables = linen_builtin(**kwargs).init(jax.random.key(0), x, use_running_average=False)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float16)}
    (y, updates), (y_flax, updates_flax) = (
        module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        for module in (bf.BatchNorm(**kwargs), linen_builtin(**kwargs)))
    assert y.dtype == y_flax.dtype == jnp.float16
    assert jax.tree.map(lambda a: a.dtype, updates) == jax.tree.map(lambda a: a.dtype,
                                                                     updates_flax)
    x64 = x.astype(np.float64)
    mean, var = x64.mean((0, 1)), x64.var((0, 1))
    assert_close(np.asarray(y), (x64 - mean) / np.sqrt(var + 1e-5),
                 forward_tolerance(x, 2, gamma=None, beta=None, eps=1e-5, mean=mean, var=var,
                                   batch_stats=True), "float16 y")
    assert_first_update_is_exact(updates["batch_stats"], x, "float16 stats", check=True)


def assert_first_update_is_exact(stats, x, what: str, *, check: bool):
    """``0.99 * old + 0.01 * batch`` from mean 0, var 1, within the running-statistic bound;
    returns whether the variance is (``check=False``) or asserts it (``check=True``)."""
    x = np.asarray(x)
    x64 = x.astype(np.float64).reshape(-1, x.shape[-1])
    mean_tol, var_tol = running_stat_tolerances(
        x, x.ndim - 1, old_mean=np.zeros(3), old_var=np.ones(3), new_value_weight=0.01,
        stat_dtype=np.asarray(stats["mean"]).dtype.name)
    assert_close(np.asarray(stats["mean"]), 0.01 * x64.mean(0), mean_tol, f"{what}: mean")
    result = compare(np.asarray(stats["var"]), 0.99 + 0.01 * x64.var(0), var_tol, f"{what}: var")
    if check:
        assert result.passed, str(result)
    return result


@by_api
def test_flax_rounds_its_first_float64_update_of_float32_statistics_and_bnref_does_not(api):
    """A known difference, pinned: Flax creates ``batch_stats`` in float32, and its first update
    from a float64 batch computes ``momentum * old`` in float32 (flax 0.12: ``self.momentum *
    ra_var.value`` with a Python float momentum stays float32), so the float64 variance it stores
    is off by float32 rounding (~1e-8 relative). bnref computes the whole update in float64.
    Both store float64 from then on, so only the first step differs; the float64 MLP below
    starts from float64 statistics to compare the training itself."""
    x = batch(dtype="float64")
    if api == "linen":
        variables = linen_builtin().init(jax.random.key(0), x, use_running_average=False)
        stats = {name: module.apply(variables, x, use_running_average=False,
                                    mutable=["batch_stats"])[1]["batch_stats"]
                 for name, module in (("bnref", bf.BatchNorm()), ("flax", linen_builtin()))}
    else:
        modules = {"bnref": bf.NNXBatchNorm(3, rngs=nnx.Rngs(0)),
                   "flax": nnx_builtin(3, rngs=nnx.Rngs(0))}
        for module in modules.values():
            module(x)
        stats = {name: {"mean": m.mean.value, "var": m.var.value} for name, m in modules.items()}
    assert {v.dtype for group in stats.values() for v in group.values()} == {
        jnp.dtype(jnp.float64)}
    assert_first_update_is_exact(stats["bnref"], x, "bnref", check=True)
    flax_var = assert_first_update_is_exact(stats["flax"], x, "flax", check=False)
    assert not flax_var.passed, "Flax's first float64 update is exact now: drop this difference"
    float32_bound = running_stat_tolerances(x.astype(np.float32), 2, old_mean=np.zeros(3),
                                            old_var=np.ones(3), new_value_weight=0.01,
                                            stat_dtype="float32")[1]
    assert flax_var.deciding_error <= float32_bound.max(), str(flax_var)


# --- 3. call-time mode, jit, Sequential, compact parents, nnx transforms ---------------------

@pytest.mark.parametrize("given", ["constructor", "call"])
def test_linen_use_running_average_at_construction_or_call_time(given):
    x = batch()
    variables = _trained_linen_variables(x)
    for use_running_average in (False, True):
        if given == "constructor":
            ours = bf.BatchNorm(use_running_average=use_running_average)
            theirs = linen_builtin(use_running_average=use_running_average)
            call = {}
        else:
            ours, theirs, call = bf.BatchNorm(), linen_builtin(), {
                "use_running_average": use_running_average}
        y, updates = ours.apply(variables, x, mutable=["batch_stats"], **call)
        y_flax, updates_flax = theirs.apply(variables, x, mutable=["batch_stats"], **call)
        assert_bn_agrees(y, updates["batch_stats"], y_flax, updates_flax["batch_stats"], x,
                         variables["params"], variables["batch_stats"], momentum=0.99,
                         eps=1e-5, training=not use_running_average,
                         what=f"use_running_average={use_running_average}")
        if use_running_average:
            assert_same_values(updates, {"batch_stats": variables["batch_stats"]},
                               "inference leaves batch_stats")


def test_linen_use_running_average_given_twice_or_never_is_flaxs_error():
    x = batch()
    variables = _trained_linen_variables(x)
    for ours, theirs, call in ((bf.BatchNorm(), linen_builtin(), {}),
                               (bf.BatchNorm(use_running_average=True),
                                linen_builtin(use_running_average=True),
                                {"use_running_average": False})):
        with pytest.raises(ValueError) as flax_error:
            theirs.apply(variables, x, **call)
        with pytest.raises(ValueError) as our_error:
            ours.apply(variables, x, **call)
        assert str(our_error.value) == str(flax_error.value)


def test_linen_module_under_jit_agrees_with_eager():
    x = batch()
    variables = _trained_linen_variables(x)
    module = bf.BatchNorm(use_running_average=False)
    apply = functools.partial(module.apply, mutable=["batch_stats"])
    y, updates = apply(variables, x)
    y_jit, updates_jit = jax.jit(apply)(variables, x)
    assert_bn_agrees(y_jit, updates_jit["batch_stats"], y, updates["batch_stats"], x,
                     variables["params"], variables["batch_stats"], momentum=0.99, eps=1e-5,
                     training=True, what="jit vs eager")


def test_linen_module_in_sequential_is_flaxs_under_jit():
    x = batch(shape=(16, 6))

    def model(norm):
        return nn.Sequential([nn.Dense(4), nn.relu, norm(use_running_average=False)])

    ours, theirs = model(bf.BatchNorm), model(linen_builtin)
    variables = theirs.init(jax.random.key(0), x)
    assert_same_values(ours.init(jax.random.key(0), x), variables, "Sequential init")
    assert set(variables["batch_stats"]) == {"layers_2"}
    y, updates = jax.jit(functools.partial(ours.apply, mutable=["batch_stats"]))(variables, x)
    y_flax, updates_flax = jax.jit(functools.partial(theirs.apply, mutable=["batch_stats"]))(
        variables, x)
    # What the BN layer saw: the Dense and relu are the same computation in both models.
    h = jax.nn.relu(nn.Dense(4).apply({"params": variables["params"]["layers_0"]}, x))
    assert_bn_agrees(y, updates["batch_stats"]["layers_2"], y_flax,
                     updates_flax["batch_stats"]["layers_2"], h, variables["params"]["layers_2"],
                     variables["batch_stats"]["layers_2"], momentum=0.99, eps=1e-5,
                     training=True, what="Sequential under jit")


def test_nnx_module_under_nnx_jit_agrees_with_eager_in_both_modes():
    x = batch()
    eager, jitted = (bf.NNXBatchNorm(3, momentum=0.8, rngs=nnx.Rngs(0)) for _ in range(2))
    call = nnx.jit(lambda module, x: module(x))
    for mode in ("train", "eval"):
        for module in (eager, jitted):
            getattr(module, mode)()
        old = {"mean": eager.mean.value, "var": eager.var.value}
        y, y_jit = eager(x), call(jitted, x)
        assert_bn_agrees(y_jit, {"mean": jitted.mean.value, "var": jitted.var.value}, y,
                         {"mean": eager.mean.value, "var": eager.var.value}, x,
                         {"scale": eager.scale.value, "bias": eager.bias.value}, old,
                         momentum=0.8, eps=1e-5, training=mode == "train", what=mode)
    assert not np.array_equal(np.asarray(jitted.mean.value), np.zeros(3)), "nnx.jit updated"


def test_nnx_split_and_merge_round_trip_and_run_functionally():
    x = batch()
    module = bf.NNXBatchNorm(3, momentum=0.8, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    assert set(params) == {"scale", "bias"} and set(stats) == {"mean", "var"}
    merged = nnx.merge(graphdef, params, stats)
    assert type(merged) is bf.NNXBatchNorm
    assert_same_values(nnx.state(merged), nnx.state(module), "merge(split(module))")

    @jax.jit
    def step(params, stats, x):  # the functional form of a stateful call
        module = nnx.merge(graphdef, params, stats)
        y = module(x)
        return y, nnx.state(module, nnx.BatchStat)

    y, new_stats = step(params, stats, x)
    y_eager = module(x)
    assert_bn_agrees(y, {k: v.value for k, v in new_stats.items()}, y_eager,
                     {"mean": module.mean.value, "var": module.var.value}, x,
                     {"scale": module.scale.value, "bias": module.bias.value},
                     {k: v.value for k, v in stats.items()}, momentum=0.8, eps=1e-5,
                     training=True, what="split/merge under jit")


@by_api
def test_cumulative_average_keeps_a_batch_counter(api):
    """momentum=None: PyTorch's cumulative average, with num_batches_tracked in batch_stats."""
    batches = [batch(seed=s) for s in range(3)]
    if api == "linen":
        module = bf.BatchNorm(use_running_average=False, momentum=None)
        variables = module.init(jax.random.key(0), batches[0])
        apply = jax.jit(functools.partial(module.apply, mutable=["batch_stats"]))
        for x in batches:
            _, updates = apply(variables, x)
            variables = {**variables, **updates}
        stats = variables["batch_stats"]
    else:
        module = bf.NNXBatchNorm(3, momentum=None, rngs=nnx.Rngs(0))
        call = nnx.jit(lambda module, x: module(x))
        for x in batches:
            call(module, x)
        stats = {k: v.value for k, v in nnx.state(module, nnx.BatchStat).items()}
    assert int(stats["num_batches_tracked"]) == 3
    expected = np.mean([x.astype(np.float64).mean((0, 1)) for x in batches], axis=0)
    x_all = np.concatenate(batches)
    mean_tol, _ = running_stat_tolerances(x_all, 2, old_mean=np.zeros(3), old_var=np.ones(3),
                                          new_value_weight=1.0, stat_dtype="float32")
    assert_close(np.asarray(stats["mean"]), expected, 3 * mean_tol, "cumulative mean")


# --- 4. numpy in, what JAX refuses out -------------------------------------------------------

@by_api
def test_numpy_inputs_and_variables_are_taken_as_flax_takes_them(api):
    x = batch()
    if api == "linen":
        variables = _trained_linen_variables(x)
        module = bf.BatchNorm(use_running_average=False)
        y, updates = module.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        y_np, updates_np = module.apply(as_numpy(variables), x, mutable=["batch_stats"])
        assert_same_values(updates_np, updates, "numpy variables and input, eager")

        def under_jit(variables):  # the variables are constants inside the trace
            return jax.jit(lambda x: module.apply(variables, x, mutable=["batch_stats"]))(x)

        assert_same_values(under_jit(as_numpy(variables)), under_jit(variables),
                           "numpy variables under jit")
    else:
        module, reference = (bf.NNXBatchNorm(3, rngs=nnx.Rngs(0)) for _ in range(2))
        y, y_np = reference(jnp.asarray(x)), module(x)
        assert_same_values(nnx.state(module), nnx.state(reference), "state after a numpy x")
    assert_same_values(y_np, y, "y from numpy")


def _torch_tensor():
    return pytest.importorskip("torch").ones((4, 3))


@pytest.mark.parametrize("refused", ["torch-tensor", "list"])
@by_api
def test_an_input_jax_refuses_gets_bnrefs_type_error(api, refused):
    x = _torch_tensor() if refused == "torch-tensor" else [[1.0, 2.0, 3.0]] * 4
    kind = "torch.Tensor" if refused == "torch-tensor" else "builtins.list"
    # (match, not equality: JAX appends a note on its filtered traceback inside linen's apply)
    with pytest.raises(TypeError, match=f"^x must be a jax.Array or numpy.ndarray, got {kind}"):
        if api == "linen":
            bf.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
        else:
            bf.NNXBatchNorm(3, rngs=nnx.Rngs(0))(x)


def test_linen_variables_jax_refuses_get_bnrefs_type_error():
    x = batch()
    variables = _trained_linen_variables(x)
    variables["batch_stats"]["var"] = np.ones(3, np.int32)
    with pytest.raises(TypeError, match=r"^running_var must have a floating dtype .* got int32"):
        bf.BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])


# --- 5. what is not supported says so; what is ignored is harmless ---------------------------

# axis_name/axis_index_groups (synchronized batch norm): tests/test_jax_sync.py.


@by_api
def test_a_mask_raises_not_implemented(api):
    x = batch()
    mask = np.ones(x.shape, bool)
    with pytest.raises(NotImplementedError, match="mask="):
        if api == "linen":
            bf.BatchNorm(use_running_average=False).init(jax.random.key(0), x, mask=mask)
        else:
            bf.NNXBatchNorm(3, rngs=nnx.Rngs(0))(x, mask=mask)


@by_api
def test_use_fast_variance_is_ignored_the_variance_stays_two_pass(api):
    """At offset 1e4 in float32 Flax's use_fast_variance=True loses the variance entirely
    (tests/test_jax.py); bnref's modules give the two-pass result whatever the flag says."""
    x = batch(shape=(256, 4), offset=1e4)
    results = []
    for fast in (True, False):
        if api == "linen":
            module = bf.BatchNorm(use_running_average=False, use_fast_variance=fast)
            variables = module.init(jax.random.key(0), x)
            results.append(module.apply(variables, x, mutable=["batch_stats"]))
        else:
            module = bf.NNXBatchNorm(4, use_fast_variance=fast, rngs=nnx.Rngs(0))
            results.append((module(x), {"batch_stats": {"mean": module.mean.value,
                                                        "var": module.var.value}}))
    assert_same_values(results[0], results[1], "use_fast_variance=True vs False")
    y = np.asarray(results[0][0])
    x64 = x.astype(np.float64)
    truth = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    tol = forward_tolerance(x, 1, gamma=None, beta=None, eps=1e-5, mean=x64.mean(0),
                            var=x64.var(0), batch_stats=True)
    assert_close(y, truth, tol, "two-pass at offset 1e4")


# --- 6. a small MLP trains as with Flax's layer, in float64 ----------------------------------

FEATURES, HIDDEN, CLASSES, BATCH, STEPS = 10, 16, 4, 32, 5
LEARNING_RATE, SGD_MOMENTUM = 0.1, 0.9


class LinenMLP(nn.Module):
    """Dense -> BN -> relu -> Dense, in float64. The first Dense has no bias, as usual before a
    BN: its gradient would be zero up to rounding, a parameter made only of rounding noise."""

    norm: type[nn.Module]

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(HIDDEN, use_bias=False, param_dtype=jnp.float64)(x)
        x = self.norm(use_running_average=not train, param_dtype=jnp.float64)(x)
        return nn.Dense(CLASSES, param_dtype=jnp.float64)(nn.relu(x))


class NNXMLP(nnx.Module):
    """Linear -> BN -> relu -> Linear, in float64 (no bias before the BN, as LinenMLP)."""

    def __init__(self, norm: type[nnx.Module], rngs: nnx.Rngs) -> None:
        self.dense1 = nnx.Linear(FEATURES, HIDDEN, use_bias=False, param_dtype=jnp.float64,
                                 rngs=rngs)
        self.norm = norm(HIDDEN, param_dtype=jnp.float64, use_fast_variance=False, rngs=rngs)
        self.dense2 = nnx.Linear(HIDDEN, CLASSES, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.dense2(nnx.relu(self.norm(self.dense1(x))))


NORMS = {"linen": {"flax": linen_builtin, "bnref": bf.BatchNorm},
         "nnx": {"flax": nnx.BatchNorm, "bnref": bf.NNXBatchNorm}}


def training_batches(permuted: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(11)
    batches = [(rng.normal(1.0, 2.0, (BATCH, FEATURES)), rng.integers(0, CLASSES, BATCH))
               for _ in range(STEPS)]
    if not permuted:
        return batches
    permutation = np.random.default_rng(12).permutation(BATCH)
    return [(x[permutation], y[permutation]) for x, y in batches]


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_linen(norm, batches) -> dict[str, dict[str, np.ndarray]]:
    model = LinenMLP(norm)
    variables = model.init(jax.random.key(0), jnp.asarray(batches[0][0]), train=False)
    variables = {**variables, "batch_stats": jax.tree.map(lambda a: a.astype(jnp.float64),
                                                          variables["batch_stats"])}
    tx = optax.sgd(LEARNING_RATE, momentum=SGD_MOMENTUM)
    initial = as_numpy(variables)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
            return cross_entropy(logits, y), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state, losses = tx.init(params), []
    for x, y in batches:
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y)
        losses.append(loss)
    trained = {"params": params, "batch_stats": batch_stats}
    outputs = model.apply(trained, jnp.asarray(training_batches(False)[0][0]), train=False)
    return _flat(initial, losses, trained, outputs)


def train_nnx(norm, batches) -> dict[str, dict[str, np.ndarray]]:
    model = NNXMLP(norm, nnx.Rngs(0))
    for statistic in (model.norm.mean, model.norm.var):
        statistic.value = statistic.value.astype(jnp.float64)
    tx = optax.sgd(LEARNING_RATE, momentum=SGD_MOMENTUM)
    initial = as_numpy(nnx.to_pure_dict(nnx.state(model)))

    @nnx.jit
    def step(model, opt_state, x, y):
        loss, grads = nnx.value_and_grad(lambda model: cross_entropy(model(x), y))(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return loss, opt_state

    opt_state, losses = tx.init(nnx.state(model, nnx.Param)), []
    for x, y in batches:
        loss, opt_state = step(model, opt_state, x, y)
        losses.append(loss)
    model.eval()
    outputs = model(jnp.asarray(training_batches(False)[0][0]))
    state = nnx.to_pure_dict(nnx.state(model))
    trained = {"params": {k: v for k, v in state.items() if k != "norm"} | {
                   "norm": {k: state["norm"][k] for k in ("scale", "bias")}},
               "batch_stats": {"norm": {k: state["norm"][k] for k in ("mean", "var")}}}
    return _flat(initial, losses, trained, outputs)


def _flat(initial, losses, trained, outputs) -> dict[str, dict[str, np.ndarray]]:
    def flatten(tree):
        return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    return {"initial": flatten(initial), "losses": {"losses": np.asarray(losses)},
            "params": flatten(trained["params"]),
            "batch_stats": flatten(trained["batch_stats"]),
            "eval outputs": {"eval outputs": np.asarray(outputs)}}


@pytest.fixture(scope="module", params=APIS)
def trained(request):
    """Flax's MLP, bnref's, and Flax's again on row-permuted batches (the rounding reference),
    trained for 5 SGD steps in float64; x64 is enabled for these runs only. The batch
    statistics start as float64 zeros and ones (Flax creates them in float32 and rounds its
    first float64 update of them: pinned above)."""
    api = request.param
    train = train_linen if api == "linen" else train_nnx
    with enable_x64():
        results = {name: train(norm, training_batches(permuted=False))
                   for name, norm in NORMS[api].items()}
        results["reference"] = train(NORMS[api]["flax"], training_batches(permuted=True))
    parts = ("losses", "params", "batch_stats", "eval outputs")
    flat = {name: {f"{part}: {k}": v for part in parts for k, v in r[part].items()}
            for name, r in results.items()}
    return {"api": api, "results": results,
            "level": rounding_spread(flat["flax"], flat["reference"])}


def test_both_mlps_start_from_the_same_variables(trained):
    initial = trained["results"]
    assert_same_values(initial["bnref"]["initial"], initial["flax"]["initial"], "init")


@pytest.mark.parametrize("part", ["losses", "params", "batch_stats", "eval outputs"])
def test_mlp_trains_as_with_flaxs_batchnorm_in_float64(trained, part):
    got, expected = trained["results"]["bnref"][part], trained["results"]["flax"][part]
    assert got.keys() == expected.keys(), part
    for key, want in expected.items():
        assert got[key].dtype == want.dtype == np.float64, f"{part}: {key} {got[key].dtype}"
        assert_close(got[key], want, model_tolerance(want, trained["level"], "float64"),
                     f"{trained['api']} {part}: {key}")

