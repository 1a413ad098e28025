"""What only the JAX backend promises: Flax's defaults and variable layout, jit/vmap/grad, a
layer that works under jit, and where Flax's default fast variance goes wrong."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

from bnref.conventions import CONVENTIONS
from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import ChannelStats, assert_close, forward_tolerance

backend_or_skip("jax")  # skips this module without jax, fails it when jax is required
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import bnref.jax as bj  # noqa: E402
from tests.test_conventions import observe_one_step  # noqa: E402

RECORD = CONVENTIONS["flax"]


def test_flax_record_is_the_installed_defaults():
    module = nn.BatchNorm()
    assert (module.momentum, module.epsilon, module.axis) == (
        RECORD.default_momentum, RECORD.default_eps, RECORD.default_axis)
    layer = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert (layer.momentum, layer.epsilon, layer.axis) == (
        RECORD.default_momentum, RECORD.default_eps, RECORD.default_axis)
    variables = module.init(jax.random.key(0), jnp.ones((2, 3)), use_running_average=False)
    names = {f"{collection}/{key}" for collection, group in variables.items() for key in group}
    assert names == {RECORD.state_names[k] for k in ("gamma", "beta", "running_mean",
                                                     "running_var")}

    def step(x, momentum):
        bn = nn.BatchNorm(use_running_average=False, momentum=momentum)
        variables = bn.init(jax.random.key(0), jnp.asarray(x))
        _, updates = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        return np.asarray(updates["batch_stats"]["mean"]), np.asarray(
            updates["batch_stats"]["var"])

    assert observe_one_step(step, 0.25) == {"momentum_weights": RECORD.momentum_weights,
                                            "unbiased_running_var": RECORD.unbiased_running_var}


def test_linen_variables_load_unchanged_and_back():
    rng = np.random.default_rng(0)
    linen = nn.BatchNorm(use_running_average=False, momentum=0.8, use_fast_variance=False)
    x = jnp.asarray(rng.normal(2, 3, (6, 4, 4, 3)).astype(np.float32))
    variables = linen.init(jax.random.key(0), x)
    variables = {**variables, "params": {"scale": jnp.asarray(rng.normal(size=3), jnp.float32),
                                         "bias": jnp.asarray(rng.normal(size=3), jnp.float32)}}
    ours = bj.BatchNorm(momentum=0.8)
    for _ in range(3):
        y_linen, updates = linen.apply(variables, x, mutable=["batch_stats"])
        y_ours, our_variables = ours.apply(variables, x, training=True)
        assert_close(np.asarray(y_ours), np.asarray(y_linen), 1e-5, "training output")
        for key in ("mean", "var"):
            assert_close(np.asarray(our_variables["batch_stats"][key]),
                         np.asarray(updates["batch_stats"][key]), 1e-6, key)
        assert jax.tree_util.tree_structure(our_variables) == jax.tree_util.tree_structure(
            {**variables, **updates})
        variables = our_variables  # ours feeds linen on the next step: back and forth
    inference = nn.BatchNorm(use_running_average=True, use_fast_variance=False)
    assert_close(np.asarray(ours.apply(variables, x, training=False)[0]),
                 np.asarray(inference.apply(variables, x)), 1e-5, "inference output")


def test_jit_and_eager_agree_and_vmap_maps_over_independent_problems():
    rng = np.random.default_rng(1)
    x = rng.normal(5, 2, (3, 8, 4)).astype(np.float32)  # 3 problems of (8, 4), channels last
    mean, var = jnp.zeros(4, jnp.float32), jnp.ones(4, jnp.float32)
    run = functools.partial(bj.batch_norm, training=True, momentum=0.9, axis=-1,
                            convention="flax")
    eager = [run(jnp.asarray(p), None, None, mean, var) for p in x]
    jitted = jax.jit(run)
    mapped = jax.vmap(run, in_axes=(0, None, None, None, None))(jnp.asarray(x), None, None,
                                                                 mean, var)
    for i, problem in enumerate(x):
        stats = ChannelStats.of(problem, 1)
        tol = 2 * forward_tolerance(problem, 1, gamma=None, beta=None, eps=1e-5,
                                    mean=stats.mean, var=stats.var, batch_stats=True)
        y_jit = jitted(jnp.asarray(problem), None, None, mean, var)[0]
        assert_close(np.asarray(y_jit), np.asarray(eager[i][0]), tol, "jit vs eager")
        assert_close(np.asarray(mapped[0][i]), np.asarray(eager[i][0]), tol, "vmap vs loop")
        assert_close(np.asarray(mapped[2][i]), np.asarray(eager[i][2]), 1e-6, "vmap var")


def test_layer_works_under_jit_including_the_cumulative_average():
    rng = np.random.default_rng(2)
    layer = bj.BatchNorm(momentum=None, convention="torch", axis=1)
    variables = layer.init(jnp.ones((2, 3)))
    apply = jax.jit(layer.apply, static_argnames="training")
    batches = [rng.normal(1, 2, (5, 3)).astype(np.float32) for _ in range(3)]
    for batch in batches:
        _, variables = apply(variables, jnp.asarray(batch), training=True)
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 3
    expected = np.mean([b.astype(np.float64).mean(axis=0) for b in batches], axis=0)
    assert_close(np.asarray(variables["batch_stats"]["mean"]), expected, 1e-6,
                 "cumulative running mean under jit")


def test_flax_fast_variance_degrades_at_large_offsets_and_bnref_does_not():
    """Flax's default use_fast_variance=True computes E[x²]−E[x]². Measured here (float32,
    256 values per channel at offset 1e4, spread 1): its output is off by ~1e3 -- the
    variance it finds is rounding noise (E[x²] ~ 1e8 has a spacing of 8) -- while bnref's
    two-pass error is ~5e-4, the same as Flax's own use_fast_variance=False."""
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((256, 4))).astype(np.float32)
    truth64 = x.astype(np.float64)
    truth = (truth64 - truth64.mean(0)) / np.sqrt(truth64.var(0) + 1e-5)
    fast = nn.BatchNorm(use_running_average=False)  # the default: use_fast_variance=True
    variables = fast.init(jax.random.key(0), jnp.asarray(x))
    y_fast, _ = fast.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    y_ours = bj.batch_norm(jnp.asarray(x), None, None, None, None, training=True,
                           convention="flax")[0]
    fast_error = float(np.nanmax(np.abs(np.asarray(y_fast, np.float64) - truth)))
    our_error = float(np.abs(np.asarray(y_ours, np.float64) - truth).max())
    assert our_error < 2e-3, our_error
    assert not np.isfinite(fast_error) or fast_error > 100 * our_error, (fast_error, our_error)
    stable = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    y_stable, _ = stable.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    assert float(np.abs(np.asarray(y_stable, np.float64) - truth).max()) < 2e-3


@pytest.mark.parametrize("bad", ["x-int", "scale-shape"])
def test_errors_are_raised_before_tracing(bad):
    x = jnp.ones((4, 3), jnp.int32) if bad == "x-int" else jnp.ones((4, 3))
    gamma = jnp.ones(2) if bad == "scale-shape" else None
    with pytest.raises((TypeError, ValueError), match="must"):
        jax.jit(functools.partial(bj.batch_norm, training=True))(x, gamma, None, None, None)


def test_vjp_and_grad_agree():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(1, 2, (6, 3)).astype(np.float64))
    gamma = jnp.asarray(rng.normal(size=3))
    dy = jnp.asarray(rng.normal(size=(6, 3)))

    def forward(x, gamma):
        return bj.batch_norm(x, gamma, None, None, None, training=True)[0]

    _, pullback = jax.vjp(forward, x, gamma)
    dx, dgamma = pullback(dy)
    gx, ggamma = jax.grad(lambda x, g: jnp.sum(forward(x, g) * dy), argnums=(0, 1))(x, gamma)
    assert_close(np.asarray(dx), np.asarray(gx), 1e-12, "dx")
    assert_close(np.asarray(dgamma), np.asarray(ggamma), 1e-12, "dgamma")


# --- numpy arrays (and whatever else jax.numpy's operations take) in, as Flax takes them -------

def _case(dtype: str = "float32") -> dict[str, np.ndarray]:
    """A batch and every per-channel array, as numpy arrays (a checkpoint loaded with np.load)."""
    rng = np.random.default_rng(5)
    return {"x": rng.normal(2, 3, (6, 4, 3)).astype(dtype),
            "gamma": rng.normal(1, 0.5, 3).astype(dtype),
            "beta": rng.normal(0, 1, 3).astype(dtype),
            "running_mean": rng.normal(0, 1, 3).astype(dtype),
            "running_var": rng.uniform(0.5, 2, 3).astype(dtype)}


def _assert_identical(got, expected, what: str) -> None:
    """Converting with jnp.asarray first is all that happens to a numpy argument: the same
    compiled computation on the same values, so the results are equal, not merely close."""
    got_leaves, expected_leaves = jax.tree.leaves(got), jax.tree.leaves(expected)
    assert jax.tree.structure(got) == jax.tree.structure(expected), what
    for have, want in zip(got_leaves, expected_leaves, strict=True):
        assert isinstance(have, jax.Array), f"{what}: {type(have).__name__} returned"
        assert have.dtype == want.dtype, f"{what}: dtype {have.dtype} != {want.dtype}"
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want), err_msg=what)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("where", ["eager", "jit"])
def test_batch_norm_takes_numpy_arrays(where, dtype, training):
    case = _case(dtype)
    names = ("gamma", "beta", "running_mean", "running_var")

    def run(arrays):
        # Under jit the per-channel arrays are numpy constants inside the trace, x an argument.
        def call(x):
            return bj.batch_norm(x, *(arrays[n] for n in names), training=training, axis=-1,
                                 convention="flax")
        return jax.jit(call)(arrays["x"]) if where == "jit" else call(arrays["x"])

    expected = run({k: jnp.asarray(v) for k, v in case.items()})
    _assert_identical(run(case), expected, f"numpy arrays, {where}")


@pytest.mark.parametrize("momentum", [0.9, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("where", ["eager", "jit"])
def test_layer_apply_takes_numpy_variables(where, momentum):
    case = _case()
    layer = bj.BatchNorm(momentum=momentum, convention="flax")
    variables = layer.init(case["x"])
    variables = {"params": {"scale": jnp.asarray(case["gamma"]), "bias": jnp.asarray(case["beta"])},
                 "batch_stats": {**variables["batch_stats"],
                                 "mean": jnp.asarray(case["running_mean"]),
                                 "var": jnp.asarray(case["running_var"])}}
    loaded = jax.tree.map(np.asarray, variables)  # as a checkpoint restores them
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(loaded))

    def run(variables, training):
        def call(x):  # under jit the numpy variables are constants inside the trace
            return layer.apply(variables, x, training=training)
        return jax.jit(call)(case["x"]) if where == "jit" else call(case["x"])

    for training in (True, False):
        y, updated = run(loaded, training)
        y_expected, expected = run(variables, training)
        _assert_identical(y, y_expected, f"y, training={training}")
        if training:
            _assert_identical(updated["batch_stats"], expected["batch_stats"], "batch_stats")
        elif where == "eager":  # (jit returns its outputs as new arrays)
            assert updated is loaded, "inference returns the variables it was given"
    _assert_identical(jax.tree.map(jnp.asarray, layer.init(case["x"])),
                      layer.init(jnp.asarray(case["x"])), "init from a numpy sample")


def _torch_tensor():
    torch = pytest.importorskip("torch")
    return torch.ones((4, 3))


_FLOATING_NAMES = "float16, bfloat16, float32, float64"
REFUSED = {
    # JAX's own operations refuse these (jnp.add(torch.ones(3), 1) raises; flax.linen.BatchNorm
    # too): bnref's TypeError names the argument.
    "torch-tensor": (_torch_tensor, "must be a jax.Array or numpy.ndarray, got torch.Tensor"),
    "list-of-str": (lambda: [["a", "b", "c"]] * 4,
                    "must be a jax.Array or numpy.ndarray, got builtins.list"),
    # jnp.asarray takes a list of floats, but jax.numpy's operations do not (jax-ml/jax#7737)
    # and neither does flax.linen.BatchNorm; the shared suite's not-an-array mistake is one.
    "list-of-float": (lambda: [[1.0, 2.0, 3.0]] * 4,
                      "must be a jax.Array or numpy.ndarray, got builtins.list"),
    "int64-numpy": (lambda: np.ones((4, 3), np.int64),
                    f"must have a floating dtype ({_FLOATING_NAMES}), got int64"),
    "str-numpy": (lambda: np.full((4, 3), "a"),
                  f"must have a floating dtype ({_FLOATING_NAMES}), got str32"),
    "bool-numpy": (lambda: np.ones((4, 3), bool),
                   f"must have a floating dtype ({_FLOATING_NAMES}), got bool"),
}


@pytest.mark.parametrize("argument", ["x", "gamma", "running_var"])
@pytest.mark.parametrize("refused", list(REFUSED))
def test_types_jax_refuses_get_the_type_error_naming_the_argument(refused, argument):
    make, message = REFUSED[refused]
    value = make()
    if argument != "x":  # a per-channel argument: the same kind of value, shaped (3,)
        value = value[0]
    arrays = {k: jnp.asarray(v) for k, v in _case().items()}
    arrays["x"] = arrays["x"][:, 0]  # (6, 3): channels last
    arrays[argument] = value
    with pytest.raises(TypeError) as raised:
        bj.batch_norm(arrays["x"], arrays["gamma"], arrays["beta"], arrays["running_mean"],
                      arrays["running_var"], training=True, axis=-1, convention="flax")
    assert str(raised.value) == f"{argument} {message}"


@pytest.mark.parametrize("refused", ["torch-tensor", "list-of-float", "int64-numpy"])
def test_layer_refuses_what_jax_refuses_in_its_variables(refused):
    make, message = REFUSED[refused]
    layer = bj.BatchNorm(3)
    variables = layer.init()
    variables["batch_stats"]["var"] = make()[0]
    with pytest.raises(TypeError, match=re.escape(f"running_var {message}")):
        layer.apply(variables, jnp.ones((4, 3), jnp.float32), training=True)


def test_training_is_reverse_mode_only_inference_is_both():
    """The documented price of the analytic custom_vjp: forward mode raises in training,
    reverse mode works; inference keeps both."""
    x = jnp.asarray(np.random.default_rng(3).normal(2, 3, (16, 4)), jnp.float32)

    def loss(x, training):
        return jnp.sum(bj.batch_norm(x, None, None, jnp.zeros(4), jnp.ones(4),
                                     training=training)[0] ** 3)

    assert jnp.all(jnp.isfinite(jax.grad(loss)(x, True)))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: loss(x, True), (x,), (jnp.ones_like(x),))
    _, tangent = jax.jvp(lambda x: loss(x, False), (x,), (jnp.ones_like(x),))
    assert jnp.isfinite(tangent)
