"""bnref.mxnet.BatchNorm against mxnet.gluon.nn.BatchNorm, measured in the same process.

    python benchmarks/bench_mxnet.py [--repeats 9]

float32, training mode (inside ``autograd.record()``), (64, 64, 56, 56) and (4096, 1024),
channels on axis 1, both blocks imperative (not hybridized). Forward waits for the output;
forward+backward also runs ``backward`` with a random head gradient (the built-in moves its
running statistics there). Times are medians over alternating rounds (see ``_timing.py``).
A last line gives the per-call overhead: forward+backward of a (100, 64) batch, no target
(bnref's layer is a Python custom operator: one that does nothing takes 1.5-2 ms here).
"""

from __future__ import annotations

from _timing import MemoryFloor, medians, reuse_freed_memory

reuse_freed_memory()

import bnref.mxnet as bm  # restores numpy.bool, which mxnet needs, before mxnet is imported

# isort: split
import argparse
import os

import mxnet as mx
from mxnet import autograd, gluon, nd

SHAPES = [(64, 64, 56, 56), (4096, 1024)]
SMALL = (100, 64)
TARGET = 1.0


def timed(block, x, dy, backward: bool):
    def run():
        with autograd.record():
            y = block(x)
        if backward:
            y.backward(dy)
            x.grad.wait_to_read()
        else:
            y.wait_to_read()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"mxnet {mx.__version__}, float32, CPU, {os.cpu_count()} cores, medians over 5 "
          f"alternating rounds of {args.repeats} calls")
    header = (f"{'shape':<18} {'pass':<17} {'gluon ms':>9} {'bnref ms':>9} {'ratio':>6} "
              f"{'gluon/floor':>11} {'bnref/floor':>11} target")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        x = nd.random.normal(shape=shape)
        x.attach_grad()
        dy = nd.random.normal(shape=shape)
        floor = MemoryFloor(x.size * 4)
        builtin, ours = gluon.nn.BatchNorm(), bm.BatchNorm()
        builtin.initialize()
        ours.initialize()
        for kind, backward in (("forward", False), ("forward+backward", True)):
            t_builtin, t_ours = medians(timed(builtin, x, dy, backward),
                                        timed(ours, x, dy, backward), args.repeats)
            ratio = t_ours / t_builtin
            verdict = "ok" if ratio <= TARGET else "MISSED"
            print(f"{shape!s:<18} {kind:<17} {1e3 * t_builtin:9.2f} {1e3 * t_ours:9.2f} "
                  f"{ratio:6.2f} {floor.ratio(t_builtin, kind):11.2f} "
                  f"{floor.ratio(t_ours, kind):11.2f} <= {TARGET} {verdict}")
    x = nd.random.normal(shape=SMALL)
    x.attach_grad()
    dy = nd.random.normal(shape=SMALL)
    builtin, ours = gluon.nn.BatchNorm(), bm.BatchNorm()
    builtin.initialize()
    ours.initialize()
    t_builtin, t_ours = medians(timed(builtin, x, dy, True), timed(ours, x, dy, True),
                                10 * args.repeats)
    print(f"\nper-call overhead, {SMALL} forward+backward: gluon {1e3 * t_builtin:.2f} ms, "
          f"bnref {1e3 * t_ours:.2f} ms (no target)")


if __name__ == "__main__":
    main()
