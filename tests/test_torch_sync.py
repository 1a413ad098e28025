"""``bnref.torch.SyncBatchNorm`` on real gloo process groups: k ranks are the full batch.

The property (DESIGN.md "Synchronized batch norm", :mod:`bnref.testing.sync`) runs through
:class:`bnref.testing._sync_torch.TorchSyncPool`: four worker processes on loopback, one
process group of the first k ranks for every k in 1..4, kept up for the whole module, so
Hypothesis drives every example through real collectives (uneven shards, empty ones, every
dtype and convention). Then what a user of ``torch.nn.SyncBatchNorm`` relies on: eval and a
group of one do not communicate, ``convert_sync_batchnorm`` keeps the state, state dicts load
both ways, and a DDP training run on two ranks (``examples/ddp_sync_batchnorm.py`` under
``torchrun``) ends with the weights of one process trained on the whole batches.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given

import bnref.numpy as bn
from bnref.testing.fixtures import backend_or_skip
from bnref.testing.strategies import BNCase
from bnref.testing.sync import (
    SyncCase,
    backward_comparisons,
    failures,
    forward_comparisons,
    sync_cases,
)

backend_or_skip("torch")
import torch  # noqa: E402

import bnref.torch as bt  # noqa: E402
from bnref.testing._sync_torch import TorchSyncPool, WorkerError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORLD = 4


@pytest.fixture(scope="module")
def pool():
    with TorchSyncPool(WORLD, timeout=120) as workers:
        yield workers


def assert_property(sc: SyncCase, out) -> None:
    results = forward_comparisons(sc, out)
    if sc.dy is not None:
        results += backward_comparisons(sc, out)
    problems = failures(results)
    assert not problems, "\n".join([*problems, repr(sc)])


# -- the property -----------------------------------------------------------------------------


@given(sync_cases())
def test_k_ranks_give_the_full_batch(pool, sc):
    """Forward y per rank, running statistics identical on every rank and the full batch's,
    dx per rank, dgamma/dbeta parts summing to the full batch's: k = 1..4, uneven and empty
    shards, float16/bfloat16/float32/float64, every convention."""
    assert_property(sc, pool.run(sc))


def _offset_case(k: int, convention: str, sizes: tuple[int, ...]) -> SyncCase:
    """float32 values at offset 1e4 with spread 1 (and a channel at -3e4, spread 10)."""
    rng = np.random.default_rng(k)
    rows = sum(sizes)
    x = np.stack([1e4 + rng.standard_normal(rows), -3e4 + 10 * rng.standard_normal(rows),
                  rng.standard_normal(rows)], axis=1)
    axis = -1 if convention != "torch" else 1
    case = BNCase(x=x.astype(np.float32), gamma=np.array([1.5, -0.5, 2.0], np.float32),
                  beta=np.array([0.1, 0.2, -0.3], np.float32),
                  running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
                  training=True, axis=axis, convention=convention)
    dy = np.cos(np.arange(x.size)).reshape(x.shape).astype(np.float32)
    return SyncCase(case, sizes, dy)


@pytest.mark.parametrize("convention", ["torch", "keras", "flax", "mxnet", "onnx"])
@pytest.mark.parametrize("sizes", [(7, 9), (5, 0, 11), (1, 6, 0, 9)],
                         ids=lambda sizes: "sizes-" + "-".join(map(str, sizes)))
def test_offset_1e4_float32_within_the_single_device_tolerance(pool, sizes, convention):
    sc = _offset_case(len(sizes), convention, sizes)
    assert_property(sc, pool.run(sc))


# -- when nothing is synchronized -------------------------------------------------------------


def _plain_case(sizes=(5, 7)) -> SyncCase:
    rng = np.random.default_rng(0)
    x = (3 + 2 * rng.standard_normal((sum(sizes), 4, 3, 2))).astype(np.float32)
    case = BNCase(x=x, gamma=np.linspace(0.5, 2, 4, dtype=np.float32),
                  beta=np.linspace(-1, 1, 4, dtype=np.float32),
                  running_mean=np.full(4, 0.5, np.float32),
                  running_var=np.full(4, 2.0, np.float32), training=True)
    return SyncCase(case, sizes, rng.standard_normal(x.shape).astype(np.float32))


def test_a_group_of_one_rank_is_the_plain_layer_bit_for_bit(pool):
    sc = _plain_case(sizes=(12,))
    [(synced, plain)] = pool.call("step_beside_plain", 1, sc)
    for name, got, expected in zip(("y", "running_mean", "running_var", "dx", "dweight",
                                    "dbias"), synced, plain, strict=True):
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_eval_does_not_communicate(pool):
    """Rank 0 alone runs a layer over a group of two in eval(): it returns (a collective
    would wait for rank 1 until the pool's timeout), with the running statistics."""
    sc = _plain_case()
    y = pool.call("alone_in_eval", 2, sc)[0]
    case = sc.case
    expected, _, _ = bn.batch_norm(sc.shards[0], *case.arrays[1:], training=False)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def _layer(cls, **kwargs):
    torch.manual_seed(0)
    layer = cls(4, **kwargs)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    return layer


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_outside_a_process_group_it_is_the_plain_layer_bit_for_bit(training):
    assert not torch.distributed.is_initialized()
    synced, plain = _layer(bt.SyncBatchNorm), _layer(bt.BatchNorm)
    synced.train(training), plain.train(training)
    x = (3 + 2 * torch.randn(6, 4, 5, 5)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = synced(x), plain(x2)
    dy = torch.randn_like(y)
    y.backward(dy), y2.backward(dy)
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    for (name, a), (_, b) in zip([*synced.named_parameters(), *synced.named_buffers()],
                                 [*plain.named_parameters(), *plain.named_buffers()],
                                 strict=True):
        assert torch.equal(a, b), name
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name


# -- errors -----------------------------------------------------------------------------------


def test_one_value_over_the_whole_group_is_refused_on_every_rank(pool):
    """Under the torch convention a union of one value per channel is refused, with the same
    error on every rank (one rank alone holding one value is fine: test above)."""
    rng = np.random.default_rng(1)
    case = BNCase(x=rng.standard_normal((1, 3)).astype(np.float32), gamma=None, beta=None,
                  running_mean=None, running_var=None, training=True)
    with pytest.raises(WorkerError, match="Expected more than 1 value per channel"):
        pool.run(SyncCase(case, (1, 0)))
    sc = _plain_case()  # the ranks are still in step after the refusal
    assert_property(sc, pool.run(sc))


def test_torch_builtin_refuses_cpu_tensors_in_a_group(pool):
    """Why there is no built-in to compare with on a CPU machine: torch.nn.SyncBatchNorm
    raises on CPU tensors in training over a group of two (measured, not assumed)."""
    answers = pool.call("builtin_on_cpu", 2, _plain_case())
    assert all("expected input tensor to be on GPU" in a for a in answers), answers


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="torch.nn.SyncBatchNorm synchronizes CUDA/XPU tensors only, and "
                           "this machine has no CUDA device")
def test_agrees_with_torch_syncbatchnorm_on_cuda():
    """On a CUDA machine: bnref's layer and torch's on one GPU in a group of one agree (the
    same kernels path torch takes there is its batch_norm; the multi-GPU run is the same
    pool with nccl)."""
    synced, builtin = _layer(bt.SyncBatchNorm).cuda(), _layer(torch.nn.SyncBatchNorm).cuda()
    x = (3 + 2 * torch.randn(6, 4, 5, 5)).cuda()
    torch.testing.assert_close(synced(x), builtin(x))
    torch.testing.assert_close(synced.running_var, builtin.running_var)


# -- drop-in ----------------------------------------------------------------------------------


def test_state_dict_is_torch_syncbatchnorms_both_ways():
    ours, theirs = _layer(bt.SyncBatchNorm), _layer(torch.nn.SyncBatchNorm)
    state = ours.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in state.items()] == [
        (k, v.shape, v.dtype) for k, v in theirs.state_dict().items()]
    fresh = torch.nn.SyncBatchNorm(4)
    fresh.load_state_dict(state)
    back = bt.SyncBatchNorm(4)
    back.load_state_dict(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
        assert torch.equal(fresh.state_dict()[key], state[key]), key


def test_constructor_is_torch_syncbatchnorms():
    group = object()  # any process-group handle is kept as given
    layer = bt.SyncBatchNorm(8, 1e-3, 0.3, True, True, group, bias=False)
    assert (layer.eps, layer.momentum, layer.process_group, layer.bias) == (1e-3, 0.3, group,
                                                                            None)
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(layer, bt.BatchNorm)
    # Not a torch.nn.SyncBatchNorm: DDP refuses those in CPU models.
    assert not isinstance(layer, torch.nn.SyncBatchNorm)


def test_convert_sync_batchnorm_keeps_state_axis_and_convention():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), _layer(torch.nn.BatchNorm2d),
        torch.nn.Sequential(_layer(bt.BatchNorm2d), torch.nn.Flatten(2)),
        _layer(torch.nn.SyncBatchNorm), torch.nn.Unflatten(2, (5, 5)))
    model = torch.nn.ModuleDict({"net": net, "head": _layer(bt.BatchNorm, axis=-1,
                                                            convention="keras").eval()})
    net[1].qconfig = "kept"
    before = copy.deepcopy(model)
    originals = [net[1], net[2][0], net[3], model["head"]]
    group = object()
    converted = bt.SyncBatchNorm.convert_sync_batchnorm(model, group)
    layers = [converted["net"][1], converted["net"][2][0], converted["net"][3],
              converted["head"]]
    assert all(type(layer) is bt.SyncBatchNorm for layer in layers)
    assert all(layer.process_group is group for layer in layers)
    for new, old in zip(layers, originals, strict=True):
        assert new.running_mean is old.running_mean and new.weight is old.weight
        assert (new.eps, new.momentum, new.training) == (old.eps, old.momentum, old.training)
    assert (layers[3].axis, layers[3].convention.name) == (-1, "keras")
    assert layers[0].qconfig == "kept"
    assert converted.state_dict().keys() == before.state_dict().keys()
    # torch's layers become bnref's math: equal up to float32 rounding (the default bounds)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(converted["net"].train()(x), before["net"].train()(x))
    torch.testing.assert_close(converted.state_dict(), before.state_dict())
    single = bt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
    assert type(single) is bt.SyncBatchNorm and single.num_features == 3


# -- a real training run: DDP over two processes ----------------------------------------------


def _torchrun(args: list[str], env: dict[str, str], timeout: float) -> None:
    """The README's torchrun command (torchrun is this interpreter's torch.distributed.run)."""
    match = re.search(r"<!-- example:torchrun -->\n```\w*\n(.*?)```",
                      (REPO / "README.md").read_text(), re.S)
    assert match, "README has no torchrun example"
    words = match.group(1).split()
    assert words[0] == "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", *words[1:], *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_ddp_on_two_processes_ends_where_one_process_does(tmp_path):
    """Both ranks end with the same weights and running statistics (bit for bit: DDP keeps
    them in step), and those are one process's, trained on the whole batches, within
    ``steps * 64 * u`` relative to each tensor's largest value (u the dtype's unit roundoff:
    the ranks sum the gradients in another order, and each step's rounding carries over)."""
    steps, dtype = 8, "float32"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    args = ["--steps", str(steps), "--dtype", dtype]
    _torchrun([*args, "--out", str(tmp_path / "ddp")], env, timeout=180)
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import ddp_sync_batchnorm as example
    finally:
        sys.path.remove(str(REPO / "examples"))
    example.main([*args, "--out", str(tmp_path / "one")])
    rank0, rank1, one = (torch.load(tmp_path / name, weights_only=True) for name in (
        "ddp/rank0.pt", "ddp/rank1.pt", "one/rank0.pt"))
    unit = float(torch.finfo(getattr(torch, dtype)).eps) / 2
    for key, value in one.items():
        assert torch.equal(rank0[key], rank1[key]), key
        if value.is_floating_point():
            bound = steps * 64 * unit * value.abs().max().item()
            error = (rank0[key] - value).abs().max().item()
            assert error <= bound, f"{key}: |error| {error:.3g} > {bound:.3g}"
        else:
            assert torch.equal(rank0[key], value), key
