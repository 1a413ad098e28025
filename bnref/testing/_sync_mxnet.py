"""Real multi-device runs of :class:`bnref.mxnet.SyncBatchNorm` for the synchronized property:
``mx.cpu(0)`` .. ``mx.cpu(k-1)`` are distinct devices of one MXNet engine in this process, one
block runs on each in a plain loop under ``autograd.record()`` (as Gluon code calls the
built-in ``SyncBatchNorm``), and the devices meet inside the block.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import bnref.mxnet as bm  # restores numpy.bool before mxnet is imported

# isort: split
import mxnet as mx
from mxnet import autograd, nd

from bnref.conventions import DEFAULT
from bnref.testing.sync import SyncCase, Synced

__all__ = ["make_block", "run", "run_mxnet_sync", "train_step"]

TIMEOUT = 30.0  # seconds a device waits for the others (a step takes milliseconds)


def make_block(sc: SyncCase, cls=bm.SyncBatchNorm, num_devices: int | None = None,
               hybridize: bool = False, **extra):
    """A block over ``sc.k`` CPU contexts with the case's parameters and state: bnref's
    ``SyncBatchNorm`` (with the case's axis, convention, momentum, eps), or a class taking
    the built-in's arguments (``cls`` with ``extra`` alone). A case without gamma (beta) gets
    ``scale=False`` (``center=False``): the parameter stays, untrained and unused."""
    case = sc.case
    channels = case.x.shape[case.channel_axis]
    k = sc.k if num_devices is None else num_devices
    if cls is bm.SyncBatchNorm or cls is bm.BatchNorm:
        extra = {"axis": case.axis, "convention": case.convention, "epsilon": case.eps,
                 "track_running_stats": case.running_mean is not None,
                 **({} if case.momentum is DEFAULT else {"momentum": case.momentum}), **extra}
        if cls is bm.SyncBatchNorm:
            extra.update(num_devices=k, timeout=TIMEOUT)
    else:  # the built-in: its own defaults
        extra = {"num_devices": k, **extra}
    block = cls(in_channels=channels, center=case.beta is not None,
                scale=case.gamma is not None, **extra)
    block.initialize(ctx=[mx.cpu(i) for i in range(sc.k)])
    if case.dtype in ("float16", "float64"):
        block.cast(case.dtype)
    for name in ("gamma", "beta", "running_mean", "running_var"):
        value = getattr(case, name)
        if value is not None:
            param = getattr(block, name)
            param.set_data(nd.array(value, dtype=param.dtype))
    if hybridize:
        with warnings.catch_warnings():
            # A lone block: no oneDNN operator follows its custom operator, so the hazard
            # bnref.mxnet.layer.hybridization_hazards warns of is not there.
            warnings.simplefilter("ignore", RuntimeWarning)
            block.hybridize()
    return block


def train_step(block, sc: SyncCase) -> Synced:
    """One training step on every context: the forwards in a plain loop inside
    ``autograd.record()``, then one backward over every output with the shards of ``dy``;
    each context's ``y``, running statistics and gradients, as numpy. Shards with zero rows
    need MXNet's NumPy shape semantics (its legacy shapes have no zero size)."""
    case = sc.case
    contexts = [mx.cpu(i) for i in range(sc.k)]
    empty = any(size == 0 for size in sc.sizes)
    with mx.util.np_shape(True) if empty else nullcontext():
        xs = [nd.array(shard, ctx=c, dtype=shard.dtype)
              for shard, c in zip(sc.shards, contexts, strict=True)]
        if sc.dy is not None:
            for x in xs:
                x.attach_grad()
        with autograd.record():
            ys = [block(x) for x in xs]
        if sc.dy is not None:
            autograd.backward(ys, [nd.array(dy, ctx=c, dtype=dy.dtype)
                                   for dy, c in zip(sc.dys, contexts, strict=True)])
        nd.waitall()

        def per_context(param, grad=False):
            if param is None:
                return None
            return [(param.grad(c) if grad else param.data(c)).asnumpy() for c in contexts]

        stats = case.running_mean is not None
        gradients = sc.dy is not None
        return Synced(
            y=[y.asnumpy() for y in ys],
            mean=per_context(block.running_mean) if stats else None,
            var=per_context(block.running_var) if stats else None,
            dx=[x.grad.asnumpy() for x in xs] if gradients else None,
            dgamma=per_context(block.gamma, True) if gradients and case.gamma is not None
            else None,
            dbeta=per_context(block.beta, True) if gradients and case.beta is not None
            else None)


def run(sc: SyncCase, hybridize: bool = False) -> Synced:
    return train_step(make_block(sc, hybridize=hybridize), sc)




def run_mxnet_sync(cases: list[SyncCase]) -> list[Synced]:
    """Every case on its ``k`` CPU contexts, in this process."""
    return [run(sc) for sc in cases]
