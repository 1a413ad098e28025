"""The shared property suite: every test here runs, unchanged, against any backend.

Use it from a test module of your own::

    from bnref.testing.suite import *  # noqa: F403  (the tests)

    @pytest.fixture(scope="session")
    def backend():
        return MyBackend()             # a bnref.testing.Backend subclass

bnref's own ``tests/test_suite.py`` does exactly that with a fixture parametrized over every
registered backend, and also imports :func:`test_matches_builtin`,
:func:`test_gradients_match_builtin` and :func:`test_layer_matches_builtin_layer` (not in
``*``: they need a ``builtin_name`` / ``gradient_builtin_name`` / ``layer_builtin_name``
fixture naming one of the backend's built-ins).

Expected values come from the float64 oracle (:mod:`bnref.numpy`) or, for the properties,
from the mathematics directly (e.g. the running-statistic recurrence is re-derived here from
the convention records, not taken from the code under test).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bnref.conventions import CONVENTIONS, get_convention
from bnref.testing.backends import Backend, LayerBuiltin, named_builtin
from bnref.testing.checks import (
    LAYER_MISTAKES,
    MISTAKES,
    LayerMistake,
    Mistake,
    check_builtin,
    check_builtin_gradients,
    check_finite_differences,
    check_forward,
    check_gradients,
    check_layer,
    check_layer_mistake,
    check_mistake,
    state_comparison,
)
from bnref.testing.profiles import suite_settings
from bnref.testing.report import diagnosis_text, snippet
from bnref.testing.strategies import (
    Unsupported,
    bn_cases,
    cases_for,
    layer_cases,
    layer_cases_for,
    with_directions,
    with_dy,
)
from bnref.testing.tolerances import (
    MAX_FINITE,
    UNIT_ROUNDOFF,
    ChannelStats,
    Comparison,
    compare,
    forward_tolerance,
    running_stat_tolerances,
)

__all__ = [
    "test_agrees_with_named_builtins",
    "test_bad_input_raises_and_modifies_nothing",
    "test_bad_layer_arguments_raise",
    "test_batch_permutation_equivariance",
    "test_cumulative_average_layer",
    "test_forward_matches_oracle",
    "test_gradients_match_finite_differences",
    "test_gradients_match_oracle",
    "test_inference_is_a_per_channel_affine_map",
    "test_invariance_under_positive_affine_input_maps",
    "test_layer_trajectory_matches_oracle",
    "test_running_stat_recurrence",
    "test_single_value_per_channel_outside_torch",
    "test_training_output_has_mean_beta_and_std_gamma",
]

_NON_TORCH = tuple(name for name in CONVENTIONS if not CONVENTIONS[name].single_value_error)


def property_test(test):
    """``@given(data=st.data())`` under bnref's profile (:mod:`bnref.testing.profiles`:
    ``--bnref-profile``, ``BNREF_PROFILE``, else ``ci``), its example budget scaled by the
    backend's ``example_scale`` (frameworks that compile per shape run fewer examples); for a
    pair of backends (the pairwise tests), by the smaller of the two.

    The Hypothesis test is built per call, so the budget can depend on the backend fixture.
    """
    signature = inspect.signature(test)
    first = next(iter(signature.parameters))  # "backend", or "pair"

    @functools.wraps(test)
    def run(*args, **kwargs) -> None:
        subject = kwargs[first] if first in kwargs else args[0]
        backends = subject if isinstance(subject, tuple) else (subject,)
        scale = min(b.example_scale for b in backends)
        base = suite_settings()
        budget = max(10, round(base.max_examples * scale))

        @settings(base, max_examples=budget)
        @given(data=st.data())
        def examples(data) -> None:
            test(*args, data=data, **kwargs)

        examples.__qualname__ = test.__qualname__  # a stable name: derandomized seeds
        examples()

    run.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "data"])
    return run


def _needs(backend: Backend, capability: str) -> None:
    """Skip, saying why, when a (third-party) backend does not implement ``capability``."""
    if capability not in backend.capabilities:
        pytest.skip(f"backend {backend.name!r} does not implement {capability}")


def _cases(backend: Backend, **restrictions):
    """Cases within what the backend declares; a property it cannot serve skips, saying why."""
    try:
        return cases_for(backend, **restrictions)
    except Unsupported as reason:
        pytest.skip(str(reason))


def _layer_cases(backend: Backend, **restrictions):
    try:
        return layer_cases_for(backend, **restrictions)
    except Unsupported as reason:
        pytest.skip(str(reason))


def assert_all(results: list[Comparison], context: object = "",
               backend: Backend | None = None) -> None:
    """Raise ``AssertionError`` listing the failed comparisons and the case; given the
    ``backend``, also a snippet reproducing the case with it and the diagnosis of what its
    implementation does differently (:mod:`bnref.testing.diagnose`)."""
    failures = [str(r) for r in results if not r.passed]
    if not failures:
        return
    lines = [*failures, f"case: {context!r}"]
    if backend is not None:
        lines.append(f"diagnosis: {diagnosis_text(backend)}")
        code = snippet(backend, context)
        if code is not None:
            lines += ["reproduce with:", *("    " + line for line in code.splitlines())]
    raise AssertionError("\n".join(lines))


def _per_channel(values, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(values, np.float64).reshape(shape)


@property_test
def test_forward_matches_oracle(backend: Backend, data) -> None:
    """Output and running statistics agree with the float64 oracle, for every convention."""
    case = data.draw(_cases(backend), label="case")
    assert_all(check_forward(backend, case), case, backend)


@property_test
def test_gradients_match_oracle(backend: Backend, data) -> None:
    """dx, dgamma and dbeta of training-mode batch_norm agree with the analytic backward."""
    _needs(backend, "gradients")
    case, dy = data.draw(with_dy(_cases(backend, training=True)), label="case and dy")
    assert_all(check_gradients(backend, case, dy), case, backend)


@property_test
def test_gradients_match_finite_differences(backend: Backend, data) -> None:
    """In float64 the gradients are the derivative of the backend's own forward: a central
    difference along a random direction matches <gradient, direction>."""
    _needs(backend, "gradients")
    if "float64" not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} has no float64")
    cases = _cases(backend, dtypes=("float64",), training=True)
    case, dy, direction = data.draw(with_directions(cases), label="case, dy, direction")
    assert_all(check_finite_differences(backend, case, dy, direction), case, backend)


@property_test
def test_layer_trajectory_matches_oracle(backend: Backend, data) -> None:
    """The native layer over several training steps, then inference, follows the oracle layer
    (outputs, running statistics, batch counter), with and without loaded state."""
    _needs(backend, "make_layer")
    case = data.draw(_layer_cases(backend), label="layer case")
    assert_all(check_layer(backend, case), case, backend)


@property_test
def test_training_output_has_mean_beta_and_std_gamma(backend: Backend, data) -> None:
    """In training each channel of y has mean beta and std |gamma| * sqrt(var / (var + eps))
    (that is |gamma| when var >> eps)."""
    case = data.draw(_cases(backend, training=True, affine=True), label="case")
    y = backend.run_batch_norm(*case.arrays, **case.kwargs())[0].astype(np.float64)
    axis, eps = case.channel_axis, case.resolved_eps
    stats = ChannelStats.of(case.x, axis)
    gamma = np.ones(stats.mean.shape) if case.gamma is None else case.gamma.astype(np.float64)
    beta = np.zeros(stats.mean.shape) if case.beta is None else case.beta.astype(np.float64)
    tol = forward_tolerance(case.x, axis, gamma=case.gamma, beta=case.beta, eps=eps,
                            mean=stats.mean, var=stats.var, batch_stats=True)
    # The mean and the std of y each move by at most the largest element error.
    channel_tol = np.moveaxis(np.broadcast_to(tol, y.shape), axis, -1).reshape(-1, y.shape[axis])
    channel_tol = channel_tol.max(axis=0)
    # Measure y's spread relative to its own size: squaring values near 1e-300 underflows.
    y_channels = np.moveaxis(y, axis, -1).reshape(-1, y.shape[axis])
    size = np.abs(y_channels).max(axis=0)
    size = np.where(size > 0, size, 1.0)
    y_mean = y_channels.mean(axis=0)
    y_std = size * (y_channels / size).std(axis=0)
    # ... and allow for this float64 measurement's own rounding.
    channel_tol = channel_tol + 4 * UNIT_ROUNDOFF["float64"] * np.sqrt(len(y_channels)) * size
    expected_std = np.abs(gamma) * np.sqrt(stats.var / (stats.var + eps))
    assert_all([compare(y_mean, beta, channel_tol, "channel mean of y"),
                compare(y_std, expected_std, channel_tol, "channel std of y")],
               case, backend)


@property_test
def test_invariance_under_positive_affine_input_maps(backend: Backend, data) -> None:
    """batch_norm(a * x + b) == batch_norm(x) for a > 0 once eps scales with a² (the only
    place the scale of x survives); a is a power of two so a * x is exact."""
    if backend.fixed_eps is not None:
        pytest.skip(f"backend {backend.name!r} declares fixed_eps={backend.fixed_eps!r}; this "
                    "property scales eps with the input")
    case = data.draw(_cases(backend, training=True), label="case")
    a = 2.0 ** data.draw(st.integers(-3, 3), label="log2 a")
    b = data.draw(st.floats(-100, 100), label="b")
    shifted_x64 = a * case.x.astype(np.float64) + b
    # Stay well inside the dtype's range (float16 ends at 65504).
    assume(np.abs(shifted_x64).max() <= 0.25 * MAX_FINITE[case.dtype])
    shifted_x = shifted_x64.astype(case.x.dtype)
    eps = case.resolved_eps
    shifted = case.with_(x=shifted_x, eps=eps * a * a)
    y = backend.run_batch_norm(*case.arrays, **case.kwargs())[0]
    y_shifted = backend.run_batch_norm(*shifted.arrays, **shifted.kwargs())[0]
    axis = case.channel_axis

    def tol_of(c):
        stats = ChannelStats.of(c.x, axis)
        return forward_tolerance(c.x, axis, gamma=c.gamma, beta=c.beta, eps=c.resolved_eps,
                                 mean=stats.mean, var=stats.var, batch_stats=True)

    # Rounding a*x+b to the dtype moves each value by up to v*|a*x+b|, i.e. xhat by that / sigma'.
    shifted_stats = ChannelStats.of(shifted_x, axis)
    sigma = np.sqrt(shifted_stats.var + eps * a * a)
    gamma = 1.0 if case.gamma is None else np.abs(case.gamma.astype(np.float64))
    input_rounding = 2 * UNIT_ROUNDOFF[case.dtype] * shifted_stats.max_abs / sigma * gamma
    # ... and the variance by that relative amount, which moves xhat by up to sqrt(n) times it.
    input_rounding = input_rounding * (1 + np.sqrt(shifted_stats.count))
    tol = tol_of(case) + tol_of(shifted) + _per_channel(input_rounding, case.x.ndim, axis)
    assert_all([compare(y_shifted, y, tol, "batch_norm(a*x+b) vs batch_norm(x)")], case,
               backend)


@property_test
def test_batch_permutation_equivariance(backend: Backend, data) -> None:
    """Permuting the batch permutes the output the same way; running statistics do not move."""
    case = data.draw(_cases(backend, training=True, running_stats=True),
                     label="case")
    batch_axis = 0 if case.channel_axis != 0 else 1
    perm = data.draw(st.permutations(range(case.x.shape[batch_axis])), label="permutation")
    permuted = case.with_(x=np.take(case.x, perm, axis=batch_axis))
    y, mean, var = backend.run_batch_norm(*case.arrays, **case.kwargs())
    y_p, mean_p, var_p = backend.run_batch_norm(*permuted.arrays, **permuted.kwargs())
    stats = ChannelStats.of(case.x, case.channel_axis)
    tol = 2 * forward_tolerance(case.x, case.channel_axis, gamma=case.gamma, beta=case.beta,
                                eps=case.resolved_eps, mean=stats.mean, var=stats.var,
                                batch_stats=True)
    conv = get_convention(case.convention)
    mean_tol, var_tol = running_stat_tolerances(
        case.x, case.channel_axis, old_mean=case.running_mean, old_var=case.running_var,
        new_value_weight=conv.new_value_weight(case.resolved_momentum),
        stat_dtype=case.running_mean.dtype.name)
    assert_all([compare(y_p, np.take(y, perm, axis=batch_axis), tol, "y of permuted batch"),
                compare(mean_p, mean, 2 * mean_tol, "running_mean of permuted batch"),
                compare(var_p, var, 2 * var_tol, "running_var of permuted batch")], case,
               backend)


@property_test
def test_inference_is_a_per_channel_affine_map(backend: Backend, data) -> None:
    """In inference y = A_c x + B_c with A = gamma / sqrt(running_var + eps) and
    B = beta - running_mean * A, computed here in float64 from the case's own numbers."""
    case = data.draw(_cases(backend, training=False, running_stats=True),
                     label="case")
    y = backend.run_batch_norm(*case.arrays, **case.kwargs())[0]
    eps, axis, ndim = case.resolved_eps, case.channel_axis, case.x.ndim
    channels = case.x.shape[axis]
    gamma = np.ones(channels) if case.gamma is None else case.gamma.astype(np.float64)
    beta = np.zeros(channels) if case.beta is None else case.beta.astype(np.float64)
    slope = gamma / np.sqrt(case.running_var.astype(np.float64) + eps)
    intercept = beta - case.running_mean.astype(np.float64) * slope
    expected = (_per_channel(slope, ndim, axis) * case.x.astype(np.float64)
                + _per_channel(intercept, ndim, axis))
    tol = forward_tolerance(case.x, axis, gamma=case.gamma, beta=case.beta, eps=eps,
                            mean=case.running_mean, var=case.running_var, batch_stats=False)
    assert_all([compare(y, expected, tol, "inference output vs A*x+B")], case, backend)


@property_test
def test_running_stat_recurrence(backend: Backend, data) -> None:
    """Chaining batch_norm over several batches follows each convention's recurrence,
    re-derived here from the record: the new batch statistic gets weight m ("new") or 1 - m
    ("old"), and the variance term is np.var with ddof=1 when the record says unbiased."""
    first = data.draw(_cases(backend, training=True, running_stats=True),
                      label="first step")
    steps = data.draw(st.integers(1, 3), label="extra steps")
    # Later batches: the first one moved by up to 4 per value, rounded to the same dtype.
    batches = [first.x] + [
        (first.x.astype(np.float64) + data.draw(
            arrays(np.float64, first.x.shape, elements=st.floats(-4, 4)), label=f"move {i}")
         ).astype(first.x.dtype)
        for i in range(steps)
    ]
    record = get_convention(first.convention)
    m = first.resolved_momentum
    # Both weights straight from m: 1 - (1 - m) would lose a tiny m entirely.
    weight, old_weight = (m, 1.0 - m) if record.momentum_weights == "new" else (1.0 - m, m)
    mean, var = first.running_mean, first.running_var
    expected_mean = mean.astype(np.float64)
    expected_var = var.astype(np.float64)
    mean_tol, var_tol = np.zeros(mean.shape), np.zeros(var.shape)
    axis = first.channel_axis
    for batch in batches:
        case = first.with_(x=batch, running_mean=mean, running_var=var)
        _, mean, var = backend.run_batch_norm(*case.arrays, **case.kwargs())
        x64 = np.moveaxis(batch.astype(np.float64), axis, -1).reshape(-1, batch.shape[axis])
        ddof = 1 if record.unbiased_running_var else 0
        expected_mean = old_weight * expected_mean + weight * x64.mean(axis=0)
        expected_var = old_weight * expected_var + weight * x64.var(axis=0, ddof=ddof)
        step_mean, step_var = running_stat_tolerances(
            batch, axis, old_mean=expected_mean, old_var=expected_var,
            new_value_weight=weight, stat_dtype=mean.dtype.name)
        mean_tol = mean_tol + step_mean
        var_tol = var_tol + step_var
    assert_all([compare(mean, expected_mean, mean_tol, "running_mean after the steps"),
                compare(var, expected_var, var_tol, "running_var after the steps")], first,
               backend)


@property_test
def test_cumulative_average_layer(backend: Backend, data) -> None:
    """momentum=None: after k training batches a fresh layer's running statistics are the
    plain averages of the k batch means and batch variances (unbiased where the convention
    says so), whatever was there before the first batch."""
    _needs(backend, "make_layer")
    if not backend.cumulative:
        pytest.skip(f"backend {backend.name!r} declares no cumulative average "
                    "(cumulative=False), this property needs momentum=None")
    case = data.draw(_layer_cases(backend, momentum=st.none(),
                                 track_running_stats=True, load_state=False),
                     label="layer case")
    layer = backend.make_layer(case.config)
    record = get_convention(case.config.convention)
    axis = case.channel_axis
    means, variances = [], []
    mean_tol = var_tol = 0.0
    for step, batch in enumerate(case.batches, start=1):
        layer.forward(batch, training=True)
        x64 = np.moveaxis(batch.astype(np.float64), axis, -1).reshape(-1, batch.shape[axis])
        means.append(x64.mean(axis=0))
        variances.append(x64.var(axis=0, ddof=1 if record.unbiased_running_var else 0))
        step_mean, step_var = running_stat_tolerances(
            batch, axis, old_mean=np.mean(means, axis=0), old_var=np.mean(variances, axis=0),
            new_value_weight=1.0 / step, stat_dtype=case.config.param_dtype)
        mean_tol, var_tol = mean_tol + step_mean, var_tol + step_var
    state = layer.state()
    assert_all([
        state_comparison(state, "running_mean", np.mean(means, axis=0), mean_tol,
                         "running_mean"),
        state_comparison(state, "running_var", np.mean(variances, axis=0), var_tol,
                         "running_var"),
        state_comparison(state, "num_batches_tracked", np.asarray(len(case.batches)), 0.0,
                         "num_batches_tracked"),
    ], case, backend)


@property_test
def test_single_value_per_channel_outside_torch(backend: Backend, data) -> None:
    """Only the torch convention refuses one value per channel in training; the others
    normalise it to beta (its variance is 0) and move the running variance towards 0."""
    non_torch = tuple(c for c in backend.conventions if c in _NON_TORCH)
    if not non_torch:
        pytest.skip(f"backend {backend.name!r} implements only the torch convention")
    case = data.draw(_cases(backend, training=True, conventions=non_torch,
                              min_per_channel=1), label="case")
    first_values = tuple(slice(None) if i == case.channel_axis else slice(0, 1)
                         for i in range(case.x.ndim))
    case = case.with_(x=np.ascontiguousarray(case.x[first_values]))
    assert_all(check_forward(backend, case), case, backend)


@property_test
def test_matches_builtin(backend: Backend, builtin_name: str, data) -> None:
    """batch_norm agrees with the framework's own implementation on every case it accepts
    (the ``builtin_name`` fixture names one; see ``Builtin.cases`` for the restrictions)."""
    builtin = backend.builtin(builtin_name)
    case = data.draw(bn_cases(**{"shapes": backend.shape_pool, **builtin.cases}), label="case")
    assert_all(check_builtin(backend, builtin, case), case, backend)


@property_test
def test_gradients_match_builtin(backend: Backend, gradient_builtin_name: str, data) -> None:
    """dx, dgamma and dbeta agree with the framework's own autodiff of its own batch norm."""
    builtin = backend.builtin(gradient_builtin_name)
    cases = bn_cases(**{"shapes": backend.shape_pool, **builtin.cases, "training": True})
    case, dy = data.draw(with_dy(cases), label="case and dy")
    assert_all(check_builtin_gradients(backend, builtin, case, dy), case, backend)


@property_test
def test_layer_matches_builtin_layer(backend: Backend, layer_builtin_name: str, data) -> None:
    """The native layer and the framework's own layer, fed the same batches from the same
    loaded state, agree step by step: outputs, running statistics, then inference."""
    builtin = backend.layer_builtin(layer_builtin_name)
    case = data.draw(layer_cases(**{"shapes": backend.shape_pool, **builtin.cases}),
                     label="layer case")
    assert_all(check_layer(backend, case, reference=builtin), case, backend)


def _builtin_strategy(backend: Backend, name: str):
    """(built-in, strategy of cases both it and ``backend`` take), or raise Unsupported."""
    layer = "make_layer" in backend.capabilities
    builtin, extra = named_builtin(name, layer)
    restrictions = {**builtin.cases, **extra}
    for fixed in ("eps", "momentum"):  # the implementation's fixed value wins
        if getattr(backend, f"fixed_{fixed}") is not None:
            restrictions.pop(fixed, None)
    if isinstance(builtin, LayerBuiltin):
        if not layer:
            raise Unsupported(f"{name} is a layer and backend {backend.name!r} has none")
        return builtin, layer_cases_for(backend, **restrictions)
    restrictions.pop("track_running_stats", None)
    return builtin, cases_for(backend, **restrictions)


@property_test
def test_agrees_with_named_builtins(backend: Backend, data) -> None:
    """The implementation agrees with each framework built-in its adapter names in
    ``compare_with`` (e.g. ``("torch.nn.BatchNorm2d",)``), on the cases both accept: outputs
    and running statistics, step by step for a layer."""
    if not backend.compare_with:
        pytest.skip(f"backend {backend.name!r} names no built-in to compare with "
                    "(compare_with)")
    servable, reasons = {}, []
    for name in backend.compare_with:
        try:
            servable[name] = _builtin_strategy(backend, name)
        except Unsupported as reason:
            reasons.append(f"{name}: {reason}")
    if not servable:
        pytest.skip("; ".join(reasons))
    name = data.draw(st.sampled_from(sorted(servable)), label="built-in")
    builtin, strategy = servable[name]
    case = data.draw(strategy, label="case")
    if isinstance(builtin, LayerBuiltin):
        assert_all(check_layer(backend, case, reference=builtin), case, backend)
    else:
        assert_all(check_builtin(backend, builtin, case), case, backend)


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: m.id)
def test_bad_input_raises_and_modifies_nothing(backend: Backend, mistake: Mistake) -> None:
    """A call any batch norm must refuse raises an exception, and every array passed in is left
    as it was. With ``exact_errors`` declared (bnref's own adapters), every mistake of bnref's
    contract, with its exact exception type and message."""
    reason = mistake.applies_to(backend)
    if reason is not None:
        pytest.skip(reason)
    assert_all(check_mistake(backend, mistake), mistake.id, backend)


@pytest.mark.parametrize("mistake", LAYER_MISTAKES, ids=lambda m: m.id)
def test_bad_layer_arguments_raise(backend: Backend, mistake: LayerMistake) -> None:
    """The native layer refuses bnref's wrong constructor arguments with bnref's messages
    (bnref's own tier: adapters that declare ``exact_errors``)."""
    _needs(backend, "make_layer")
    if not backend.exact_errors:
        pytest.skip("bnref's own layer contract (declare exact_errors=True to be held to it)")
    assert_all(check_layer_mistake(backend, mistake), mistake.id, backend)
