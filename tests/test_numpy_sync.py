"""The synchronized batch-norm oracle: k shards of one batch (uneven, possibly empty) behave as
the full batch, the property every backend's synchronized batch norm must meet (DESIGN.md,
"Synchronized batch norm").

The full batch is drawn by the project's strategy (every convention, every dtype, offsets to
1e4, constant channels) and cut along its batch axis into 2 to 5 shards of random sizes,
empty ones included; one shard (world size 1) is checked bit for bit against batch_norm.
Example budgets follow the Hypothesis profile (``dev`` 25, ``ci`` 100 per property).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import bnref.numpy as bn
from bnref.conventions import CONVENTIONS
from bnref.numpy import functional
from bnref.testing.checks import MISTAKES, _forward_tolerances, base_call
from bnref.testing.strategies import BNCase, bn_cases, numpy_dtype, with_dy
from bnref.testing.tolerances import (
    SAFETY,
    TINY,
    UNIT_ROUNDOFF,
    Comparison,
    compare,
    compute_dtype_name,
    gradient_tolerances,
)

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")
ARRAY_NAMES = ("x", "gamma", "beta", "running_mean", "running_var")


def assert_all(results: list[Comparison], context: object = "") -> None:
    failures = [str(r) for r in results if not r.passed]
    if failures:
        raise AssertionError("\n".join([*failures, f"case: {context!r}"]))


def _batch_axis(case: BNCase) -> int:
    """Where the batch is split: axis 0, or axis 1 when the channels are on axis 0."""
    return 1 if case.channel_axis == 0 else 0


@st.composite
def _cuts(draw, size: int) -> list[int]:
    """Where to cut ``size`` rows into 2 to 5 shards: sorted, repeats (empty shards) allowed.
    (One shard is test_world_size_one_is_batch_norm_exactly's.)"""
    shards = draw(st.integers(2, 5), label="shards")
    cuts = sorted(draw(st.lists(st.integers(0, size), min_size=shards - 1,
                                max_size=shards - 1), label="cuts"))
    sizes = np.diff([0, *cuts, size])
    event(f"{shards} shards")
    if (sizes == 0).any():
        event("an empty shard")
    if (sizes == 1).any():
        event("a shard of one row")
    return cuts


@st.composite
def sharded(draw, cases):
    """(case, cuts): a full batch and where its batch axis is cut into shards."""
    case = draw(cases, label="case")
    return case, draw(_cuts(case.x.shape[_batch_axis(case)]))


@st.composite
def sharded_with_dy(draw, cases):
    case, dy = draw(with_dy(cases), label="case and dy")
    return case, dy, draw(_cuts(case.x.shape[_batch_axis(case)]))


def _split(array: np.ndarray, case: BNCase, cuts: list[int]) -> list[np.ndarray]:
    """Each worker's own (contiguous) copy of its rows."""
    return [np.ascontiguousarray(part)
            for part in np.split(array, cuts, axis=_batch_axis(case))]


def _param_dtype(case: BNCase) -> str:
    return case.gamma.dtype.name if case.gamma is not None else compute_dtype_name(case.dtype)


# -- the property: k shards are the full batch ------------------------------------------------


@given(sharded(bn_cases(dtypes=ALL_DTYPES, training=True)))
def test_synchronized_shards_give_the_full_batch(split):
    """Each shard's y is its rows of batch_norm of the full batch, and the new running
    statistics are the full batch's (the unbiased variance with the global count): against
    batch_norm of the concatenation (both within the forward bound of the exact result: twice
    it) and against the float64 oracle (the bound itself). Inputs are not modified."""
    case, cuts = split
    shards = _split(case.x, case, cuts)
    before = [shard.copy() for shard in shards]
    params = case.gamma, case.beta, case.running_mean, case.running_var
    params_before = [None if p is None else p.copy() for p in params]
    ys, new_mean, new_var = bn.sync_batch_norm(shards, *params, **case.kwargs())

    full_y, full_mean, full_var = bn.batch_norm(*case.arrays, **case.kwargs())
    wide = case.as_float64()
    exact_y, exact_mean, exact_var = bn.batch_norm(*wide.arrays, **wide.kwargs())
    results = []
    for reference, (y_tol, mean_tol, var_tol), against in (
            ((full_y, full_mean, full_var), _forward_tolerances(case, 2.0),
             "batch_norm of the full batch"),
            ((exact_y, exact_mean, exact_var), _forward_tolerances(case, 1.0),
             "the float64 oracle")):
        rows = _split(reference[0], case, cuts)
        results += [compare(y, row, y_tol, f"shards[{k}] y vs {against}")
                    for k, (y, row) in enumerate(zip(ys, rows, strict=True))]
        results += [compare(new_mean, reference[1], mean_tol, f"running_mean vs {against}"),
                    compare(new_var, reference[2], var_tol, f"running_var vs {against}")]
    assert_all(results, case)
    assert [(y.shape, y.dtype) for y in ys] == [(s.shape, s.dtype) for s in shards]
    if case.running_mean is not None:
        assert new_mean.dtype == case.running_mean.dtype
        assert new_var.dtype == case.running_var.dtype
    for shard, original in zip(shards, before, strict=True):
        np.testing.assert_array_equal(shard, original)
    for param, original in zip(params, params_before, strict=True):
        if param is not None:
            np.testing.assert_array_equal(param, original)


@given(sharded_with_dy(bn_cases(dtypes=ALL_DTYPES, training=True)))
def test_synchronized_backward_gives_the_full_batch(split):
    """Each shard's dx is its rows of the full batch's dx; dgamma and dbeta are the full
    batch's, and with ``per_shard=True`` each shard's parts sum to them."""
    case, dy, cuts = split
    shards, dys = _split(case.x, case, cuts), _split(dy, case, cuts)
    kwargs = {"eps": case.eps, "axis": case.axis, "convention": case.convention,
              "beta": case.beta}
    dxs, dgamma, dbeta = bn.sync_batch_norm_backward(dys, shards, case.gamma, **kwargs)
    dxs_again, dgammas, dbetas = bn.sync_batch_norm_backward(dys, shards, case.gamma,
                                                             per_shard=True, **kwargs)
    full_dx, full_dgamma, full_dbeta = bn.batch_norm_backward(dy, case.x, case.gamma, **kwargs)
    tol_dx, tol_dgamma, tol_dbeta = gradient_tolerances(
        case.x, dy, case.channel_axis, gamma=case.gamma, eps=case.resolved_eps,
        param_dtype=_param_dtype(case), factor=2.0)
    rows = _split(full_dx, case, cuts)
    results = [compare(dx, row, tol_dx, f"shards[{k}] dx vs the full batch's rows")
               for k, (dx, row) in enumerate(zip(dxs, rows, strict=True))]
    results += [compare(dgamma, full_dgamma, tol_dgamma, "dgamma vs the full batch's"),
                compare(dbeta, full_dbeta, tol_dbeta, "dbeta vs the full batch's")]
    assert (dgammas is None) == (case.gamma is None)
    assert (dbetas is None) == (case.beta is None)
    if dgammas is not None:
        assert len(dgammas) == len(shards)
        total = np.sum([part.astype(np.float64) for part in dgammas], axis=0)
        results.append(compare(total, full_dgamma, tol_dgamma, "sum of per-shard dgamma"))
    if dbetas is not None:
        total = np.sum([part.astype(np.float64) for part in dbetas], axis=0)
        results.append(compare(total, full_dbeta, tol_dbeta, "sum of per-shard dbeta"))
    assert_all(results, case)
    assert [(dx.shape, dx.dtype) for dx in dxs] == [(s.shape, s.dtype) for s in shards]
    for dx, again in zip(dxs, dxs_again, strict=True):
        np.testing.assert_array_equal(dx, again)


@st.composite
def uneven_shapes(draw):
    """(case, shards): a rank-2 full batch (rows, C) whose rows are dealt into rank-3 shards
    (a, C, b) with different b: no concatenation, only the union of the values."""
    case = draw(bn_cases(dtypes=ALL_DTYPES, training=True, ranks=(2, 2), channel_axis=1),
                label="case")
    rows, channels = case.x.shape
    cuts = draw(_cuts(rows))
    shards = []
    for part in np.split(case.x, cuts, axis=0):
        count = len(part)
        divisors = [b for b in range(1, count + 1) if count % b == 0] or [1, 2, 3]
        inner = draw(st.sampled_from(divisors), label="inner size")
        # (a * b, C) -> (a, C, b): the values of each channel stay together.
        shards.append(np.ascontiguousarray(
            part.reshape(count // inner, inner, channels).transpose(0, 2, 1)))
    return case, shards


def _rows(x: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


@given(uneven_shapes())
def test_shards_may_differ_beyond_the_batch_axis(split):
    """Shards of different spatial sizes: the statistics are those of the union of their
    values (here, a rank-2 batch whose rows were dealt out into shards)."""
    case, shards = split
    kwargs = {**case.kwargs(), "axis": 1}
    params = case.gamma, case.beta, case.running_mean, case.running_var
    ys, new_mean, new_var = bn.sync_batch_norm(shards, *params, **kwargs)
    full_y, full_mean, full_var = bn.batch_norm(*case.arrays, **case.kwargs())
    y_tol, mean_tol, var_tol = _forward_tolerances(case, 2.0)
    got = np.concatenate([_rows(y, 1) for y in ys])
    assert_all([compare(got, full_y, y_tol, "y of the union"),
                compare(new_mean, full_mean, mean_tol, "running_mean"),
                compare(new_var, full_var, var_tol, "running_var")], case)


@given(sharded(bn_cases(dtypes=ALL_DTYPES, training=False)))
def test_inference_is_batch_norm_of_each_shard(split):
    """Inference is not synchronized: each shard is exactly batch_norm of that shard (the
    running statistics; its own batch statistics without them, as torch.nn.SyncBatchNorm in
    eval()), refusals included (torch: a shard of one value per channel)."""
    case, cuts = split
    shards = _split(case.x, case, cuts)
    params = case.gamma, case.beta, case.running_mean, case.running_var
    expected = []
    refusal = None
    for shard in shards:
        try:
            expected.append(bn.batch_norm(shard, *params, **case.kwargs()))
        except ValueError as error:
            refusal = error
            break
    if refusal is not None:
        event("a shard refused")
        with pytest.raises(ValueError) as raised:
            bn.sync_batch_norm(shards, *params, **case.kwargs())
        assert str(raised.value) == str(refusal)
        return
    ys, new_mean, new_var = bn.sync_batch_norm(shards, *params, **case.kwargs())
    for y, (y_alone, mean_alone, var_alone) in zip(ys, expected, strict=True):
        assert y.dtype == y_alone.dtype
        np.testing.assert_array_equal(y, y_alone)
        if case.running_mean is None:
            assert new_mean is None and new_var is None
        else:
            np.testing.assert_array_equal(new_mean, mean_alone)
            np.testing.assert_array_equal(new_var, var_alone)
    if case.running_mean is not None:  # copies, not the inputs
        assert new_mean is not case.running_mean and new_var is not case.running_var


@given(with_dy(bn_cases(dtypes=ALL_DTYPES)), st.integers(0, 3), st.integers(0, 3))
def test_world_size_one_is_batch_norm_exactly(case_and_dy, empty_before, empty_after):
    """One shard, or one shard among empty ones: bit for bit batch_norm and
    batch_norm_backward (forward in training and inference; backward with per-shard parts)."""
    case, dy = case_and_dy
    axis = _batch_axis(case)
    empty, empty_dy = np.take(case.x, [], axis=axis), np.take(dy, [], axis=axis)
    shards = [empty] * empty_before + [case.x] + [empty] * empty_after
    dys = [empty_dy] * empty_before + [dy] + [empty_dy] * empty_after
    params = case.gamma, case.beta, case.running_mean, case.running_var
    ys, new_mean, new_var = bn.sync_batch_norm(shards, *params, **case.kwargs())
    y, mean, var = bn.batch_norm(*case.arrays, **case.kwargs())
    assert ys[empty_before].dtype == y.dtype
    np.testing.assert_array_equal(ys[empty_before], y)
    for got, expected in ((new_mean, mean), (new_var, var)):
        assert (got is None) == (expected is None)
        if got is not None:
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
    kwargs = {"eps": case.eps, "axis": case.axis, "convention": case.convention,
              "beta": case.beta}
    expected_grads = bn.batch_norm_backward(dy, case.x, case.gamma, **kwargs)
    dxs, dgamma, dbeta = bn.sync_batch_norm_backward(dys, shards, case.gamma, **kwargs)
    _, dgammas, dbetas = bn.sync_batch_norm_backward(dys, shards, case.gamma, per_shard=True,
                                                     **kwargs)
    np.testing.assert_array_equal(dxs[empty_before], expected_grads[0])
    for got, parts, expected in ((dgamma, dgammas, expected_grads[1]),
                                 (dbeta, dbetas, expected_grads[2])):
        assert (got is None) == (expected is None) == (parts is None)
        if got is not None:
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
            np.testing.assert_array_equal(parts[empty_before], expected)


# -- merge_moments -----------------------------------------------------------------------------


def _union_moments(shards: list[np.ndarray], axis: int):
    """Count, mean and M2 of every shard's values per channel: exactly rounded float64 sums
    (math.fsum), two passes."""
    values = np.concatenate([_rows(shard.astype(np.float64), axis) for shard in shards])
    count = len(values)
    mean = np.array([math.fsum(column) for column in values.T]) / count
    m2 = np.array([math.fsum(column) for column in ((values - mean) ** 2).T])
    spread = np.abs(values - mean).max(axis=0)
    return count, mean, m2, spread


def _moment_bounds(count: int, mean: np.ndarray, spread: np.ndarray, dtype: str):
    """Two-pass accuracy: the mean within a few roundings of the spread (plus the float64
    rounding of the mean itself), M2 within count times a few roundings of spread², plus the
    float64 means' rounding carried through the merge's delta (2 ulp(mean) * spread each);
    and, as every bound in tolerances.py, the smallest normal number of the compute dtype per
    value (a square below it underflows)."""
    compute = compute_dtype_name(dtype)
    u, tiny = UNIT_ROUNDOFF[compute], TINY[compute]
    wide = UNIT_ROUNDOFF["float64"]
    growth = math.sqrt(count)
    mean_tol = SAFETY * (u * growth * spread + wide * np.abs(mean) + tiny)
    m2_tol = SAFETY * count * (u * growth * spread**2 + 4 * wide * np.abs(mean) * spread + tiny)
    return mean_tol, m2_tol


@given(sharded(bn_cases(dtypes=ALL_DTYPES)))
def test_merge_moments_is_the_two_pass_moments_of_the_union(split):
    """merge_moments of every shard's shard_moments: the union's count, and its mean and M2
    as accurate as a two-pass computation (errors scale with the spread, not the offset)."""
    case, cuts = split
    shards = _split(case.x, case, cuts)
    count, mean, m2 = bn.merge_moments(
        [bn.shard_moments(shard, axis=case.axis, convention=case.convention)
         for shard in shards])
    true_count, true_mean, true_m2, spread = _union_moments(shards, case.channel_axis)
    mean_tol, m2_tol = _moment_bounds(true_count, true_mean, spread, case.dtype)
    assert count.dtype == np.int64 and (count == true_count).all()
    assert_all([compare(mean, true_mean, mean_tol, "merged mean"),
                compare(m2, true_m2, m2_tol, "merged M2")], case)


def test_merge_moments_is_stable_where_the_one_pass_formula_fails():
    """float32 data at offset 1e4, four uneven shards (one empty): the merged moments meet
    the two-pass bound, while the one-pass E[x²]−E[x]² over all-reduced float32 sums (what a
    naive synchronized BN, or Keras's synchronized=True, computes) is far outside it."""
    rng = np.random.default_rng(11)
    x = (1e4 + 1e-2 * rng.standard_normal((600, 4))).astype(np.float32)
    shards = np.split(x, [100, 100, 350])
    _, mean, m2 = bn.merge_moments([bn.shard_moments(s, axis=1) for s in shards])
    true_count, true_mean, true_m2, spread = _union_moments(shards, 1)
    mean_tol, m2_tol = _moment_bounds(true_count, true_mean, spread, "float32")
    assert_all([compare(mean, true_mean, mean_tol, "merged mean"),
                compare(m2, true_m2, m2_tol, "merged M2")])
    # One pass: sum(x) and sum(x²) per shard, all-reduced, then E[x²] - E[x]², in float32.
    sums = np.sum([s.sum(axis=0, dtype=np.float32) for s in shards], axis=0, dtype=np.float32)
    squares = np.sum([(s * s).sum(axis=0, dtype=np.float32) for s in shards], axis=0,
                     dtype=np.float32)
    n = np.float32(len(x))
    one_pass_m2 = (squares / n - (sums / n) ** 2) * n
    one_pass = compare(one_pass_m2, true_m2, m2_tol, "one-pass M2")
    assert not one_pass.passed and one_pass.ratio > 1e3, one_pass
    assert (one_pass_m2 < 0).any() or one_pass.max_error > 10 * np.abs(true_m2).max()


@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
@given(convention=st.sampled_from(sorted(CONVENTIONS)),
       sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).map(
           lambda sizes: sizes if sum(sizes) >= 2 else [*sizes, 2]),
       spatial=st.sampled_from([(), (3,), (2, 2)]))
def test_constant_channels_stay_exact_across_shards(dtype_name, convention, sizes, spatial):
    """Every shard holds the same value per channel: the merged mean is that value and M2 is
    0 exactly, y is beta exactly, and the running statistics become (value, 0) exactly when
    the batch gets weight 1 (the unbiased 0 * n / (n - 1) is 0 too)."""
    dtype, conv = numpy_dtype(dtype_name), CONVENTIONS[convention]
    values = np.array([0.1, -2.7, 1e4 + 0.3, 3e-3, -1234.567]).astype(dtype)
    channels = len(values)
    rank_axis = conv.default_axis % (2 + len(spatial))

    def shard(rows: int) -> np.ndarray:
        channels_last = np.broadcast_to(values, (rows, *spatial, channels)).astype(dtype)
        return np.ascontiguousarray(np.moveaxis(channels_last, -1, rank_axis))

    shards = [shard(rows) for rows in sizes]  # the channels are never on the batch axis 0
    _, mean, m2 = bn.merge_moments([bn.shard_moments(s, convention=convention)
                                        for s in shards])
    np.testing.assert_array_equal(mean, values.astype(np.float64))
    np.testing.assert_array_equal(m2, np.zeros(channels))
    gamma = np.linspace(-2.0, 3.0, channels).astype(np.float32 if dtype_name != "float64"
                                                    else np.float64)
    beta = np.linspace(4.0, -1.0, channels).astype(gamma.dtype)
    running = np.zeros(channels, gamma.dtype), np.ones(channels, gamma.dtype)
    momentum = conv.momentum_for_new_value_weight(1.0)
    ys, new_mean, new_var = bn.sync_batch_norm(shards, gamma, beta, *running, training=True,
                                               momentum=momentum, convention=convention)
    axis = conv.default_axis % shards[0].ndim
    for y in ys:
        expected = np.broadcast_to(np.expand_dims(beta, [i for i in range(y.ndim)
                                                         if i != axis]), y.shape)
        np.testing.assert_array_equal(y, expected.astype(dtype))
    np.testing.assert_array_equal(new_mean, values.astype(gamma.dtype))
    np.testing.assert_array_equal(new_var, np.zeros(channels))


def test_merge_moments_formula_and_empty_parts():
    """Chan's update on hand-checkable numbers; a part with count 0 is the identity whatever
    its mean and M2 say; all parts empty give (0, 0, 0)."""
    a = np.array([1.0, 2.0, 4.0])  # mean 7/3, M2 = 14/3
    b = np.array([10.0, 20.0])  # mean 15, M2 = 50
    union = np.concatenate([a, b])
    count, mean, m2 = bn.merge_moments([(3, a.mean(), ((a - a.mean()) ** 2).sum()),
                                        (0, 123.0, 456.0),
                                        (2, b.mean(), ((b - b.mean()) ** 2).sum())])
    assert count == 5
    np.testing.assert_allclose(mean, union.mean(), rtol=1e-15)
    np.testing.assert_allclose(m2, ((union - union.mean()) ** 2).sum(), rtol=1e-15)
    alone = bn.merge_moments([(0, 9.0, 9.0), (4, np.array([1e4 + 0.1]), np.array([0.3])),
                              (0, -1.0, 2.0)])
    assert alone[0] == 4 and alone[1][0] == 1e4 + 0.1 and alone[2][0] == 0.3  # bit for bit
    nothing = bn.merge_moments([(np.zeros(2), np.ones(2), np.ones(2))] * 3)
    for part in nothing:
        np.testing.assert_array_equal(part, np.zeros(2))
    assert nothing[0].dtype == np.int64


# -- empty shards ------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_all_shards_empty(convention):
    """No value anywhere (as batch_norm on an empty batch): empty y per shard, running
    statistics unchanged (copies), empty dx and zero dgamma/dbeta; no NaN warning."""
    conv = CONVENTIONS[convention]
    axis = conv.default_axis % 4
    shapes = [(0, 3, 4, 4), (2, 3, 0, 4), (0, 3, 1, 1)]
    shards = [np.empty(shape, np.float32) for shape in shapes]
    if axis == 3:
        shards = [np.ascontiguousarray(np.moveaxis(s, 1, 3)) for s in shards]
    gamma, beta = np.array([1.5, -0.5, 2.0], np.float32), np.zeros(3, np.float32)
    running_mean, running_var = np.array([1.5, -2.0, 0.25], np.float32), np.ones(3, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys, new_mean, new_var = bn.sync_batch_norm(shards, gamma, beta, running_mean,
                                                   running_var, training=True,
                                                   convention=convention)
        dxs, dgamma, dbeta = bn.sync_batch_norm_backward(
            [np.empty_like(s) for s in shards], shards, gamma, convention=convention)
    assert [y.shape for y in ys] == [s.shape for s in shards]
    np.testing.assert_array_equal(new_mean, running_mean)
    np.testing.assert_array_equal(new_var, running_var)
    assert new_mean is not running_mean and new_var is not running_var
    assert [dx.shape for dx in dxs] == [s.shape for s in shards]
    np.testing.assert_array_equal(dgamma, np.zeros(3, np.float32))
    np.testing.assert_array_equal(dbeta, np.zeros(3, np.float32))


def test_empty_shards_of_any_shape_change_nothing():
    """Empty shards whose empty axis is not the batch axis, or whose spatial sizes differ,
    next to one non-empty shard: bit for bit batch_norm of that shard."""
    rng = np.random.default_rng(4)
    x = (3 + rng.standard_normal((3, 3, 4, 4))).astype(np.float32)
    empties = [np.empty((0, 3, 4, 4), np.float32), np.empty((2, 3, 0, 4), np.float32),
               np.empty((0, 3, 1, 1), np.float32)]
    shards = [empties[0], x, *empties[1:]]
    params = (np.array([1.5, -0.5, 2.0], np.float32), np.array([0.1, 0.2, 0.3], np.float32),
              np.zeros(3, np.float32), np.ones(3, np.float32))
    ys, new_mean, new_var = bn.sync_batch_norm(shards, *params, training=True)
    y, mean, var = bn.batch_norm(x, *params, training=True)
    np.testing.assert_array_equal(ys[1], y)
    np.testing.assert_array_equal(new_mean, mean)
    np.testing.assert_array_equal(new_var, var)
    assert [ys[k].shape for k in (0, 2, 3)] == [e.shape for e in empties]


# -- bad input ---------------------------------------------------------------------------------


def _call_sync(call: dict, shards: list) -> None:
    bn.sync_batch_norm(shards, *(call[name] for name in ARRAY_NAMES[1:]),
                       **{k: v for k, v in call.items() if k not in ARRAY_NAMES})


def _arrays_of(call: dict) -> dict:
    return {name: call[name].copy() for name in ARRAY_NAMES if isinstance(call[name],
                                                                           np.ndarray)}


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: m.id)
def test_world_size_one_refuses_as_batch_norm(mistake):
    """One shard: every mistake of the shared catalogue gives batch_norm's exact error."""
    call = mistake.change(base_call())
    before = _arrays_of(call)
    with pytest.raises(mistake.error) as raised:
        _call_sync(call, [call["x"]])
    assert str(raised.value) == mistake.message.format(array_type="numpy.ndarray")
    for name, value in before.items():
        np.testing.assert_array_equal(call[name], value)


@pytest.mark.parametrize("mistake", [m for m in MISTAKES if m.id != "one-value-per-channel"],
                         ids=lambda m: m.id)
def test_shards_refuse_as_batch_norm(mistake):
    """Three shards (one empty): a wrong argument gives batch_norm's exact error; a wrong
    shard (placed second, among good ones) gives batch_norm's error for that shard, with a
    note naming it."""
    good = base_call()
    call = mistake.change(good)
    x_changed = call["x"] is not good["x"]
    x = good["x"]
    shards = ([x[:1], call["x"], x[1:]] if x_changed else [x[:1], x[1:1], x[1:]])
    with pytest.raises(mistake.error) as raised:
        _call_sync(call, shards)
    assert str(raised.value) == mistake.message.format(array_type="numpy.ndarray")
    if x_changed:
        assert getattr(raised.value, "__notes__", ["in shards[1] of 3"]) == ["in shards[1] of 3"]


def test_single_value_refusal_counts_the_union():
    """Under the torch convention the union must hold more than one value per channel:
    shards of one value each are fine together (= batch_norm of their concatenation), one
    value in all is refused with batch_norm's wording; other conventions accept it."""
    ones = [np.array([[1.0, 2.0, 3.0]], np.float32), np.array([[3.0, 1.0, 2.0]], np.float32)]
    ys, _, _ = bn.sync_batch_norm(ones, None, None, None, None, training=True)
    y, _, _ = bn.batch_norm(np.concatenate(ones), None, None, None, None, training=True)
    np.testing.assert_array_equal(np.concatenate(ys), y)
    lonely = [ones[0], np.empty((0, 3), np.float32), np.empty((0, 3), np.float32)]
    message = ("Expected more than 1 value per channel when training, got 1 value per channel "
               "in the union of 3 shards of shapes [(1, 3), (0, 3), (0, 3)] (channel axis 1)")
    with pytest.raises(ValueError) as raised:
        bn.sync_batch_norm(lonely, None, None, np.zeros(3, np.float32), np.ones(3, np.float32),
                           training=True)
    assert str(raised.value) == message
    with pytest.raises(ValueError) as raised:
        bn.sync_batch_norm_backward([np.ones_like(s) for s in lonely], lonely, None)
    assert str(raised.value) == message
    ys, _, _ = bn.sync_batch_norm(lonely, None, np.full(3, 0.5, np.float32), None, None,
                                  training=True, axis=1, convention="keras")
    np.testing.assert_array_equal(ys[0], np.full((1, 3), 0.5, np.float32))
    # In inference with running statistics nothing is refused (batch_norm per shard).
    bn.sync_batch_norm(lonely, None, None, np.zeros(3, np.float32), np.ones(3, np.float32),
                       training=False)


X = np.ones((4, 3, 2), np.float32)


@pytest.mark.parametrize(("shards", "error", "message"), [
    ([], ValueError, "shards must hold one numpy.ndarray per worker, got an empty list"),
    (X, TypeError, "shards must be a list of numpy.ndarray, one per worker, got numpy.ndarray"),
    ([X, np.ones((4, 3), np.float32)], ValueError,
     "every shard must have the rank of shards[0], 3, got rank 2 with shape (4, 3) for "
     "shards[1]"),
    ([X, X.astype(np.float64)], TypeError,
     "every shard must have the dtype of shards[0], float32, got float64 for shards[1]"),
    ([X, X[:0], np.ones((4, 2, 2), np.float32)], ValueError,
     "every shard must have the 3 channels of shards[0] on axis 1, got shape (4, 2, 2) for "
     "shards[2]"),
], ids=["empty-list", "an-array", "ranks", "dtypes", "channels"])
def test_shards_that_do_not_belong_together_are_refused(shards, error, message):
    """What only a list of shards can get wrong, checked before the parameters (so a shard
    with other channels is named, not gamma)."""
    gamma = np.ones(3, np.float32)
    with pytest.raises(error) as raised:
        bn.sync_batch_norm(shards, gamma, None, None, None, training=True)
    assert str(raised.value) == message
    with pytest.raises(error) as raised:
        bn.sync_batch_norm_backward(shards, shards, gamma)
    assert str(raised.value) == message


def test_backward_refuses_mismatched_gradients():
    shards = [X, X[:1]]
    with pytest.raises(ValueError) as raised:
        bn.sync_batch_norm_backward([X], shards, None)
    assert str(raised.value) == "dys must hold one array per shard, 2, got 1"
    with pytest.raises(TypeError) as raised:
        bn.sync_batch_norm_backward(X, shards, None)
    assert str(raised.value) == ("dys must be a list of numpy.ndarray, one per shard, got "
                                 "numpy.ndarray")
    with pytest.raises(ValueError) as raised:
        bn.sync_batch_norm_backward([X, X], shards, None)
    # batch_norm_backward's message for that shard.
    with pytest.raises(ValueError) as alone:
        bn.batch_norm_backward(X, X[:1], None)
    assert str(raised.value) == str(alone.value)
    assert raised.value.__notes__ == ["in dys[1] of 2"]


@pytest.mark.parametrize(("moments", "error", "message"), [
    ([], ValueError, "moments must hold one (count, mean, M2) per shard, got an empty list"),
    (np.ones(3), TypeError,
     "moments must be a list of (count, mean, M2), one per shard, got numpy.ndarray"),
    ([(1, 0.0)], ValueError, "moments[0] must be a (count, mean, M2) triple, got (1, 0.0)"),
    ([(2, 0.0, 1.0), (-1, 0.0, 0.0)], ValueError,
     "moments[1] count must be whole numbers >= 0, got -1.0"),
    ([(1.5, 0.0, 0.0)], ValueError, "moments[0] count must be whole numbers >= 0, got 1.5"),
    ([(2, 0.0, -1e-3)], ValueError, "moments[0] M2 must be >= 0, got -0.001"),
    ([(np.ones(2), np.zeros(2), np.zeros(2)), (np.ones(3), np.zeros(3), np.zeros(3))],
     ValueError, "moments must share one per-channel shape, got shapes "
     "[((2,), (2,), (2,)), ((3,), (3,), (3,))]"),
], ids=["empty", "an-array", "pair", "negative-count", "fractional-count", "negative-m2",
        "shapes"])
def test_merge_moments_refuses_bad_moments(moments, error, message):
    with pytest.raises(error) as raised:
        bn.merge_moments(moments)
    assert str(raised.value) == message


def test_the_oracle_reuses_the_blockwise_moments(monkeypatch):
    """Per-shard moments are functional.channel_moments' (blockwise, shifted): with tiny
    blocks many merges happen inside each shard too, and the result is still two-pass
    accurate at offset 1e4."""
    monkeypatch.setattr(functional, "_BLOCK_BYTES", 1 << 10)
    monkeypatch.setattr(functional, "_MAX_RUN", 1 << 4)
    rng = np.random.default_rng(9)
    x = np.sort(1e4 + 1e-2 * rng.standard_normal((900, 3)), axis=0).astype(np.float32)
    shards = np.split(x, [0, 250, 251, 700])
    _, mean, m2 = bn.merge_moments([bn.shard_moments(s, axis=1) for s in shards])
    true_count, true_mean, true_m2, spread = _union_moments(shards, 1)
    mean_tol, m2_tol = _moment_bounds(true_count, true_mean, spread, "float32")
    assert_all([compare(mean, true_mean, mean_tol, "merged mean"),
                compare(m2, true_m2, m2_tol, "merged M2")])
