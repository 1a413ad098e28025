"""Speed of the numpy oracle against the memory-bandwidth floor, measured in the same run.

    python benchmarks/bench_numpy.py [--repeats 9]

Single-threaded float32. The floor (``_timing.MemoryFloor``) is the time the memory traffic
alone takes at the bandwidth ``np.copyto`` reaches on an array of the same size: a training
forward moves 3 array-sizes (read x for the statistics, read x and write y to normalise),
forward+backward 8 (see ``_timing.PASSES``; numpy's ``batch_norm_backward`` takes x, not saved
statistics, so it needs one more read of x than that floor counts).

Allocator: a fresh >= 32 MiB buffer costs ~13 ms of page faults here, which would swamp the
numbers. The script re-executes itself with glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised so that freed buffers are reused, not returned to the
kernel; every timing below runs after a warm-up call under that setting.
"""

from __future__ import annotations

from _timing import MemoryFloor, medians, reuse_freed_memory

reuse_freed_memory({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

import argparse

import numpy as np

import bnref.numpy as bn

SHAPES = [(64, 64, 56, 56), (4096, 1024)]


def textbook(x, gamma, beta, axes):
    """The naive version for context: whole-array temporaries, numpy's multi-axis reductions."""
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * gamma + beta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, float32, single thread, medians over 5 alternating "
          f"rounds of {args.repeats} calls")
    header = (f"{'shape':<20} {'copy ms':>8} {'floor ms':>8} {'fwd ms':>8} {'fwd/floor':>9} "
              f"{'f+b ms':>8} {'f+b/floor':>9} {'textbook fwd/floor':>18}")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        channels = shape[1]
        gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
        mean, var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        per_channel = [1] * x.ndim
        per_channel[1] = -1

        def forward(x=x, gamma=gamma, beta=beta, mean=mean, var=var):
            return bn.batch_norm(x, gamma, beta, mean, var, training=True)

        def forward_backward(x=x, dy=dy, gamma=gamma, beta=beta, mean=mean, var=var):
            bn.batch_norm(x, gamma, beta, mean, var, training=True)
            return bn.batch_norm_backward(dy, x, gamma, eps=1e-5, axis=1)

        g, b = gamma.reshape(per_channel), beta.reshape(per_channel)
        floor = MemoryFloor(x.nbytes, args.repeats)
        t_text, t_fwd = medians(lambda x=x, g=g, b=b, axes=axes: textbook(x, g, b, axes),
                                forward, args.repeats)
        _, t_fb = medians(forward, forward_backward, max(3, args.repeats // 3))
        print(f"{shape!s:<20} {1e3 * floor.copy_seconds:8.2f} "
              f"{1e3 * floor.floor('forward'):8.2f} {1e3 * t_fwd:8.2f} "
              f"{floor.ratio(t_fwd, 'forward'):9.2f} {1e3 * t_fb:8.2f} "
              f"{floor.ratio(t_fb, 'forward+backward'):9.2f} "
              f"{floor.ratio(t_text, 'forward'):18.2f}")
    print("\nTarget (issue 17): training forward <= 2x the floor.")


if __name__ == "__main__":
    main()
