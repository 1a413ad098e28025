"""Synchronized batch norm in JAX (``axis_name=``/``axis_index_groups=``), tested the way
DESIGN.md's "Synchronized batch norm" asks: k synchronized shards are the full batch.

For k members of a named axis, each holding one equal shard of a full batch (split along its
batch axis), synchronized training must give: each member's ``y`` equal to its rows of the
full batch's, the full batch's new running statistics on every member (bit for bit the same
on all), each member's ``dx`` equal to its rows of the full batch's, and per-member
``dgamma``/``dbeta`` that are the oracle's per-shard parts and sum to the full batch's. The
references are ``bnref.numpy.sync_batch_norm``/``sync_batch_norm_backward`` on the float64
shards (the bound of ``bnref.testing.tolerances``) and ``bnref.numpy.batch_norm`` of the full
batch in the case's dtype (twice the bound: each side is within one bound of the truth).

Where: ``jax.vmap(..., axis_name=)`` in this process (Hypothesis: k = 1..4, every dtype and
convention), and ``jax.pmap``/``jax.shard_map`` over 4 host CPU devices in one subprocess
(``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is imported):
it runs a fixed list of scenarios once, bounded by a timeout, and the tests here compare what
it returns.

Shards are equal: JAX's collectives need every member's array to have one shape, so uneven or
empty shards (which ``bnref.numpy.sync_batch_norm`` takes) cannot be expressed under vmap,
pmap or shard_map; uneven *groups* can (``axis_index_groups=[[0, 1, 2], [3]]``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnref.numpy as bn
from bnref.conventions import get_convention
from bnref.testing import sync
from bnref.testing.fixtures import backend_or_skip
from bnref.testing.strategies import BNCase, bn_cases, numpy_dtype, param_dtype, with_dy
from bnref.testing.sync import SyncCase
from bnref.testing.tolerances import (
    Comparison,
    compare,
    forward_tolerance,
    gradient_tolerances,
    running_stat_tolerances,
)

backend_or_skip("jax")  # skips without jax (fails when required); turns on jax_enable_x64
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

import bnref.jax as bj  # noqa: E402
import bnref.jax.flax as bf  # noqa: E402

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")
AXIS = "shards"
DEVICES = 4
WORKER_TIMEOUT = 240  # seconds; the worker takes ~10 s on 2 cores
REPO = Path(__file__).resolve().parent.parent


def examples(share: float):
    """The active profile's example budget, scaled down: every new shape, dtype, k and
    set of flags traces and compiles a vmap (~0.2 s forward, ~0.4 s with gradients) -- the
    whole module stays within a minute under the ci profile on 2 cores."""
    return settings(max_examples=max(10, round(settings.default.max_examples * share)))


# -- cases: a full batch and its k shards -----------------------------------------------------


def _split_axis(case: BNCase) -> int:
    """Where the batch is split: axis 0, or axis 1 when the channels are on axis 0."""
    return 1 if case.channel_axis == 0 else 0


def _shards(array: np.ndarray, case: BNCase, k: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(part) for part in np.split(array, k, axis=_split_axis(case))]


# Per-member shard shapes, ranks 2-5: every side is at most 4, so any axis may hold the
# channels; the full batch multiplies the split axis by k. (A small pool: JAX compiles per
# shape.)
SHARD_SHAPES = ((3, 2), (1, 3), (2, 3, 2), (1, 2, 3, 2), (1, 2, 2, 1, 2))


@st.composite
def sharded_cases(draw, *, dtypes=ALL_DTYPES, ks=(1, 2, 3, 4)):
    """(case, k): a training case whose full batch splits into k equal shards."""
    k = draw(st.sampled_from(ks), label="k")
    choices = []
    for shape in SHARD_SHAPES:
        for channel_axis in range(len(shape)):
            full = list(shape)
            full[1 if channel_axis == 0 else 0] *= k
            if np.prod(full) // full[channel_axis] >= 2:  # the full batch: 2 values or more
                choices.append((tuple(full), channel_axis))
    full, channel_axis = draw(st.sampled_from(choices), label="full shape and channel axis")
    case = draw(bn_cases(dtypes=dtypes, training=True, shapes=(full,),
                         channel_axis=channel_axis), label="case")
    return case, k


@st.composite
def sharded_with_dy(draw, **options):
    """((case, k), dy): an upstream gradient (``with_dy``'s) for a sharded case."""
    case, k = draw(sharded_cases(**options), label="case and k")
    _, dy = draw(with_dy(st.just(case)), label="dy")
    return (case, k), dy


# -- running k synchronized members -----------------------------------------------------------


PARAM_NAMES = ("gamma", "beta", "running_mean", "running_var")


@dataclasses.dataclass
class Synced:
    """What every member returned, stacked along a leading member axis (None: not given)."""

    y: np.ndarray
    mean: np.ndarray | None
    var: np.ndarray | None
    dx: np.ndarray | None = None
    dgamma: np.ndarray | None = None
    dbeta: np.ndarray | None = None

    def members(self, indices: list[int]) -> Synced:
        return Synced(*(None if a is None else a[np.asarray(indices)]
                        for a in (self.y, self.mean, self.var, self.dx, self.dgamma,
                                  self.dbeta)))


def _member(kwargs: dict[str, Any], groups: Any, with_grad: bool):
    """One member's work: synchronized batch_norm of its shard (and the vjp of its y with
    its dy). Parameters arrive per member (a leading member axis, like the data), so that
    each member's dgamma/dbeta is its own part, as data-parallel training has it."""

    def member(xk, dyk, params):
        def forward(xk, gamma, beta):
            y, mean, var = bj.batch_norm(
                xk, gamma, beta, params.get("running_mean"), params.get("running_var"),
                training=True, axis_name=AXIS, axis_index_groups=groups, **kwargs)
            return y, (mean, var)

        gamma, beta = params.get("gamma"), params.get("beta")
        if not with_grad:
            y, (mean, var) = forward(xk, gamma, beta)
            return {"y": y, "mean": mean, "var": var}
        y, pullback, (mean, var) = jax.vjp(forward, xk, gamma, beta, has_aux=True)
        dx, dgamma, dbeta = pullback(dyk)
        return {"y": y, "mean": mean, "var": var, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}

    return member


def _per_member(value: np.ndarray | None, k: int) -> np.ndarray | None:
    return None if value is None else np.stack([value] * k)


def _inputs(case: BNCase, k: int, dy: np.ndarray | None):
    xs = np.stack(_shards(case.x, case, k))
    dys = None if dy is None else np.stack(_shards(dy, case, k))
    params = {name: _per_member(value, k)
              for name, value in zip(PARAM_NAMES, case.arrays[1:], strict=True)
              if value is not None}
    return xs, dys, params


def _kwargs(case: BNCase) -> dict[str, Any]:
    return {name: value for name, value in case.kwargs().items() if name != "training"}


def run_synchronized(mode: str, k: int, xs, dys, params, kwargs, groups=None) -> Synced:
    """k members of the named axis AXIS under ``mode`` ("vmap", "pmap" or "shard_map"):
    inputs with a leading member axis, outputs stacked the same way."""
    member = _member(kwargs, groups, dys is not None)
    if mode == "vmap":
        out = jax.vmap(member, axis_name=AXIS)(xs, dys, params)
    elif mode == "pmap":
        out = jax.pmap(member, axis_name=AXIS, devices=jax.devices()[:k])(xs, dys, params)
    else:
        mesh = jax.make_mesh((k,), (AXIS,), devices=jax.devices()[:k])

        def body(xs, dys, params):
            unstack = functools.partial(jax.tree.map, lambda a: a[0])
            return jax.tree.map(lambda a: a[None], member(*unstack((xs, dys, params))))

        out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(AXIS),
                                    out_specs=PartitionSpec(AXIS)))(xs, dys, params)
    out = {name: None if value is None else np.asarray(value) for name, value in out.items()}
    return Synced(out["y"], out["mean"], out["var"], out.get("dx"), out.get("dgamma"),
                  out.get("dbeta"))


def run_vmap(case: BNCase, k: int, dy: np.ndarray | None = None, groups=None) -> Synced:
    return run_synchronized("vmap", k, *_inputs(case, k, dy), _kwargs(case), groups)


# -- the property, checked on any member outputs ----------------------------------------------


def assert_all(results: list[Comparison], context: object = "") -> None:
    failures = [str(r) for r in results if not r.passed]
    if failures:
        raise AssertionError("\n".join([*failures, f"case: {context!r}"]))


def _same(name: str, got: np.ndarray, expected: np.ndarray) -> Comparison:
    """Bit for bit (tolerance 0)."""
    return compare(got, expected, 0.0, name)


def _equal_split(case: BNCase, k: int, dy: np.ndarray | None = None) -> SyncCase:
    length = case.x.shape[_split_axis(case)]
    return SyncCase(case, (length // k,) * k, dy)


def forward_comparisons(case: BNCase, k: int, out: Synced) -> list[Comparison]:
    """The shared property's forward half (:mod:`bnref.testing.sync`), k equal shards."""
    return sync.forward_comparisons(_equal_split(case, k), out)


def backward_comparisons(case: BNCase, dy: np.ndarray, k: int,
                         out: Synced) -> list[Comparison]:
    """The shared property's backward half, k equal shards."""
    return sync.backward_comparisons(_equal_split(case, k, dy), out)


# == in this process: jax.vmap(..., axis_name=) ===============================================


@given(sharded_cases())
def test_vmap_shards_give_the_full_batch(case_and_k):
    case, k = case_and_k
    assert_all(forward_comparisons(case, k, run_vmap(case, k)), (k, case))


@examples(0.4)
@given(sharded_with_dy())
def test_vmap_gradients_give_the_full_batch(drawn):
    (case, k), dy = drawn
    out = run_vmap(case, k, dy)
    assert_all(backward_comparisons(case, dy, k, out), (k, case))


@pytest.mark.parametrize("k", [2, 3])
def test_vmap_outer_gradient_of_the_total_loss_is_the_full_batch(k):
    """jax.grad of the sum of every member's loss, taken outside vmap: dx is the full batch's
    and dgamma the full batch's total (the members' parts summed by autodiff)."""
    case, _, _ = device_case("k4-float32-torch")
    case = case.with_(x=case.x[:6])
    dy = np.cos(np.arange(case.x.size)).reshape(case.x.shape).astype(case.x.dtype)
    xs, dys, _ = _inputs(case, k, dy)
    kwargs = _kwargs(case)

    def total(xs, gamma):
        def member(xk):
            return bj.batch_norm(xk, gamma, case.beta, case.running_mean, case.running_var,
                                 training=True, axis_name=AXIS, **kwargs)[0]
        return jnp.sum(jax.vmap(member, axis_name=AXIS)(xs) * dys)

    dxs, dgamma = jax.grad(total, argnums=(0, 1))(jnp.asarray(xs), jnp.asarray(case.gamma))
    full_dx, full_dgamma, _ = bn.batch_norm_backward(
        dy, case.x, case.gamma, beta=case.beta, eps=case.eps, axis=case.axis,
        convention=case.convention)
    dx_tol, dgamma_tol, _ = gradient_tolerances(
        case.x, dy, case.channel_axis, gamma=case.gamma, eps=case.resolved_eps,
        param_dtype=case.gamma.dtype.name, factor=2.0)
    rows = _shards(full_dx, case, k)
    assert_all([*(compare(np.asarray(dxs[j]), rows[j], dx_tol, f"member {j} dx")
                  for j in range(k)),
                compare(np.asarray(dgamma), full_dgamma, dgamma_tol, "dgamma")], (k, case))


def _group_case(case: BNCase, dy: np.ndarray | None, k: int, group: list[int]):
    """The full batch of one group: its members' shards concatenated, in member order."""
    axis = _split_axis(case)
    x = np.concatenate([_shards(case.x, case, k)[i] for i in group], axis=axis)
    part_dy = (None if dy is None
               else np.concatenate([_shards(dy, case, k)[i] for i in group], axis=axis))
    return case.with_(x=x), part_dy


def group_comparisons(case, dy, k, out: Synced, groups) -> list[Comparison]:
    """Each group is the full batch of its own members' shards."""
    results = []
    for group in groups:
        part, part_dy = _group_case(case, dy, k, group)
        members = out.members(group)
        results += forward_comparisons(part, len(group), members)
        if dy is not None:
            results += backward_comparisons(part, part_dy, len(group), members)
    return results


GROUPS = {"pairs": [[0, 1], [2, 3]], "interleaved": [[0, 2], [1, 3]],
          "uneven": [[0, 1, 2], [3]], "one-group": [[3, 1, 0, 2]]}


@examples(0.2)
@given(drawn=sharded_with_dy(dtypes=("float32", "float64"), ks=(4,)),
       groups=st.sampled_from(list(GROUPS.values())))
def test_vmap_axis_index_groups_normalise_each_group_on_its_own(drawn, groups):
    """Groups of members (pairs, interleaved, uneven -- then the count, and the unbiased
    running variance, differ per group -- or one group of all) are each the full batch of
    their shards. jax.lax.psum refuses groups under vmap; bnref reduces them with one plain
    psum of a slot per group. A group holding one value per channel is refused under the
    torch convention, as batch_norm refuses such a batch."""
    (case, k), dy = drawn
    per_member = case.x.size // case.x.shape[case.channel_axis] // k
    if (get_convention(case.convention).single_value_error
            and per_member * min(len(group) for group in groups) == 1):
        with pytest.raises(ValueError, match=r"got 1 value per channel in the union of 1 shard"):
            run_vmap(case, k, dy, groups=groups)
        return
    out = run_vmap(case, k, dy, groups=groups)
    assert_all(group_comparisons(case, dy, k, out, groups), case)


def test_vmap_inference_is_each_members_own_batch_norm():
    """Not synchronized (as torch.nn.SyncBatchNorm in eval()): bit for bit the unsynchronized
    call on each shard, with the running statistics or, without them, the shard's own batch
    statistics; outside any named axis too."""
    rng = np.random.default_rng(0)
    xs = rng.normal(3, 2, (3, 4, 5)).astype(np.float32)
    stats = np.zeros(5, np.float32), np.full(5, 2.0, np.float32)
    for running in (stats, (None, None)):
        def call(x, axis_name, running=running):
            return bj.batch_norm(x, None, None, *running, training=False, axis=-1,
                                 axis_name=axis_name)[0]
        synced = jax.vmap(functools.partial(call, axis_name=AXIS), axis_name=AXIS)(xs)
        for j, x in enumerate(xs):
            np.testing.assert_array_equal(np.asarray(synced[j]), np.asarray(call(x, None)))
            np.testing.assert_array_equal(np.asarray(call(x, AXIS)), np.asarray(call(x, None)))


def test_vmap_torch_convention_counts_the_union_for_its_single_value_refusal():
    """Shards of one row each are fine together (torch convention: the union holds k values,
    and the unbiased running variance uses that global count); one value in all is refused
    with batch_norm's wording, naming the union."""
    rows = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 5.0], [2.0, 0.0, 4.0]], np.float32)
    case = BNCase(rows, None, None, np.zeros(3, np.float32), np.ones(3, np.float32),
                  training=True, momentum=1.0, axis=1, convention="torch")
    assert_all(forward_comparisons(case, 3, run_vmap(case, 3)))
    np.testing.assert_allclose(run_vmap(case, 3).var[0], rows.astype(np.float64).var(0, ddof=1),
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when "
                                         r"training, got 1 value per channel in the union"):
        run_vmap(case.with_(x=rows[:1]), 1)


# -- the hard case: offset 1e4 in float32 -----------------------------------------------------


def _offset_batch(k: int = 4, rows: int = 64) -> np.ndarray:
    """k shards of (rows, 4) float32 values at offset 1e4, spread 1."""
    return (1e4 + np.random.default_rng(3).standard_normal((k * rows, 4))).astype(np.float32)


def test_offset_1e4_float32_stays_within_the_single_device_tolerance():
    x = _offset_batch()
    case = BNCase(x, None, None, np.zeros(4, np.float32), np.ones(4, np.float32),
                  training=True, axis=-1, convention="flax")
    assert_all(forward_comparisons(case, 4, run_vmap(case, 4)))


def test_flax_fast_variance_loses_the_offset_1e4_case_and_bnref_does_not():
    """A documented contrast: flax.linen.BatchNorm(axis_name=...) with its default
    use_fast_variance=True all-reduces E[x] and E[x²] and subtracts: at offset 1e4 in float32
    (E[x²] ~ 1e8, spacing 8) its variance is rounding noise. Measured here: its y is off by
    ~1e3 (or is not finite), bnref's by ~4e-4, inside the forward bound."""
    x = _offset_batch()
    shards = x.reshape(4, -1, 4)
    x64 = x.astype(np.float64)
    truth = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)

    def error(module) -> float:
        variables = module.init(jax.random.key(0), shards[0])
        y, _ = jax.vmap(lambda s: module.apply(variables, s, mutable=["batch_stats"]),
                        axis_name=AXIS)(shards)
        return float(np.nanmax(np.abs(np.asarray(y, np.float64).reshape(x.shape) - truth)))

    fast = error(nn.BatchNorm(use_running_average=False, axis_name=AXIS))
    ours = error(bf.BatchNorm(use_running_average=False, axis_name=AXIS))
    tolerance = forward_tolerance(x, 1, gamma=None, beta=None, eps=1e-5, mean=x64.mean(0),
                                  var=x64.var(0), batch_stats=True)
    assert ours <= tolerance.min(), (ours, tolerance.min())
    assert not np.isfinite(fast) or fast > 100 * ours, (fast, ours)


# -- the layers ---------------------------------------------------------------------------------


LAYERS = ("bnref.jax.BatchNorm", "bnref.jax.flax.BatchNorm", "bnref.jax.flax.NNXBatchNorm",
          "flax.linen.BatchNorm")


def train_layer(kind: str, mode: str, xs: np.ndarray, axis_name: Any = AXIS):
    """One training step of a fresh layer (channels last, Flax's defaults) on each member's
    shard (mode "vmap"/"pmap"; "full": one call on xs as it is, without axis_name):
    (y, running mean, running var), stacked over the members unless "full"."""
    channels = xs.shape[-1]
    sample = xs if mode == "full" else xs[0]
    sync = {"axis_name": axis_name} if mode != "full" else {}
    # The variables (nnx: the state) enter every step as an argument, replicated.
    if kind == "bnref.jax.BatchNorm":
        layer = bj.BatchNorm(**sync)
        variables = layer.init(sample)

        def step(x, variables):
            y, new = layer.apply(variables, x, training=True)
            return y, new["batch_stats"]["mean"], new["batch_stats"]["var"]
    elif kind == "bnref.jax.flax.NNXBatchNorm":
        graphdef, variables = nnx.split(bf.NNXBatchNorm(channels, rngs=nnx.Rngs(0), **sync))

        def step(x, state):
            model = nnx.merge(graphdef, state)
            y = model(x)  # in training: mean and var move in place
            return y, model.mean.value, model.var.value
    else:
        module = (bf.BatchNorm if kind == "bnref.jax.flax.BatchNorm" else functools.partial(
            nn.BatchNorm, use_fast_variance=False))(use_running_average=False, **sync)
        variables = module.init(jax.random.key(0), sample)  # init never synchronizes

        def step(x, variables):
            y, new = module.apply(variables, x, mutable=["batch_stats"])
            return y, new["batch_stats"]["mean"], new["batch_stats"]["var"]
    if mode == "full":
        return tuple(np.asarray(a) for a in step(jnp.asarray(xs), variables))
    mapped = (jax.vmap(step, in_axes=(0, None), axis_name=AXIS) if mode == "vmap"
              else jax.pmap(step, in_axes=(0, None), axis_name=AXIS,
                            devices=jax.devices()[:len(xs)]))
    return tuple(np.asarray(a) for a in mapped(jnp.asarray(xs), variables))


def layer_comparisons(kind: str, xs: np.ndarray, got) -> list[Comparison]:
    """Synchronized members vs the same layer, unsynchronized, on the full batch."""
    k, full = len(xs), xs.reshape(-1, xs.shape[-1])
    y_full, mean_full, var_full = train_layer(kind, "full", full)
    y, mean, var = got
    x64 = full.astype(np.float64)
    y_tol = forward_tolerance(full, 1, gamma=None, beta=None, eps=1e-5, mean=x64.mean(0),
                              var=x64.var(0), batch_stats=True, factor=2.0)
    channels = full.shape[1]
    mean_tol, var_tol = running_stat_tolerances(
        full, 1, old_mean=np.zeros(channels), old_var=np.ones(channels), new_value_weight=0.01,
        stat_dtype="float32", factor=2.0)
    rows = y_full.reshape(y.shape)
    results = [compare(y[j], rows[j], y_tol, f"{kind}: member {j} y") for j in range(k)]
    results += [compare(mean[0], mean_full, mean_tol, f"{kind}: running mean"),
                compare(var[0], var_full, var_tol, f"{kind}: running var")]
    results += [_same(f"{kind}: member {j} batch_stats vs member 0's",
                      np.stack([mean[j], var[j]]), np.stack([mean[0], var[0]]))
                for j in range(1, k)]
    return results


def _layer_batch(k: int = 3, rows: int = 5) -> np.ndarray:
    return np.random.default_rng(7).normal(2.0, 3.0, (k, rows, 3)).astype(np.float32)


@pytest.mark.parametrize("kind", LAYERS[:3])
def test_layers_synchronize_under_vmap(kind):
    xs = _layer_batch()
    assert_all(layer_comparisons(kind, xs, train_layer(kind, "vmap", xs)))


def test_nnx_vmap_with_a_broadcast_model_moves_its_statistics_in_place():
    """The nnx idiom: nnx.vmap(in_axes=(None, 0), axis_name=...) over one module. The
    synchronized statistics are the same on every member, so they come back as the
    module's own (as with flax.nnx.BatchNorm(axis_name=...))."""
    xs = _layer_batch()
    model = bf.NNXBatchNorm(3, axis_name=AXIS, rngs=nnx.Rngs(0))

    @nnx.vmap(in_axes=(None, 0), axis_name=AXIS)
    def forward(model, x):
        return model(x)

    y = np.asarray(forward(model, jnp.asarray(xs)))
    stats = (np.stack([np.asarray(model.mean.value)] * len(xs)),
             np.stack([np.asarray(model.var.value)] * len(xs)))
    assert_all(layer_comparisons("bnref.jax.flax.NNXBatchNorm", xs, (y, *stats)))


def test_linen_agrees_with_flax_linen_two_pass_under_vmap():
    """bnref's linen BatchNorm(axis_name=) against flax.linen.BatchNorm(axis_name=,
    use_fast_variance=False) on normal data: each within twice the bound of the full batch
    (layer_comparisons), so within four of each other; here directly, twice the bound."""
    xs = _layer_batch(k=4, rows=8)
    ours = train_layer("bnref.jax.flax.BatchNorm", "vmap", xs)
    theirs = train_layer("flax.linen.BatchNorm", "vmap", xs)
    full = xs.reshape(-1, 3)
    x64 = full.astype(np.float64)
    y_tol = forward_tolerance(full, 1, gamma=None, beta=None, eps=1e-5, mean=x64.mean(0),
                              var=x64.var(0), batch_stats=True, factor=2.0)
    mean_tol, var_tol = running_stat_tolerances(
        full, 1, old_mean=np.zeros(3), old_var=np.ones(3), new_value_weight=0.01,
        stat_dtype="float32", factor=2.0)
    assert_all([compare(ours[0].reshape(full.shape), theirs[0].reshape(full.shape), y_tol, "y"),
                compare(ours[1], theirs[1], mean_tol, "running mean"),
                compare(ours[2], theirs[2], var_tol, "running var")])


def test_linen_init_outside_the_named_axis_and_eval_do_not_communicate():
    """As flax.linen: init (outside any vmap/pmap) and use_running_average=True never touch
    the named axis, so neither needs it bound."""
    module = bf.BatchNorm(axis_name="nowhere")
    x = _layer_batch()[0]
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    y = module.apply(variables, x, use_running_average=True)
    plain = bf.BatchNorm().apply(variables, x, use_running_average=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
    layer = bj.BatchNorm(axis_name="nowhere")
    np.testing.assert_array_equal(np.asarray(layer.apply(layer.init(x), x, training=False)[0]),
                                  np.asarray(bj.BatchNorm().apply(layer.init(x), x,
                                                                  training=False)[0]))


# -- bad axis_name / axis_index_groups ----------------------------------------------------------


X = np.ones((4, 3), np.float32)

BAD_AT_CONSTRUCTION = {
    "axis_name-int": ({"axis_name": 3}, TypeError,
                      "axis_name must be a str (the axis name of jax.vmap, jax.pmap or a "
                      "shard_map mesh), a tuple of str, or None, got 3"),
    "axis_name-tuple-with-int": ({"axis_name": ("a", 1)}, TypeError,
                                 "axis_name must be a str (the axis name of jax.vmap, jax.pmap "
                                 "or a shard_map mesh), a tuple of str, or None, got ('a', 1)"),
    "axis_name-empty-tuple": ({"axis_name": ()}, ValueError,
                              "axis_name must be a str or a non-empty tuple of distinct str, "
                              "got ()"),
    "axis_name-repeated": ({"axis_name": ("a", "a")}, ValueError,
                           "axis_name must be a str or a non-empty tuple of distinct str, got "
                           "('a', 'a')"),
    "groups-without-axis_name": ({"axis_index_groups": [[0, 1]]}, ValueError,
                                 "axis_index_groups needs axis_name (the groups are indices "
                                 "along that named axis), got axis_index_groups=[[0, 1]] with "
                                 "axis_name=None"),
    "groups-flat": ({"axis_name": AXIS, "axis_index_groups": [0, 1]}, TypeError,
                    "axis_index_groups must be a list of lists of axis indices (ints >= 0), "
                    "e.g. [[0, 1], [2, 3]], got [0, 1]"),
    "groups-float-index": ({"axis_name": AXIS, "axis_index_groups": [[0.0, 1]]}, TypeError,
                           "axis_index_groups must be a list of lists of axis indices (ints >= "
                           "0), e.g. [[0, 1], [2, 3]], got [[0.0, 1]]"),
    "groups-bool-index": ({"axis_name": AXIS, "axis_index_groups": [[True, False]]}, TypeError,
                          "axis_index_groups must be a list of lists of axis indices (ints >= "
                          "0), e.g. [[0, 1], [2, 3]], got [[True, False]]"),
    "groups-negative": ({"axis_name": AXIS, "axis_index_groups": [[-1, 0]]}, ValueError,
                        "axis_index_groups must be non-empty groups of axis indices >= 0, each "
                        "index in one group once, got [[-1, 0]]"),
    "groups-repeated-index": ({"axis_name": AXIS, "axis_index_groups": [[0, 1], [1, 2]]},
                              ValueError,
                              "axis_index_groups must be non-empty groups of axis indices >= 0, "
                              "each index in one group once, got [[0, 1], [1, 2]]"),
    "groups-empty-group": ({"axis_name": AXIS, "axis_index_groups": [[0, 1], []]}, ValueError,
                           "axis_index_groups must be non-empty groups of axis indices >= 0, "
                           "each index in one group once, got [[0, 1], []]"),
}


def _construct(api: str, options: dict[str, Any]) -> None:
    if api == "batch_norm":  # validated before anything is traced, in training or not
        bj.batch_norm(X, None, None, None, None, training=False, axis=-1, **options)
    elif api == "bnref.jax.BatchNorm":
        bj.BatchNorm(**options)
    elif api == "linen":
        bf.BatchNorm(**options)
    else:
        bf.NNXBatchNorm(3, rngs=nnx.Rngs(0), **options)


@pytest.mark.parametrize("mistake", list(BAD_AT_CONSTRUCTION))
@pytest.mark.parametrize("api", ["batch_norm", "bnref.jax.BatchNorm", "linen", "nnx"])
def test_bad_axis_arguments_are_refused_naming_them(api, mistake):
    options, error, message = BAD_AT_CONSTRUCTION[mistake]
    with pytest.raises(error) as raised:
        _construct(api, options)
    assert str(raised.value) == message


BAD_AT_CALL = {
    "groups-not-covering-the-axis": (
        AXIS, [[0, 1]], "axis_index_groups must cover the 4 indices of axis 'shards' (0 to 3) "
        "each exactly once, got [[0, 1]]"),
    "groups-beyond-the-axis": (
        AXIS, [[0, 1], [2, 4]], "axis_index_groups must cover the 4 indices of axis 'shards' "
        "(0 to 3) each exactly once, got [[0, 1], [2, 4]]"),
    "unbound-axis_name": (
        "elsewhere", None, "axis_name 'elsewhere' is not bound here: synchronized batch norm "
        "reduces over a named axis, so call it inside jax.vmap(..., axis_name=...), "
        "jax.pmap(..., axis_name=...) or jax.shard_map over a mesh with that axis name (under "
        "jax.jit with a sharded batch, leave axis_name=None: XLA's partitioner already "
        "computes the full batch's statistics)"),
}


@pytest.mark.parametrize(("mistake", "where"), [
    ("groups-not-covering-the-axis", "inside-vmap"), ("groups-beyond-the-axis", "inside-vmap"),
    ("unbound-axis_name", "inside-vmap"), ("unbound-axis_name", "outside")])
def test_axis_arguments_that_do_not_fit_the_axis_are_refused_when_called(mistake, where):
    """Where the named axis is known: the groups must cover it, and it must be bound (inside a
    vmap named otherwise, or outside any). JAX's own errors would say "unbound axis name"
    or nothing at all (shard_map's psum with groups)."""
    axis_name, groups, message = BAD_AT_CALL[mistake]

    def call(x):
        return bj.batch_norm(x, None, None, None, None, training=True, axis=-1,
                             axis_name=axis_name, axis_index_groups=groups)[0]

    with pytest.raises(ValueError) as raised:
        if where == "outside":
            call(X)
        else:
            jax.vmap(call, axis_name=AXIS)(np.stack([X] * 4))
    assert str(raised.value) == message


def test_a_tuple_of_axis_names_reduces_over_both():
    """Nested vmaps with names ("outer", "inner"): both together are the full batch."""
    rng = np.random.default_rng(5)
    x = rng.normal(1, 2, (2, 3, 4, 3)).astype(np.float64)  # (outer, inner, rows, C)

    def call(x):
        return bj.batch_norm(x, None, None, None, None, training=True, axis=-1,
                             axis_name=("outer", "inner"))[0]

    y = jax.vmap(jax.vmap(call, axis_name="inner"), axis_name="outer")(x)
    full, _, _ = bn.batch_norm(x.reshape(-1, 3), None, None, None, None, training=True, axis=-1)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), full, rtol=0, atol=1e-13)


# == pmap and shard_map on 4 host CPU devices (one subprocess) ==================================


def _device_case(k: int, dtype: str, convention: str, shard: tuple[int, ...], channel_axis: int,
                 offset: float, seed: int) -> BNCase:
    rng = np.random.default_rng(seed)
    full = list(shard)
    full[1 if channel_axis == 0 else 0] *= k
    channels = full[channel_axis]
    shape = [1] * len(full)
    shape[channel_axis] = channels
    spreads = rng.uniform(0.5, 3.0, channels).reshape(shape)
    x = (offset + spreads * rng.standard_normal(full)).astype(numpy_dtype(dtype))
    pdtype = param_dtype(dtype)
    conv = get_convention(convention)
    return BNCase(x=x, gamma=rng.normal(1, 0.5, channels).astype(pdtype),
                  beta=rng.normal(0, 1, channels).astype(pdtype),
                  running_mean=rng.normal(offset, 1, channels).astype(pdtype),
                  running_var=rng.uniform(0.5, 2, channels).astype(pdtype), training=True,
                  momentum=conv.momentum_for_new_value_weight(0.3), eps=1e-3,
                  axis=channel_axis if channel_axis != conv.default_axis % len(full) else None,
                  convention=convention)


DEVICE_CASES = {
    "k1-float64-torch": (1, "float64", "torch", (4, 3, 2, 2), 1, 2.0),
    "k2-bfloat16-flax": (2, "bfloat16", "flax", (3, 2, 3), 2, -5.0),
    "k3-float16-keras": (3, "float16", "keras", (2, 3), 1, 0.0),
    "k4-float32-torch": (4, "float32", "torch", (2, 3, 2, 2), 1, 3.0),
    "k4-float32-offset-1e4": (4, "float32", "flax", (16, 3), 1, 1e4),
}
MODES = ("pmap", "shard_map")


def device_case(name: str) -> tuple[BNCase, np.ndarray, int]:
    k, dtype, convention, shard, channel_axis, offset = DEVICE_CASES[name]
    seed = list(DEVICE_CASES).index(name)
    case = _device_case(k, dtype, convention, shard, channel_axis, offset, seed)
    dy = np.random.default_rng(100 + seed).uniform(-1, 1, case.x.shape).astype(case.x.dtype)
    return case, dy, k


def _scenarios() -> dict[str, dict[str, Any]]:
    """What the worker runs, by name: plain data (no sentinels), rebuilt here to compare."""
    scenarios = {}
    for mode in MODES:
        for name in DEVICE_CASES:
            case, dy, k = device_case(name)
            scenarios[f"{mode}-{name}"] = {"kind": "sync", "mode": mode, "k": k,
                                           "inputs": _inputs(case, k, dy),
                                           "kwargs": _resolved_kwargs(case), "groups": None}
        case, dy, k = device_case("k4-float32-torch")
        scenarios[f"{mode}-groups"] = {"kind": "sync", "mode": mode, "k": k,
                                       "inputs": _inputs(case, k, dy),
                                       "kwargs": _resolved_kwargs(case),
                                       "groups": GROUPS["pairs"]}
    case, dy, k = device_case("k4-float32-torch")
    xs, dys, params = _inputs(case, k, dy)
    scenarios["shard_map-replicated-params"] = {
        "kind": "replicated", "k": k, "inputs": (xs, dys, {n: v[0] for n, v in params.items()}),
        "kwargs": _resolved_kwargs(case)}
    for kind in LAYERS[:3]:
        scenarios[f"pmap-layer-{kind}"] = {"kind": "layer", "layer": kind, "xs": _layer_batch(4)}
    scenarios["pmap-flax-groups"] = {"kind": "flax-groups", "xs": _layer_batch(4, 8),
                                     "groups": GROUPS["pairs"]}
    return scenarios


def _resolved_kwargs(case: BNCase) -> dict[str, Any]:
    return {"momentum": case.resolved_momentum, "eps": case.eps, "axis": case.axis,
            "convention": case.convention}


def _run_scenario(spec: dict[str, Any]) -> Any:
    if spec["kind"] == "sync":
        return dataclasses.asdict(run_synchronized(spec["mode"], spec["k"], *spec["inputs"],
                                                   spec["kwargs"], spec["groups"]))
    if spec["kind"] == "replicated":
        # shard_map's default check_vma: gamma/beta enter replicated (PartitionSpec()).
        xs, dys, params = spec["inputs"]
        member = _member(spec["kwargs"], None, True)
        mesh = jax.make_mesh((spec["k"],), (AXIS,))

        def body(xk, dyk, params):
            return jax.tree.map(lambda a: a[None], member(xk[0], dyk[0], params))

        out = jax.jit(jax.shard_map(body, mesh=mesh, out_specs=PartitionSpec(AXIS), in_specs=(
            PartitionSpec(AXIS), PartitionSpec(AXIS), PartitionSpec())))(xs, dys, params)
        return {name: np.asarray(value) for name, value in out.items()}
    if spec["kind"] == "layer":
        return train_layer(spec["layer"], "pmap", spec["xs"])
    xs, groups = spec["xs"], spec["groups"]
    results = {}
    for name, module in (("ours", bf.BatchNorm), ("flax", functools.partial(
            nn.BatchNorm, use_fast_variance=False))):
        layer = module(use_running_average=False, axis_name=AXIS, axis_index_groups=groups)
        variables = layer.init(jax.random.key(0), xs[0])
        y, new = jax.pmap(lambda x, layer=layer, variables=variables: layer.apply(
            variables, x, mutable=["batch_stats"]), axis_name=AXIS)(xs)
        results[name] = (np.asarray(y), np.asarray(new["batch_stats"]["mean"]),
                         np.asarray(new["batch_stats"]["var"]))
    return results


def device_worker(spec_path: str, out_path: str) -> None:
    """The subprocess's entry point: run every scenario, record results or tracebacks."""
    assert jax.device_count() >= DEVICES, jax.devices()
    with open(spec_path, "rb") as f:
        scenarios = pickle.load(f)
    results = {}
    for name, spec in scenarios.items():
        try:
            results[name] = ("ok", _run_scenario(spec))
        except Exception:  # reported by the test of that scenario
            results[name] = ("error", traceback.format_exc())
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


@pytest.fixture(scope="module")
def devices(tmp_path_factory) -> dict[str, Any]:
    """Every device scenario's result, from one bounded subprocess with 4 CPU devices."""
    folder = tmp_path_factory.mktemp("jax_sync")
    spec_path, out_path = folder / "scenarios.pkl", folder / "results.pkl"
    with open(spec_path, "wb") as f:
        pickle.dump(_scenarios(), f)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + f" --xla_force_host_platform_device_count={DEVICES}").strip()}
    command = [sys.executable, "-c",
               "import sys; from tests.test_jax_sync import device_worker; "
               "device_worker(sys.argv[1], sys.argv[2])", str(spec_path), str(out_path)]
    # run() kills the worker if it outlives the timeout: nothing is left running.
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT, check=False)
    if done.returncode != 0:
        pytest.fail(f"the device worker exited with {done.returncode}:\n{done.stderr[-4000:]}",
                    pytrace=False)
    with open(out_path, "rb") as f:
        return pickle.load(f)


def result_of(devices: dict[str, Any], name: str) -> Any:
    status, value = devices[name]
    if status != "ok":
        pytest.fail(f"{name} raised in the device worker:\n{value}", pytrace=False)
    return value


@pytest.mark.parametrize("name", list(DEVICE_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_devices_give_the_full_batch(devices, mode, name):
    """k = 1..4 devices: y, running statistics (bit for bit equal on every device), dx and
    per-device dgamma/dbeta against the oracle and the full batch, offset 1e4 included."""
    case, dy, k = device_case(name)
    out = Synced(**result_of(devices, f"{mode}-{name}"))
    assert_all(forward_comparisons(case, k, out) + backward_comparisons(case, dy, k, out),
               (mode, name))


@pytest.mark.parametrize("mode", MODES)
def test_devices_axis_index_groups_normalise_each_pair_on_its_own(devices, mode):
    """Groups [[0, 1], [2, 3]] on 4 devices: each pair is the full batch of its two shards
    (forward and gradients). Under shard_map jax.lax.psum itself refuses groups."""
    case, dy, k = device_case("k4-float32-torch")
    out = Synced(**result_of(devices, f"{mode}-groups"))
    assert_all(group_comparisons(case, dy, k, out, GROUPS["pairs"]), mode)


def test_shard_map_replicated_parameters_get_the_full_batch_gradient(devices):
    """Under shard_map's default check_vma, gamma/beta passed replicated (PartitionSpec())
    get their gradient summed over the devices by autodiff: every device holds the full
    batch's dgamma/dbeta (dx is still each device's rows)."""
    case, dy, k = device_case("k4-float32-torch")
    out = result_of(devices, "shard_map-replicated-params")
    _, full_dgamma, full_dbeta = bn.batch_norm_backward(
        dy, case.x, case.gamma, beta=case.beta, eps=case.eps, axis=case.axis,
        convention=case.convention)
    _, dgamma_tol, dbeta_tol = gradient_tolerances(
        case.x, dy, case.channel_axis, gamma=case.gamma, eps=case.resolved_eps,
        param_dtype="float32", factor=2.0)
    synced = Synced(out["y"], out["mean"], out["var"], out["dx"])
    results = forward_comparisons(case, k, synced)
    for j in range(k):
        results += [compare(out["dgamma"][j], full_dgamma, dgamma_tol, f"device {j} dgamma"),
                    compare(out["dbeta"][j], full_dbeta, dbeta_tol, f"device {j} dbeta")]
    assert_all(results)


@pytest.mark.parametrize("kind", LAYERS[:3])
def test_layers_synchronize_under_pmap(devices, kind):
    xs = _layer_batch(4)
    assert_all(layer_comparisons(kind, xs, result_of(devices, f"pmap-layer-{kind}")))


def test_linen_agrees_with_flax_linen_with_groups_under_pmap(devices):
    """Groups [[0, 1], [2, 3]] under pmap (the one place Flax's own groups run): bnref's
    linen BatchNorm against flax.linen.BatchNorm(use_fast_variance=False), and each pair
    against the unsynchronized layer on its two shards."""
    xs = _layer_batch(4, 8)
    got = result_of(devices, "pmap-flax-groups")
    results = []
    for group in GROUPS["pairs"]:
        part = xs[group]
        for name in ("ours", "flax"):
            y, mean, var = (a[group] for a in got[name])
            results += [r for r in layer_comparisons(
                "bnref.jax.flax.BatchNorm" if name == "ours" else "flax.linen.BatchNorm",
                part, (y, mean, var))]
    assert_all(results)
