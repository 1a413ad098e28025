"""The synchronized-BN property, shared by every backend's multi-worker tests and ``bnref check``.

A :class:`SyncCase` is one full batch (a training :class:`~bnref.testing.strategies.BNCase`)
split into ``k`` shards along its batch axis (axis 0, or axis 1 when the channels are on axis
0), of the given sizes: uneven, and possibly empty. Each worker runs synchronized batch norm
on its shard, and returns a :class:`Synced` (one entry per worker). The property
(DESIGN.md, "Synchronized batch norm"):

- each worker's ``y`` is its rows of the full batch's ``y``;
- the running statistics are bit for bit the same on every worker, and the full batch's;
- each worker's ``dx`` is its rows of the full batch's ``dx``;
- each worker's ``dgamma``/``dbeta`` is its own part, ``sum(dy_k * xhat_k)`` and
  ``sum(dy_k)``, and the parts sum to the full batch's gradients.

Two references, with :mod:`bnref.testing.tolerances`' bounds: the float64 oracle
:func:`bnref.numpy.sync_batch_norm` / :func:`~bnref.numpy.sync_batch_norm_backward` on the
widened shards (one bound), and :func:`bnref.numpy.batch_norm` of the full batch in the case's
own dtype (twice the bound: each side is within one bound of the exact value).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
from hypothesis import strategies as st

import bnref.numpy as bn
from bnref.testing.strategies import BNCase, bn_cases, with_dy
from bnref.testing.tolerances import Comparison, compare, compute_dtype_name, gradient_tolerances

__all__ = ["SyncCase", "Synced", "backward_comparisons", "forward_comparisons", "sync_cases"]


@dataclasses.dataclass(frozen=True)
class SyncCase:
    """A full training batch, its upstream gradient (or None) and each worker's shard size
    along :attr:`split_axis`."""

    case: BNCase
    sizes: tuple[int, ...]
    dy: np.ndarray | None = None

    @property
    def k(self) -> int:
        return len(self.sizes)

    @property
    def split_axis(self) -> int:
        """Where the batch is split: axis 0, or axis 1 when the channels are on axis 0."""
        return 1 if self.case.channel_axis == 0 else 0

    def split(self, array: np.ndarray) -> list[np.ndarray]:
        """``array`` (the full batch's shape) cut into the workers' shards, contiguous."""
        cuts = np.cumsum(self.sizes)[:-1]
        return [np.ascontiguousarray(part)
                for part in np.split(array, cuts, axis=self.split_axis)]

    @property
    def shards(self) -> list[np.ndarray]:
        return self.split(self.case.x)

    @property
    def dys(self) -> list[np.ndarray] | None:
        return None if self.dy is None else self.split(self.dy)

    def options(self) -> dict[str, Any]:
        """``batch_norm``'s keyword arguments but ``training`` (a synchronized call trains)."""
        return {name: value for name, value in self.case.kwargs().items()
                if name != "training"}

    def __repr__(self) -> str:
        c = self.case
        return (f"SyncCase(k={self.k}, sizes={self.sizes}, x={c.x.shape} {c.x.dtype}, "
                f"axis={c.axis}, convention={c.convention!r}, momentum={c.momentum!r}, "
                f"eps={c.eps!r}, gamma={c.gamma is not None}, beta={c.beta is not None}, "
                f"running={c.running_mean is not None}, dy={self.dy is not None})")


@dataclasses.dataclass
class Synced:
    """What each worker returned, one entry per worker (a list, or an array with a leading
    worker axis); ``None`` where nothing was asked or given."""

    y: Any
    mean: Any = None
    var: Any = None
    dx: Any = None
    dgamma: Any = None
    dbeta: Any = None


# -- drawing cases ----------------------------------------------------------------------------


@st.composite
def _sizes(draw, length: int, k: int, empty: bool) -> tuple[int, ...]:
    """k sizes summing to ``length``: uneven, zeros allowed only with ``empty``."""
    if k == 1:
        return (length,)
    if not empty:
        cuts = sorted(draw(st.lists(st.integers(1, length - 1), min_size=k - 1,
                                    max_size=k - 1, unique=True), label="cuts"))
    else:
        cuts = sorted(draw(st.lists(st.integers(0, length), min_size=k - 1, max_size=k - 1),
                           label="cuts"))
    bounds = [0, *cuts, length]
    return tuple(int(b - a) for a, b in itertools.pairwise(bounds))


@st.composite
def sync_cases(draw, *, ks: tuple[int, ...] = (1, 2, 3, 4), dtypes: tuple[str, ...] = (
        "float16", "bfloat16", "float32", "float64"), empty: bool = True, even: bool = False,
        gradients: bool = True, **restrictions: Any) -> SyncCase:
    """A :class:`SyncCase`: a training case of ``bn_cases(**restrictions)`` whose batch axis
    is cut into ``k`` uneven shards (empty ones too with ``empty``), with a ``dy`` when
    ``gradients``. ``even=True`` cuts equal shards (what JAX's collectives need): the batch
    axis is cut down to a multiple of ``k`` (and ``k`` to the batch axis' length)."""
    k = draw(st.sampled_from(ks), label="k")
    cases = bn_cases(dtypes=dtypes, training=True, **restrictions)
    if gradients:
        case, dy = draw(with_dy(cases), label="case and dy")
    else:
        case, dy = draw(cases, label="case"), None
    split = 1 if case.channel_axis == 0 else 0
    length = case.x.shape[split]
    if even:
        k = min(k, length)
        keep = np.arange(length // k * k)
        x = np.take(case.x, keep, axis=split)
        if np.prod(x.shape) // x.shape[case.channel_axis] < 2:  # the full batch: 2 values
            x, k = case.x, 1
        case = case.with_(x=x)
        dy = None if dy is None else np.take(dy, np.arange(x.shape[split]), axis=split)
        return SyncCase(case, (x.shape[split] // k,) * k, dy)
    if not empty and length < k:  # not enough rows for k non-empty shards: fewer workers
        k = max(1, length)  # (the returned SyncCase's k says how many)
    sizes = draw(_sizes(length, k, empty), label="sizes")
    return SyncCase(case, sizes, dy)


# -- the property -----------------------------------------------------------------------------


def _same(name: str, got: np.ndarray, expected: np.ndarray) -> Comparison:
    """Bit for bit (tolerance 0)."""
    return compare(got, expected, 0.0, name)


def _dtype(name: str, got: Any, expected: Any) -> Comparison:
    got_dtype = np.asarray(got).dtype
    same = got_dtype == np.dtype(expected)
    return Comparison(f"{name} dtype", 0.0 if same else np.inf, 0.0, 0.0 if same else np.inf,
                      "" if same else f"got {got_dtype}, expected {np.dtype(expected)}")


def _shape(name: str, got: Any, expected: tuple[int, ...]) -> Comparison:
    shape = tuple(np.shape(got))
    same = shape == tuple(expected)
    return Comparison(f"{name} shape", 0.0 if same else np.inf, 0.0, 0.0 if same else np.inf,
                      "" if same else f"got {shape}, expected {tuple(expected)}")


def forward_comparisons(sc: SyncCase, out: Synced) -> list[Comparison]:
    """Each worker's ``y`` vs the oracle's shard and the full batch's rows; the running
    statistics the same on every worker, and the full batch's; dtypes and shapes kept."""
    from bnref.testing.checks import _forward_tolerances

    case, k = sc.case, sc.k
    wide = case.as_float64()
    oracle = bn.sync_batch_norm(sc.split(wide.x), *wide.arrays[1:], training=True,
                                **sc.options())
    full_y, full_mean, full_var = bn.batch_norm(*case.arrays, training=True, **sc.options())
    references = ((oracle, 1.0, "the float64 oracle"),
                  ((sc.split(full_y), full_mean, full_var), 2.0, "the full batch"))
    shards = sc.shards
    results = []
    for j in range(k):
        results += [_dtype(f"worker {j} y", out.y[j], case.x.dtype),
                    _shape(f"worker {j} y", out.y[j], shards[j].shape)]
    if not all(r.passed for r in results):
        return results
    for (ys, mean, var), factor, against in references:
        y_tol, mean_tol, var_tol = _forward_tolerances(case, factor)
        results += [compare(out.y[j], ys[j], y_tol, f"worker {j} y vs {against}")
                    for j in range(k) if shards[j].size]
        if case.running_mean is not None:
            results += [compare(out.mean[0], mean, mean_tol, f"running_mean vs {against}"),
                        compare(out.var[0], var, var_tol, f"running_var vs {against}")]
    if case.running_mean is None:
        if out.mean is not None and any(m is not None for m in out.mean):
            results.append(Comparison("running statistics", np.inf, 0.0, np.inf,
                                      "given none, the workers returned some"))
        return results
    for j in range(k):
        results += [_dtype(f"worker {j} running_mean", out.mean[j], case.running_mean.dtype),
                    _dtype(f"worker {j} running_var", out.var[j], case.running_var.dtype)]
    for j in range(1, k):
        results += [_same(f"worker {j} running_mean vs worker 0's", out.mean[j], out.mean[0]),
                    _same(f"worker {j} running_var vs worker 0's", out.var[j], out.var[0])]
    return results


def backward_comparisons(sc: SyncCase, out: Synced) -> list[Comparison]:
    """Each worker's ``dx`` vs the oracle's shard and the full batch's rows; each worker's
    ``dgamma``/``dbeta`` vs the oracle's per-shard part, and their sum vs the full batch's."""
    case, k, dy = sc.case, sc.k, sc.dy
    assert dy is not None, "a SyncCase without dy has no gradients to compare"
    wide = case.as_float64()
    options = {"eps": case.eps, "axis": case.axis, "convention": case.convention}
    dxs, dgammas, dbetas = bn.sync_batch_norm_backward(
        sc.split(dy.astype(np.float64)), sc.split(wide.x), wide.gamma, beta=wide.beta,
        per_shard=True, **options)
    full_dx, full_dgamma, full_dbeta = bn.batch_norm_backward(dy, case.x, case.gamma,
                                                              beta=case.beta, **options)
    pdtype = (case.gamma.dtype.name if case.gamma is not None
              else compute_dtype_name(case.dtype))
    (dx_tol, dgamma_tol, dbeta_tol), (dx_tol2, dgamma_tol2, dbeta_tol2) = [
        gradient_tolerances(case.x, dy, case.channel_axis, gamma=case.gamma,
                            eps=case.resolved_eps, param_dtype=pdtype, factor=factor)
        for factor in (1.0, 2.0)]
    rows, shards = sc.split(full_dx), sc.shards
    results = []
    for j in range(k):
        results += [_dtype(f"worker {j} dx", out.dx[j], case.x.dtype),
                    _shape(f"worker {j} dx", out.dx[j], shards[j].shape)]
        if shards[j].size and results[-1].passed:
            results += [
                compare(out.dx[j], dxs[j], dx_tol, f"worker {j} dx vs the float64 oracle"),
                compare(out.dx[j], rows[j], dx_tol2, f"worker {j} dx vs the full batch")]
    for name, got, parts, full, tol, tol2 in (
            ("dgamma", out.dgamma, dgammas, full_dgamma, dgamma_tol, dgamma_tol2),
            ("dbeta", out.dbeta, dbetas, full_dbeta, dbeta_tol, dbeta_tol2)):
        if got is not None and all(g is None for g in got):  # a list of per-worker Nones
            got = None
        if full is None or got is None:
            missing = (full is None) != (got is None)
            results.append(Comparison(name, np.inf if missing else 0.0, 0.0,
                                      np.inf if missing else 0.0,
                                      f"expected {'none' if full is None else 'one'}"
                                      if missing else ""))
            continue
        results += [_dtype(f"worker {j} {name}", got[j], pdtype) for j in range(k)]
        results += [compare(got[j], parts[j], tol, f"worker {j} {name} vs the oracle's part")
                    for j in range(k)]
        total = np.sum([np.asarray(g, np.float64) for g in got], axis=0)
        results.append(compare(total, full, tol2, f"sum of the workers' {name} vs the full "
                                                   "batch's"))
    return results


def failures(results: list[Comparison]) -> list[str]:
    return [str(r) for r in results if not r.passed]
