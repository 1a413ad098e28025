"""bnref.torch against torch.nn.BatchNorm2d / BatchNorm1d, measured in the same process.

    python benchmarks/bench_torch.py [--repeats 9] [--threads N]

float32, training mode, the same thread count for both (``torch.set_num_threads``). Forward
runs with autograd on (parameters require grad, as in training); forward+backward also asks
for the input's gradient. Times are medians over alternating rounds of back-to-back calls
(the built-in, then bnref, five times), so a slow stretch of the machine hits both.

Allocator: a fresh >= 32 MiB buffer costs ~13 ms of page faults here and both sides allocate
their outputs; the script re-executes itself with glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised so freed buffers are reused instead of faulted in again.

These inputs are large enough for bnref's compiled kernels (``bnref.torch._fused``): their
compile, paid once per process, is printed separately and kept out of the medians.
"""

from __future__ import annotations

from _timing import MemoryFloor, medians, reuse_freed_memory

reuse_freed_memory()

import argparse
import time

import torch

import bnref.torch as bt

CASES = [((64, 64, 56, 56), torch.nn.BatchNorm2d, torch.contiguous_format),
         ((64, 64, 56, 56), torch.nn.BatchNorm2d, torch.channels_last),
         ((4096, 1024), torch.nn.BatchNorm1d, torch.contiguous_format)]
TARGET = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, float32, {torch.get_num_threads()} threads, medians "
          f"over 5 alternating rounds of {args.repeats} calls")
    header = (f"{'shape':<20} {'layout':<13} {'pass':<17} {'built-in ms':>11} {'bnref ms':>9} "
              f"{'ratio':>6} {'built-in/floor':>14} {'bnref/floor':>11} target")
    print(header)
    print("-" * len(header))
    for shape, builtin_cls, layout in CASES:
        x = torch.randn(shape).contiguous(memory_format=layout)
        dy = torch.randn(shape).contiguous(memory_format=layout)
        floor = MemoryFloor(x.numel() * x.element_size())
        builtin, ours = builtin_cls(shape[1]), bt.BatchNorm(shape[1])
        x_grad = x.clone().requires_grad_()

        def forward(layer, x=x):
            return lambda: layer(x)

        def forward_backward(layer, x_grad=x_grad, dy=dy):
            def run():
                x_grad.grad = None
                layer(x_grad).backward(dy)
            return run

        # The first call per dtype and layout class compiles bnref's fused kernels (once per
        # process); timed here, outside the medians.
        start = time.perf_counter()
        forward_backward(ours)()
        first = time.perf_counter() - start
        for label, make in (("forward", forward), ("forward+backward", forward_backward)):
            t_builtin, t_ours = medians(make(builtin), make(ours), args.repeats)
            ratio = t_ours / t_builtin
            verdict = "ok" if ratio <= TARGET else "MISSED"
            name = "channels_last" if layout is torch.channels_last else "contiguous"
            print(f"{shape!s:<20} {name:<13} {label:<17} {1e3 * t_builtin:11.2f} "
                  f"{1e3 * t_ours:9.2f} {ratio:6.2f} {floor.ratio(t_builtin, label):14.2f} "
                  f"{floor.ratio(t_ours, label):11.2f} <= {TARGET} {verdict}")
        print(f"{'':<20} {'':<13} bnref's first forward+backward: {first:.1f} s "
              "(compiles its fused kernels once per process)")


if __name__ == "__main__":
    main()
