"""``bnref.mxnet.SyncBatchNorm`` on k CPU contexts of this process: k devices are the full batch.

MXNet contexts need no subprocess: ``mx.cpu(0)`` .. ``mx.cpu(k-1)`` are distinct devices of one
engine, and Gluon code runs one block on each (``ys = [bn(x) for x in xs]`` under
``autograd.record()``). The property (DESIGN.md "Synchronized batch norm",
:mod:`bnref.testing.sync`) runs straight from Hypothesis: k = 1..4, uneven shards, empty ones
(under MXNet's NumPy shape semantics, the only ones with zero sizes), every dtype the mxnet
adapter declares, every convention, imperative and hybridized. Then the offset-1e4 float32
batch; ``mxnet.gluon.contrib.nn.SyncBatchNorm`` as a cross-check on even splits and measured
where it is wrong (uneven splits, offset 1e4); eval and ``num_devices=1`` are
``bnref.mxnet.BatchNorm`` bit for bit; a missing device, or MXNet's engine ordering one device
behind another (Dropout around the layer), raises instead of hanging.

One subprocess, started with the module and bounded in time, runs the built-in (its operator
waits on a C++ barrier that no timeout can interrupt in this process) and a conv net trained
on two contexts against one context, with MXNET_CPU_TEMP_COPY and
MXNET_CPU_PARALLEL_RAND_COPY raised, as such training needs (see :mod:`bnref.mxnet.sync`).
"""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnref.testing.fixtures import backend_or_skip
from bnref.testing.strategies import BNCase
from bnref.testing.sync import (
    SyncCase,
    Synced,
    backward_comparisons,
    failures,
    forward_comparisons,
    sync_cases,
)

BACKEND = backend_or_skip("mxnet")  # skips without mxnet (fails when required)
import bnref.mxnet as bm  # noqa: E402  (restores numpy.bool before mxnet is imported)

# isort: split
import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402

from bnref.testing._sync_mxnet import TIMEOUT, make_block, run, train_step  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT = 120  # seconds for the subprocess (built-in cases, training runs)


# -- running a case on k contexts -------------------------------------------------------------


def rendezvous(block):
    """Where the block's devices meet (to shorten its timeout in a test)."""
    from bnref.mxnet.sync import _RENDEZVOUS

    return _RENDEZVOUS[block._key]


def comparisons(sc: SyncCase, out: Synced):
    results = forward_comparisons(sc, out)
    if sc.dy is not None:
        results += backward_comparisons(sc, out)
    return results


def assert_property(sc: SyncCase, out: Synced) -> None:
    problems = failures(comparisons(sc, out))
    assert not problems, "\n".join([*problems, repr(sc)])


# -- the property -----------------------------------------------------------------------------


@given(sync_cases(ks=(1, 2, 3, 4), dtypes=BACKEND.dtypes), st.booleans())
def test_k_contexts_give_the_full_batch(sc, hybridize):
    """Forward y per context, running statistics bit for bit the same on every context and
    the full batch's, dx per context, dgamma/dbeta parts summing to the full batch's: k = 1..4
    contexts, uneven and empty shards, float16/float32/float64, every convention; imperative,
    and hybridized when no shard is empty (see the test below)."""
    assert_property(sc, run(sc, hybridize and 0 not in sc.sizes))


def test_a_hybridized_block_refuses_an_empty_shard():
    """MXNet's cached graph never runs the operator for an empty input (the other devices
    would wait for it), and can die of a floating-point exception: refused up front."""
    sc = plain_case(sizes=(4, 0))
    block = make_block(sc, hybridize=True)
    with mx.util.np_shape(True), autograd.record(), pytest.raises(ValueError,
                                                                  match="hybridized"):
        block(nd.array(sc.shards[1], ctx=mx.cpu(1)))


def offset_case(sizes: tuple[int, ...], convention: str = "mxnet",
                dtype=np.float32) -> SyncCase:
    """NCW data around 1e4 with spread 1, a channel around -3e4 with spread 10 and a centred
    one; rows in the shards' sizes, channel axis 1 (where the built-in normalises)."""
    rng = np.random.default_rng(sum(sizes) * 31 + len(sizes))
    rows = sum(sizes)
    centres = np.array([1e4, -3e4, 0.0])[None, :, None]
    spreads = np.array([1.0, 10.0, 1.0])[None, :, None]
    x = (centres + spreads * rng.standard_normal((rows, 3, 6))).astype(dtype)
    case = BNCase(x=x, gamma=np.array([1.5, -0.5, 2.0], np.float32),
                  beta=np.array([0.1, 0.2, -0.3], np.float32),
                  running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
                  training=True, axis=1, convention=convention)
    dy = np.sin(np.arange(x.size) * 0.7).reshape(x.shape).astype(dtype)
    return SyncCase(case, sizes, dy)


@pytest.mark.parametrize("convention", ["mxnet", "torch", "keras"])
@pytest.mark.parametrize("sizes", [(4, 4), (3, 5), (2, 0, 9), (1, 6, 3, 5)],
                         ids=lambda sizes: "sizes-" + "-".join(map(str, sizes)))
def test_offset_1e4_float32_within_the_single_device_tolerance(sizes, convention):
    sc = offset_case(sizes, convention)
    assert_property(sc, run(sc))


# -- the built-in: a cross-check where it is right, measured where it is not ------------------


def builtin_step(sc: SyncCase) -> Synced:
    """One step of ``mxnet.gluon.contrib.nn.SyncBatchNorm`` (momentum 0.9, eps 1e-5, axis 1)
    on ``sc``'s shards: its running statistics move in backward, which this step runs."""
    from mxnet.gluon.contrib.nn import SyncBatchNorm

    case = sc.case
    assert case.convention == "mxnet" and case.channel_axis == 1 and case.eps is None
    block = make_block(sc, SyncBatchNorm)
    return train_step(block, sc)


def cross_check_cases() -> dict[str, SyncCase]:
    """Well-conditioned float32 NCHW batches split evenly over k = 2, 3, 4 contexts."""
    cases = {}
    for k in (2, 3, 4):
        rng = np.random.default_rng(k)
        x = (rng.uniform(-1, 3, (1, 4, 1, 1)) + rng.uniform(0.5, 2, (1, 4, 1, 1))
             * rng.standard_normal((4 * k, 4, 3, 5))).astype(np.float32)
        case = BNCase(x=x, gamma=rng.uniform(0.5, 2, 4).astype(np.float32),
                      beta=rng.uniform(-1, 1, 4).astype(np.float32),
                      running_mean=rng.uniform(-1, 1, 4).astype(np.float32),
                      running_var=rng.uniform(0.5, 2, 4).astype(np.float32), training=True,
                      convention="mxnet")
        cases[f"even k={k}"] = SyncCase(case, (4,) * k,
                                        rng.standard_normal(x.shape).astype(np.float32))
    return cases


def measured_cases() -> dict[str, SyncCase]:
    """Where the built-in goes wrong: an uneven split of a well-conditioned batch, and the
    offset-1e4 float32 batch split evenly."""
    uneven = cross_check_cases()["even k=2"]
    return {"uneven 3+5": SyncCase(uneven.case, (3, 5), uneven.dy),
            "offset 1e4": offset_case((4, 4))}


# MXNet gives every CPU context one pool of engine resources (MXNET_CPU_TEMP_COPY temporary
# workspaces, default 4; MXNET_CPU_PARALLEL_RAND_COPY random generators, default 1), read when
# it starts: the subprocess raises them, as a user training a conv net on CPU contexts must
# (see bnref.mxnet.sync and test_dropout_around_it_raises_instead_of_hanging).
SUBPROCESS_ENV = {"MXNET_CPU_TEMP_COPY": "64", "MXNET_CPU_PARALLEL_RAND_COPY": "8",
                  "MXNET_MKLDNN_ENABLED": "0"}  # see _conv_net


@pytest.fixture(scope="module", autouse=True)
def subprocess_run(tmp_path_factory):
    """The subprocess running every built-in case and the training runs, started with the
    module (it imports MXNet while the tests above run) and ended with it:
    (process, folder, start time)."""
    folder = tmp_path_factory.mktemp("mxnet-sync")
    with open(folder / "cases.pkl", "wb") as f:
        pickle.dump({**cross_check_cases(), **measured_cases()}, f)
    env = dict(os.environ, **SUBPROCESS_ENV, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(folder / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.test_mxnet_sync", str(folder)],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process, folder, time.monotonic()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture(scope="module")
def subprocess_results(subprocess_run) -> dict:
    """The subprocess' results, waited for until SUBPROCESS_TIMEOUT after its start:
    ``{"builtin": {case name: Synced}, "training": {...}}``."""
    process, folder, start = subprocess_run
    try:
        process.wait(max(1.0, SUBPROCESS_TIMEOUT - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log = (folder / "log.txt").read_text()[-4000:]
    assert process.returncode == 0, f"the subprocess failed or hung:\n{log}"
    with open(folder / "results.pkl", "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def builtin_runs(subprocess_results) -> dict[str, Synced]:
    return subprocess_results["builtin"]


def _close(name, got, expected, rtol=2e-5, atol=2e-5):
    for j, (a, b) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{name} on cpu({j})")


@pytest.mark.parametrize("name", list(cross_check_cases()))
def test_agrees_with_gluon_syncbatchnorm_on_even_splits(builtin_runs, name):
    """On well-conditioned float32 data split evenly, the built-in is right: bnref's block
    and it agree within float32 rounding, running statistics included (the built-in's read
    after the backward, where it moves them)."""
    sc = cross_check_cases()[name]
    ours, theirs = run(sc), builtin_runs[name]
    assert_property(sc, theirs)  # the built-in meets the property here
    for field in ("y", "mean", "var", "dx", "dgamma", "dbeta"):
        _close(field, getattr(ours, field), getattr(theirs, field))


def _worst(results) -> str:
    worst = max(results, key=lambda r: r.ratio)
    return f"{worst.what}: |error| {worst.deciding_error:.3g} (tolerance {worst.tolerance:.3g})"


def _largest(results, field: str) -> float:
    """The largest error of the comparisons of one quantity against the float64 oracle."""
    errors = [r.max_error for r in results
              if r.what.split(" vs ")[0].endswith(field) and "oracle" in r.what]
    return max(errors) if errors else float("nan")


@pytest.mark.parametrize("name", list(measured_cases()))
def test_measures_gluon_syncbatchnorm_where_it_is_wrong(builtin_runs, name):
    """Uneven shards: the built-in averages the devices' moments without weights. Offset 1e4
    in float32: its E[x²] - E[x]² cancels (a channel's variance comes out 0). bnref stays
    within the single-device tolerance; the built-in fails it, its y and dx errors thousands
    of times bnref's (printed side by side: ``pytest -s``)."""
    sc = measured_cases()[name]
    ours, theirs = comparisons(sc, run(sc)), comparisons(sc, builtin_runs[name])
    assert not failures(ours), "\n".join(failures(ours))
    for field in ("y", "dx", "running_mean", "running_var"):
        print(f"{name}: max |{field} error| vs the float64 oracle: gluon "
              f"{_largest(theirs, field):.3g}, bnref {_largest(ours, field):.3g}")
    print(f"{name}: gluon's worst against the tolerance: {_worst(theirs)}")
    assert failures(theirs), "the built-in met the property here"
    for field in ("y", "dx"):
        assert _largest(theirs, field) > 1000 * _largest(ours, field), field


# -- when nothing is synchronized -------------------------------------------------------------


def plain_case(sizes=(5, 7), dtype=np.float32) -> SyncCase:
    rng = np.random.default_rng(0)
    x = (3 + 2 * rng.standard_normal((sum(sizes), 4, 3, 2))).astype(dtype)
    case = BNCase(x=x, gamma=np.linspace(0.5, 2, 4, dtype=np.float32),
                  beta=np.linspace(-1, 1, 4, dtype=np.float32),
                  running_mean=np.full(4, 0.5, np.float32),
                  running_var=np.full(4, 2.0, np.float32), training=True, convention="mxnet")
    return SyncCase(case, sizes, rng.standard_normal(x.shape).astype(dtype))


def _assert_identical(got: Synced, expected: Synced) -> None:
    for field in ("y", "mean", "var", "dx", "dgamma", "dbeta"):
        for j, (a, b) in enumerate(zip(getattr(got, field), getattr(expected, field),
                                       strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"{field} on cpu({j})")


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_one_device_is_the_plain_layer_bit_for_bit(hybridize):
    sc = plain_case(sizes=(12,))
    _assert_identical(train_step(make_block(sc, hybridize=hybridize), sc),
                      train_step(make_block(sc, bm.BatchNorm, hybridize=hybridize), sc))


def eval_step(block, sc: SyncCase, devices) -> Synced:
    """A backward under ``autograd.record(train_mode=False)`` on the given devices only: the
    others never call the block (a synchronized call would wait for them, then raise)."""
    contexts = [mx.cpu(i) for i in devices]
    xs = [nd.array(sc.shards[i], ctx=c) for i, c in zip(devices, contexts, strict=True)]
    for x in xs:
        x.attach_grad()
    with autograd.record(train_mode=False):
        ys = [block(x) for x in xs]
    autograd.backward(ys, [nd.array(sc.dys[i], ctx=c)
                           for i, c in zip(devices, contexts, strict=True)], train_mode=False)
    return Synced(y=[y.asnumpy() for y in ys],
                  mean=[block.running_mean.data(c).asnumpy() for c in contexts],
                  var=[block.running_var.data(c).asnumpy() for c in contexts],
                  dx=[x.grad.asnumpy() for x in xs],
                  dgamma=[block.gamma.grad(c).asnumpy() for c in contexts],
                  dbeta=[block.beta.grad(c).asnumpy() for c in contexts])


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_eval_is_the_plain_layer_bit_for_bit_and_does_not_wait(hybridize):
    """In predict mode each context normalises with the running statistics, exactly as
    bnref.mxnet.BatchNorm; device 1 alone calls it (device 0 would be waited for)."""
    sc = plain_case()
    synced = make_block(sc, hybridize=hybridize)
    rendezvous(synced).timeout = 0.5  # were it to wait, it would raise soon
    plain = make_block(sc, bm.BatchNorm, hybridize=hybridize)
    _assert_identical(eval_step(synced, sc, [1]), eval_step(plain, sc, [1]))
    y = synced(nd.array(sc.shards[0], ctx=mx.cpu(0)))  # outside record: inference
    np.testing.assert_array_equal(y.asnumpy(), plain(nd.array(sc.shards[0])).asnumpy())


def test_use_global_stats_is_the_plain_layer_in_training():
    sc = plain_case()
    synced = make_block(sc, use_global_stats=True)
    plain = make_block(sc, bm.BatchNorm, use_global_stats=True)
    xs = [nd.array(shard, ctx=mx.cpu(1)) for shard in sc.shards[1:]]
    with autograd.record():
        got, expected = synced(xs[0]), plain(xs[0])
    np.testing.assert_array_equal(got.asnumpy(), expected.asnumpy())


# -- a training run (in the subprocess) -------------------------------------------------------


def _conv_net(norm, contexts, static: bool):
    """Conv -> norm -> relu -> Conv -> norm -> relu -> pool -> Dense with the same weights
    whatever ``norm`` is (drawn in parameter order); imperative, or hybridized with
    ``static_alloc=True`` in the subprocess, which runs with oneDNN off: the recipe
    :func:`bnref.mxnet.layer.hybridization_hazards` gives. Measured on this net with oneDNN
    on, the default ``hybridize()`` gave wrong gradients in 13 of 20 runs, ``static_alloc``
    NaNs in CI, and ``static_shape=True`` lost running-statistic updates in 16 of 30; with
    oneDNN off, 0 wrong in 55 runs of ``hybridize()`` with or without ``static_alloc``."""
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, padding=1, in_channels=3), norm(), gluon.nn.Activation("relu"),
            gluon.nn.Conv2D(4, 3, padding=1, in_channels=4), norm(), gluon.nn.Activation("relu"),
            gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(2, in_units=4))
    net.initialize(ctx=contexts)
    rng = np.random.default_rng(0)
    for param in net.collect_params().values():
        if param.grad_req != "null":
            param.set_data(nd.array(rng.uniform(-0.5, 0.5, param.shape)))
    if static:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no hazard left to warn of
            net.hybridize(static_alloc=True)
    return net


def train_conv_net(synchronized: bool, static: bool = False,
                   steps: int = 4) -> dict[str, list[np.ndarray]]:
    """``steps`` SGD steps of :func:`_conv_net` on batches of 8: with SyncBatchNorm over
    cpu(0) and cpu(1) holding 3 and 5 rows, or with BatchNorm on cpu(0) holding all 8. The
    loss is a sum over rows, so the Trainer's sum of the contexts' gradients is the whole
    batch's. Returns every parameter's value on each context, in parameter order."""
    contexts = [mx.cpu(0), mx.cpu(1)] if synchronized else [mx.cpu(0)]
    if synchronized:
        def norm():
            return bm.SyncBatchNorm(4, num_devices=2, timeout=TIMEOUT)
    else:
        def norm():
            return bm.BatchNorm(num_features=4)
    net = _conv_net(norm, contexts, static)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05})
    rng = np.random.default_rng(1)
    shards = (slice(0, 3), slice(3, 8)) if synchronized else (slice(0, 8),)
    for _ in range(steps):
        x = rng.normal(1, 2, (8, 3, 6, 6)).astype(np.float32)
        target = rng.normal(size=(8, 2)).astype(np.float32)
        with autograd.record():
            outs = [net(nd.array(x[rows], ctx=c)) for rows, c in zip(shards, contexts,
                                                                      strict=True)]
            losses = [((out - nd.array(target[rows], ctx=c)) ** 2).sum()
                      for out, rows, c in zip(outs, shards, contexts, strict=True)]
        autograd.backward(losses)
        trainer.step(8)
    return {name: [param.data(c).asnumpy() for c in contexts]
            for name, param in zip(_structural_names(net), net.collect_params().values(),
                                   strict=True)}


def _structural_names(net) -> list[str]:
    return list(net._collect_params_with_prefix().keys())


@pytest.mark.parametrize("graph", ["imperative", "static"])
def test_training_on_two_contexts_is_training_on_the_whole_batch(subprocess_results, graph):
    """A conv net with two SyncBatchNorm layers, trained by a Gluon Trainer over cpu(0) and
    cpu(1) on uneven shards (3 + 5 rows), imperative or hybridized (static graph), ends where
    the same net with BatchNorm trained imperatively on one context with the whole batches
    does (within float32 rounding over 4 steps), with the same parameters and running
    statistics on both contexts."""
    ours, whole = subprocess_results["training"][graph], subprocess_results["training"]["whole"]
    assert list(ours) == list(whole)
    for name, values in ours.items():
        np.testing.assert_array_equal(values[0], values[1], err_msg=name)
        np.testing.assert_allclose(values[0], whole[name][0], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_dropout_around_it_raises_instead_of_hanging():
    """The limit MXNet's CPU contexts put on every synchronized batch norm: Dropout before
    and after it. Each device's dropouts draw from MXNet's one CPU random generator, taken in
    the order the operators were queued: device 0's second dropout (which needs device 0's
    SyncBatchNorm, which needs device 1's) is queued before device 1's first. The built-in
    hangs there for ever; bnref's block raises after its timeout. (Raising
    MXNET_CPU_PARALLEL_RAND_COPY before MXNet starts lifts it: the subprocess trains so.)"""
    if int(os.environ.get("MXNET_CPU_PARALLEL_RAND_COPY", "1")) > 1:
        pytest.skip("MXNET_CPU_PARALLEL_RAND_COPY > 1: the dropouts have generators apart")
    contexts = [mx.cpu(0), mx.cpu(1)]
    net = gluon.nn.HybridSequential()
    block = bm.SyncBatchNorm(3, num_devices=2, timeout=TIMEOUT)
    net.add(gluon.nn.Dropout(0.5), block, gluon.nn.Dropout(0.5))
    net.initialize(ctx=contexts)
    rendezvous(block).timeout = 0.3
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    with autograd.record():
        ys = [net(nd.array(x[rows], ctx=c)) for rows, c in zip((slice(0, 4), slice(4, 8)),
                                                                contexts, strict=True)]
    with pytest.raises(mx.base.MXNetError):
        nd.waitall()
    del ys


# -- what a user of the built-in relies on ----------------------------------------------------


def test_constructor_is_gluon_syncbatchnorms():
    from mxnet.gluon.contrib.nn import SyncBatchNorm

    theirs = list(inspect.signature(SyncBatchNorm.__init__).parameters)[1:-1]  # no **kwargs
    ours = list(inspect.signature(bm.SyncBatchNorm.__init__).parameters)[1:len(theirs) + 1]
    assert ours == theirs
    block = bm.SyncBatchNorm(3, 2, 0.8, 1e-3, False, True, prefix="sbn_")
    assert (block.num_devices, block.momentum, block.epsilon, block.center, block.scale,
            block.axis, block.prefix) == (2, 0.8, 1e-3, False, True, 1, "sbn_")
    assert isinstance(block, bm.BatchNorm)
    with pytest.warns(UserWarning, match="num_devices"):  # the built-in's warning
        assert bm.SyncBatchNorm(3).num_devices == max(mx.context.num_gpus(), 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_devices"):
            bm.SyncBatchNorm(3, bad)


def test_parameters_move_between_gluon_and_bnref_both_ways(tmp_path):
    from mxnet.gluon.contrib.nn import SyncBatchNorm

    theirs = SyncBatchNorm(in_channels=3, num_devices=2)
    theirs.initialize()
    rng = np.random.default_rng(5)
    for param in theirs.collect_params().values():
        param.set_data(nd.array(rng.uniform(0.5, 2, 3)))
    theirs.save_parameters(str(tmp_path / "gluon.params"))
    ours = bm.SyncBatchNorm(num_devices=2)
    ours.load_parameters(str(tmp_path / "gluon.params"))
    x = rng.normal(1, 2, (4, 3, 5))
    gamma, beta, mean, var = (theirs._reg_params[name].data().asnumpy()[None, :, None]
                              for name in ("gamma", "beta", "running_mean", "running_var"))
    expected = gamma * (x - mean) / np.sqrt(var + 1e-5) + beta  # inference
    np.testing.assert_allclose(ours(nd.array(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    ours.save_parameters(str(tmp_path / "ours.params"))
    back = SyncBatchNorm(in_channels=3, num_devices=2)
    back.load_parameters(str(tmp_path / "ours.params"))
    for name, param in back._reg_params.items():
        np.testing.assert_array_equal(param.data().asnumpy(),
                                      theirs._reg_params[name].data().asnumpy(), err_msg=name)


def test_a_missing_device_raises_instead_of_hanging():
    """One of two devices calls the block: it waits ``timeout`` seconds, then MXNet reports
    the error at the next read; the next full step works."""
    sc = plain_case()
    block = make_block(sc)
    rendezvous(block).timeout = 0.3
    with autograd.record():
        y = block(nd.array(sc.shards[0], ctx=mx.cpu(0)))
    with pytest.raises(mx.base.MXNetError):
        y.asnumpy()
    # Nothing moved, nothing is left half done: the next step is the full batch's.
    assert_property(sc, train_step(block, sc))


def test_naive_engine_is_refused(monkeypatch):
    monkeypatch.setenv("MXNET_ENGINE_TYPE", "NaiveEngine")
    with pytest.raises(ValueError, match="NaiveEngine"):
        bm.SyncBatchNorm(3, num_devices=2)
    assert bm.SyncBatchNorm(3, num_devices=1).num_devices == 1  # nothing to wait for


def _subprocess_main(folder: str) -> None:
    """The subprocess: every built-in case, then the training runs; a hang ends it
    (faulthandler) before the parent's timeout does."""
    import faulthandler

    faulthandler.dump_traceback_later(SUBPROCESS_TIMEOUT - 10, exit=True)
    with open(Path(folder) / "cases.pkl", "rb") as f:
        cases = pickle.load(f)
    results = {"builtin": {name: builtin_step(sc) for name, sc in cases.items()},
               "training": {"imperative": train_conv_net(True),
                            "static": train_conv_net(True, static=True),
                            "whole": train_conv_net(False)}}
    with open(Path(folder) / "results.pkl", "wb") as f:
        pickle.dump(results, f)
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    _subprocess_main(sys.argv[1])
