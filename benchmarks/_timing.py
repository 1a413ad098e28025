"""Shared timing helpers for the benchmark scripts (ratios measured in the same run).

A fresh >= 32 MiB buffer costs ~13 ms of page faults on this machine, which would swamp the
numbers: :func:`reuse_freed_memory` re-executes the script with glibc's
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised so that freed buffers are kept and
reused, not returned to the kernel and faulted in again.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def reuse_freed_memory(extra: dict[str, str] | None = None) -> None:
    """Re-execute this script once with the allocator settings (and ``extra``) in place."""
    wanted = {**ALLOCATOR, **(extra or {})}
    if any(os.environ.get(key) != value for key, value in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def medians(reference: Callable[[], object], candidate: Callable[[], object], repeats: int,
            rounds: int = 5) -> tuple[float, float]:
    """Median steady-state times of both, measured in alternating rounds.

    Each round runs one side ``repeats`` times back to back, then the other, so both are timed
    in steady state and a slow stretch of the machine hits both sides alike.
    """
    reference(), candidate()  # warm-up: first-touch page faults, caches, compilation
    ref_times: list[float] = []
    cand_times: list[float] = []
    for _ in range(rounds):
        ref_times += [_seconds(reference) for _ in range(repeats)]
        cand_times += [_seconds(candidate) for _ in range(repeats)]
    return statistics.median(ref_times), statistics.median(cand_times)


# A training forward reads x twice (statistics, then normalisation) and writes y: 3 array
# passes. Forward+backward with saved statistics adds the backward's 5: read dy and x for the
# two per-channel sums, read them again and write dx.
PASSES = {"forward": 3, "forward+backward": 8}


class MemoryFloor:
    """The time the memory traffic alone takes for an array of ``nbytes``, at the bandwidth
    ``np.copyto`` reaches on the same bytes in this run (a copy is 2 passes: one read, one
    write). ``floor(kind) = PASSES[kind] / 2 * t_copy``; :meth:`ratio` is a time over it."""

    def __init__(self, nbytes: int, repeats: int = 9) -> None:
        import numpy as np

        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)

        def copy() -> None:
            np.copyto(dst, src)

        copy()
        self.copy_seconds = statistics.median(_seconds(copy) for _ in range(5 * repeats))

    def floor(self, kind: str) -> float:
        return PASSES[kind] / 2 * self.copy_seconds

    def ratio(self, seconds: float, kind: str) -> float:
        return seconds / self.floor(kind)
