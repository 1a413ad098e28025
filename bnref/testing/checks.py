"""Comparisons of a backend with the float64 oracle, shared by the test suite and ``bnref check``.

Each function runs one case through a :class:`~bnref.testing.backends.Backend` and returns
:class:`~bnref.testing.tolerances.Comparison` results; the suite asserts them, ``bnref check``
tabulates them. The oracle is :mod:`bnref.numpy` run in float64 on the exact same (already
rounded) inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import bnref.numpy as oracle
from bnref.conventions import get_convention
from bnref.testing.backends import Backend, Builtin, LayerBuiltin, LayerConfig
from bnref.testing.strategies import BNCase, LayerCase, numpy_dtype, param_dtype
from bnref.testing.tolerances import (
    TINY,
    UNIT_ROUNDOFF,
    ChannelStats,
    Comparison,
    compare,
    forward_tolerance,
    gradient_tolerances,
    override_factor,
    running_stat_tolerances,
)

__all__ = [
    "LAYER_MISTAKES",
    "MISTAKES",
    "Mistake",
    "check_builtin",
    "check_builtin_gradients",
    "check_finite_differences",
    "check_forward",
    "check_gradients",
    "check_layer",
    "check_layer_mistake",
    "check_mistake",
    "oracle_forward",
    "state_comparison",
]


def _exact(what: str, ok: bool, detail: str) -> Comparison:
    return Comparison(what, 0.0 if ok else np.inf, 0.0, 0.0 if ok else np.inf, detail)


def _raised(what: str, error: Exception) -> Comparison:
    return _exact(f"{what} on a valid call", False,
                  f"raised {type(error).__name__}: {error} (if your implementation takes only "
                  "some ranks, channel axes or dtypes, declare them: ranks=, channel_axis=, "
                  "dtypes=)")


def _dtype_check(what: str, array: np.ndarray | None, expected: str) -> Comparison:
    got = None if array is None else array.dtype.name
    return _exact(f"{what} dtype", got == expected, f"  expected {expected}, got {got}")


def oracle_forward(case: BNCase):
    wide = case.as_float64()
    return oracle.batch_norm(*wide.arrays, **wide.kwargs())


def _forward_tolerances(case: BNCase, factor: float):
    """Bounds for (y, new_running_mean, new_running_var) of ``case`` against exact values."""
    axis = case.channel_axis
    batch_stats = case.training or case.running_mean is None
    if batch_stats:
        stats = ChannelStats.of(case.x, axis)
        mean, var = stats.mean, stats.var
    else:
        mean, var = case.running_mean, case.running_var
    y_tol = forward_tolerance(case.x, axis, gamma=case.gamma, beta=case.beta,
                              eps=case.resolved_eps, mean=mean, var=var,
                              batch_stats=batch_stats, factor=factor)
    if case.running_mean is None or not case.training:
        # No update: None stays None, and inference hands the statistics back unchanged.
        return y_tol, 0.0, 0.0
    conv = get_convention(case.convention)
    mean_tol, var_tol = running_stat_tolerances(
        case.x, axis, old_mean=case.running_mean, old_var=case.running_var,
        new_value_weight=conv.new_value_weight(case.resolved_momentum),
        stat_dtype=case.running_mean.dtype.name, factor=factor)
    return y_tol, mean_tol, var_tol


def _compare_outputs(case: BNCase, got, expected, tolerances, against: str) -> list[Comparison]:
    (y, new_mean, new_var), (ref_y, ref_mean, ref_var) = got, expected
    y_tol, mean_tol, var_tol = tolerances
    stat_dtype = None if case.running_mean is None else case.running_mean.dtype.name
    results = [_dtype_check("y", y, case.dtype), compare(y, ref_y, y_tol, f"y vs {against}")]
    if stat_dtype is not None:
        results += [_dtype_check("running_mean", new_mean, stat_dtype),
                    _dtype_check("running_var", new_var, stat_dtype)]
    return [*results,
            compare(new_mean, ref_mean, mean_tol, f"running_mean vs {against}"),
            compare(new_var, ref_var, var_tol, f"running_var vs {against}")]


def check_forward(backend: Backend, case: BNCase, check: str = "forward") -> list[Comparison]:
    """``batch_norm`` output and new running statistics vs the oracle.

    In inference (or with no running statistics) the statistics must come back unchanged.
    """
    tolerances = _forward_tolerances(case, override_factor(backend.name, case.dtype, check))
    native = [None if a is None else backend.asarray(a) for a in case.arrays]
    try:
        outputs = backend.batch_norm(*native, **case.kwargs())
    except Exception as error:  # a valid call refused: reported as this case's failure
        return [_raised("batch_norm", error)]
    got = tuple(None if r is None else backend.to_numpy(r) for r in outputs)
    untouched = [
        _exact(f"{name} unchanged", np.array_equal(backend.to_numpy(value), original,
                                                   equal_nan=True), f"  {name} was modified")
        for name, value, original in zip(("x", "gamma", "beta", "running_mean", "running_var"),
                                         native, case.arrays, strict=True)
        if value is not None
    ]
    return [*_compare_outputs(case, got, oracle_forward(case), tolerances, "oracle"),
            *untouched]


def check_builtin(backend: Backend, builtin: Builtin, case: BNCase,
                  check: str = "builtin") -> list[Comparison]:
    """``batch_norm`` vs a framework's own implementation on a case it accepts.

    Both sides are within the forward bound of the exact result, so they may differ by twice it.
    """
    factor = 2 * override_factor(backend.name, case.dtype, f"{check}:{builtin.name}")
    tolerances = _forward_tolerances(case, factor)
    got = backend.run_batch_norm(*case.arrays, **case.kwargs())
    theirs = builtin.run(*case.arrays, training=case.training, momentum=case.resolved_momentum,
                         eps=case.resolved_eps, axis=case.channel_axis,
                         convention=case.convention)
    return _compare_outputs(case, got, theirs, tolerances, builtin.name)


def check_gradients(backend: Backend, case: BNCase, dy: np.ndarray,
                    check: str = "gradients") -> list[Comparison]:
    """Training-mode ``(dx, dgamma, dbeta)`` vs the oracle's analytic backward."""
    factor = override_factor(backend.name, case.dtype, check)
    kwargs = {"eps": case.eps, "axis": case.axis, "convention": case.convention}
    try:
        dx, dgamma, dbeta = backend.gradients(case.x, case.gamma, case.beta, dy, **kwargs)
    except Exception as error:  # a valid call refused: reported as this case's failure
        return [_raised("gradients", error)]
    wide = case.as_float64()
    ref = oracle.batch_norm_backward(dy.astype(np.float64), wide.x, wide.gamma, beta=wide.beta,
                                     **kwargs)
    pdtype = case.gamma.dtype.name if case.gamma is not None else (
        "float64" if case.dtype == "float64" else "float32")
    tol_dx, tol_dgamma, tol_dbeta = gradient_tolerances(
        case.x, dy, case.channel_axis, gamma=case.gamma, eps=case.resolved_eps,
        param_dtype=pdtype, factor=factor)
    return [
        _dtype_check("dx", dx, case.dtype),
        compare(dx, ref[0], tol_dx, "dx"),
        compare(dgamma, ref[1], tol_dgamma, "dgamma"),
        compare(dbeta, ref[2], tol_dbeta, "dbeta"),
    ]


def check_layer(backend: Backend, case: LayerCase, check: str = "layer",
                reference: LayerBuiltin | None = None) -> list[Comparison]:
    """A training trajectory then inference through the backend's layer vs the oracle layer
    (or vs a framework's built-in layer, run side by side on the same batches).

    Running-statistic tolerances add up over the steps (each step's error is carried with a
    weight of at most 1); the inference output's tolerance includes what those errors move it.
    Against a built-in, both sides are within the bound of the exact result: twice it.
    """
    config = case.config
    dtype = case.eval_batch.dtype.name
    against = "oracle" if reference is None else reference.name
    check = check if reference is None else f"{check}:{reference.name}"
    factor = override_factor(backend.name, dtype, check) * (1 if reference is None else 2)
    layer = backend.make_layer(config)
    other = None if reference is None else reference.make(config)
    ref = oracle.BatchNorm(config.num_features, momentum=config.momentum, eps=config.eps,
                           affine=config.affine, track_running_stats=config.track_running_stats,
                           axis=config.axis, convention=config.convention, dtype=np.float64)
    if case.initial_state is not None:
        layer.load_state(case.initial_state)
        if other is not None:
            other.load_state(case.initial_state)
        names = {"gamma": "weight", "beta": "bias"}
        ref.load_state_dict({names.get(k, k): v for k, v in case.initial_state.items()})
    conv, axis, eps = ref.convention, case.channel_axis, ref.eps
    results: list[Comparison] = []
    mean_err = np.zeros(config.num_features)
    var_err = np.zeros(config.num_features)
    for step, batch in enumerate((*case.batches, case.eval_batch)):
        training = step < len(case.batches)
        old_mean, old_var = ref.running_mean, ref.running_var
        gamma, beta = ref.weight, ref.bias
        try:
            y = layer.forward(batch, training=training)
        except Exception as error:  # a valid call refused: reported as this case's failure
            return [*results, _raised(f"step {step + 1} forward", error)]
        ref_y = ref(batch.astype(np.float64), training=training)
        if other is not None:
            ref_y = other.forward(batch, training=training)
        label = f"step {step + 1} ({'train' if training else 'eval'})"
        batch_stats = training or old_mean is None
        stats = ChannelStats.of(batch, axis)
        mean, var = (stats.mean, stats.var) if batch_stats else (old_mean, old_var)
        tol = forward_tolerance(batch, axis, gamma=gamma, beta=beta, eps=eps, mean=mean, var=var,
                                batch_stats=batch_stats, factor=factor)
        if not batch_stats:  # what the running statistics' own errors move the output by
            sigma = np.sqrt(np.asarray(old_var) + eps)
            x_hat = (stats.max_abs + np.abs(old_mean)) / sigma
            g = np.ones_like(sigma) if gamma is None else np.abs(gamma)
            shape = [1] * batch.ndim
            shape[axis] = -1
            tol = tol + (g * (mean_err / sigma + x_hat * var_err / (2 * sigma**2))).reshape(shape)
        results += [_dtype_check(f"{label} y", y, dtype),
                    compare(y, ref_y, tol, f"{label} y vs {against}")]
        state = layer.state()
        expected = {"running_mean": ref.running_mean, "running_var": ref.running_var}
        if other is not None:
            expected = other.state()
        if config.track_running_stats and training:
            weight = 1.0 / ref.num_batches_tracked if config.momentum is None else (
                conv.new_value_weight(ref.momentum))
            step_mean, step_var = running_stat_tolerances(
                batch, axis, old_mean=old_mean, old_var=old_var, new_value_weight=weight,
                stat_dtype=config.param_dtype, factor=factor)
            mean_err, var_err = mean_err + step_mean, var_err + step_var
        if config.track_running_stats:
            results += [
                state_comparison(state, name, expected.get(name), err,
                                 f"{label} {name} vs {against}")
                for name, err in (("running_mean", mean_err), ("running_var", var_err))]
            if "num_batches_tracked" in state or config.momentum is None:
                # A counter where the framework keeps one (always for the cumulative average).
                results.append(_exact(
                    f"{label} num_batches_tracked",
                    int(state.get("num_batches_tracked", -1)) == ref.num_batches_tracked,
                    f"  expected {ref.num_batches_tracked}, got "
                    f"{state.get('num_batches_tracked')}"))
        else:
            results.append(_exact(f"{label} no running stats",
                                  "running_mean" not in state and "running_var" not in state,
                                  f"  state has {sorted(state)}"))
    return results


def state_comparison(state: dict[str, np.ndarray], name: str, expected, tolerance,
                     what: str) -> Comparison:
    """``compare`` for one entry of a layer's state, saying in words when the entry is
    missing or has another shape (the usual sign of a renamed variable or a wrong axis)."""
    if name not in state and expected is not None:
        return _exact(what, False, f"your layer's state has no {name!r} (it has "
                      f"{sorted(state)}); map your names to bnref's in the adapter's state()")
    got = state.get(name)
    if got is not None and expected is not None and np.shape(got) != np.shape(expected):
        return _exact(what, False, f"your layer's state has {name} of shape "
                      f"{np.shape(got)}, expected {np.shape(expected)}: is the channel axis "
                      "right?")
    return compare(got, expected, tolerance, what)


def check_builtin_gradients(backend: Backend, builtin: Builtin, case: BNCase, dy: np.ndarray,
                            check: str = "builtin gradients") -> list[Comparison]:
    """Training-mode gradients vs the framework's own autodiff of its own batch norm
    (both within the gradient bound of the exact values: twice it)."""
    factor = 2 * override_factor(backend.name, case.dtype, f"{check}:{builtin.name}")
    kwargs = {"eps": case.eps, "axis": case.axis, "convention": case.convention}
    ours = backend.gradients(case.x, case.gamma, case.beta, dy, **kwargs)
    theirs = builtin.gradients(case.x, case.gamma, case.beta, dy, eps=case.resolved_eps,
                               axis=case.channel_axis)
    pdtype = case.gamma.dtype.name if case.gamma is not None else (
        "float64" if case.dtype == "float64" else "float32")
    tolerances = gradient_tolerances(case.x, dy, case.channel_axis, gamma=case.gamma,
                                     eps=case.resolved_eps, param_dtype=pdtype, factor=factor)
    return [compare(a, b, tol, f"{name} vs {builtin.name}")
            for name, a, b, tol in zip(("dx", "dgamma", "dbeta"), ours, theirs, tolerances,
                                       strict=True)]


def check_finite_differences(backend: Backend, case: BNCase, dy: np.ndarray,
                             direction: dict[str, np.ndarray],
                             check: str = "finite differences") -> list[Comparison]:
    """The backend's float64 gradients are the derivative of its own forward.

    Along a random direction ``v`` (the x part scaled per channel by ``sqrt(var + eps)``),
    ``<grad, v>`` must match the central difference of ``t -> sum(dy * y(x + t v, ...))``.
    With step ``h`` the difference is off by ``h² / 6`` times the third derivative (of order
    ``(1 + X)³`` per unit of ``sum|dy| (|gamma| + |beta| + 1)``) plus the rounding
    ``u (1 + kappa)(1 + X) / h`` -- ``kappa`` because ``x + t v`` is itself rounded;
    ``h = 2^-13`` balances the two.
    """
    x, axis, eps = case.x, case.channel_axis, case.resolved_eps
    moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    sigma = np.sqrt(moved.var(axis=0) + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    v_x = direction["x"] * sigma.reshape(shape)
    v_gamma = None if case.gamma is None else direction["gamma"]
    v_beta = None if case.beta is None else direction["beta"]

    def objective(t: float) -> float:
        moved_case = case.with_(
            x=x + t * v_x, training=True,
            gamma=None if case.gamma is None else case.gamma + t * v_gamma,
            beta=None if case.beta is None else case.beta + t * v_beta)
        y = backend.run_batch_norm(*moved_case.arrays, **moved_case.kwargs())[0]
        return float(np.sum(y * dy))

    dx, dgamma, dbeta = backend.gradients(x, case.gamma, case.beta, dy, eps=case.eps,
                                          axis=case.axis, convention=case.convention)
    analytic = float(np.sum(dx * v_x))
    analytic += 0.0 if dgamma is None else float(np.dot(dgamma, v_gamma))
    analytic += 0.0 if dbeta is None else float(np.dot(dbeta, v_beta))
    h = 2.0**-13
    numeric = (objective(h) - objective(-h)) / (2 * h)
    x_hat_max = float(np.max(np.abs(moved - moved.mean(axis=0)) / sigma))
    kappa = float(np.max(np.abs(moved).max(axis=0) / sigma))
    gamma_max = 1.0 if case.gamma is None else float(np.abs(case.gamma).max())
    beta_max = 0.0 if case.beta is None else float(np.abs(case.beta).max())
    scale = float(np.abs(dy).sum()) * (gamma_max + beta_max + 1.0)
    rounding = UNIT_ROUNDOFF["float64"] * (1 + kappa) * (1 + x_hat_max) / h
    # Values below the smallest normal underflow in the objective: up to TINY / h of slope.
    tol = 8 * scale * (h**2 * (1 + x_hat_max) ** 3 + rounding) + TINY["float64"] / h
    tol *= override_factor(backend.name, case.dtype, check)
    return [compare(analytic, numeric, tol,
                    "<your gradients, v> vs the central difference of your forward along v")]


# -- bad input ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mistake:
    """One wrong call: ``change`` turns the valid base call into it.

    ``universal`` mistakes are ones any batch norm must refuse (a gamma or running variance
    whose length is not the channel count, an axis the input does not have): every adapter is
    held to raising *an* exception for them. The rest (and the exact ``error``/``message`` of
    all) are bnref's own contract, checked for adapters that declare ``exact_errors``.
    """

    id: str
    error: type[Exception]
    message: str  # the exact message; "{array_type}" is the backend's array type name
    change: Callable[[dict[str, Any]], dict[str, Any]]
    universal: bool = False

    def applies_to(self, backend: Backend) -> str | None:
        """``None`` when ``backend`` is held to this mistake, else the reason it is not."""
        if backend.exact_errors:
            return None
        if not self.universal:
            return ("bnref's own contract, not a property of every batch norm (declare "
                    "exact_errors=True to be held to it)")
        if self.id == "axis-out-of-range" and backend.channel_axis is not None:
            return f"backend {backend.name!r} has a fixed channel axis, no axis argument"
        return None


def base_call() -> dict[str, Any]:
    """A valid call: x (4, 3, 2) float32, channels on axis 1, every optional array given."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 2)).astype(np.float32)
    return {
        "x": x, "gamma": np.full(3, 1.5, np.float32), "beta": np.full(3, 0.5, np.float32),
        "running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32),
        "training": True, "momentum": 0.1, "eps": 1e-5, "axis": 1, "convention": "torch",
    }


def _own_terms(backend: Backend) -> dict[str, Any]:
    """:func:`base_call` in the implementation's declared terms: its convention, a rank it
    takes, its channel axis and the hyperparameters it fixes (3 channels all the same)."""
    call = base_call()
    rank = min(max(3, backend.ranks[0]), backend.ranks[1])
    axis = 1 if backend.channel_axis is None else backend.channel_axis % rank
    shape = [4] + [2] * (rank - 2)
    shape.insert(axis, 3)
    dtype = "float32" if "float32" in backend.dtypes else backend.dtypes[0]
    call["x"] = np.random.default_rng(0).normal(size=shape).astype(numpy_dtype(dtype))
    for name in ("gamma", "beta", "running_mean", "running_var"):
        call[name] = call[name].astype(param_dtype(dtype))
    call.update(axis=axis, convention=backend.conventions[0])
    if backend.fixed_eps is not None:
        call["eps"] = backend.fixed_eps
    if backend.fixed_momentum is not None:
        call["momentum"] = backend.fixed_momentum
    return call


def _set(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda call: {**call, **changes}


_FLOATING = "float16, bfloat16, float32, float64"
MISTAKES: tuple[Mistake, ...] = (
    Mistake("rank-1", ValueError, "x must have rank 2 to 5, got rank 1 with shape (3,)",
            _set(x=np.ones(3, np.float32))),
    Mistake("rank-6", ValueError,
            "x must have rank 2 to 5, got rank 6 with shape (2, 3, 1, 1, 1, 1)",
            _set(x=np.ones((2, 3, 1, 1, 1, 1), np.float32))),
    Mistake("gamma-channels", ValueError,
            "gamma must have shape (3,) to match the 3 channels of x on axis 1, got shape (4,)",
            _set(gamma=np.ones(4, np.float32)), universal=True),
    Mistake("running-var-channels", ValueError,
            "running_var must have shape (3,) to match the 3 channels of x on axis 1, "
            "got shape (2,)", _set(running_var=np.ones(2, np.float32)), universal=True),
    Mistake("int-x", TypeError, f"x must have a floating dtype ({_FLOATING}), got int32",
            _set(x=np.ones((4, 3, 2), np.int32))),
    Mistake("int-gamma", TypeError, f"gamma must have a floating dtype ({_FLOATING}), got int64",
            _set(gamma=np.ones(3, np.int64))),
    Mistake("not-an-array", TypeError, "x must be a {array_type}, got builtins.list",
            _set(x=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])),
    Mistake("eps-zero", ValueError, "eps must be a finite float > 0, got 0.0", _set(eps=0.0)),
    Mistake("eps-negative", ValueError, "eps must be a finite float > 0, got -1e-05",
            _set(eps=-1e-5)),
    Mistake("momentum-above-1", ValueError, "momentum must be in [0, 1], got 1.5",
            _set(momentum=1.5)),
    Mistake("momentum-negative", ValueError, "momentum must be in [0, 1], got -0.1",
            _set(momentum=-0.1)),
    Mistake("momentum-none", ValueError,
            "momentum must be a float in [0, 1], got None: the cumulative average needs the "
            "batch counter of a layer (BatchNorm(momentum=None))", _set(momentum=None)),
    Mistake("running-var-missing", ValueError,
            "running_mean and running_var must be given together or both be None, got "
            "running_mean=shape (3,) and running_var=None", _set(running_var=None)),
    Mistake("axis-out-of-range", ValueError, "axis must be in [-3, 2] for x of rank 3, got 3",
            lambda call: {**call, "axis": call["x"].ndim}, universal=True),
    Mistake("one-value-per-channel", ValueError,
            "Expected more than 1 value per channel when training, got input of shape (1, 3) "
            "(channel axis 1)", _set(x=np.ones((1, 3), np.float32))),
    Mistake("unknown-convention", ValueError,
            "convention must be one of ['flax', 'keras', 'mxnet', 'onnx', 'torch'] or a "
            "Convention, got 'pytorch'", _set(convention="pytorch")),
)


@dataclass(frozen=True)
class LayerMistake:
    """A wrong layer constructor call: ``LayerConfig`` fields that make it wrong."""

    id: str
    error: type[Exception]
    message: str
    changes: dict[str, Any]


LAYER_MISTAKES: tuple[LayerMistake, ...] = (
    LayerMistake("no-features", ValueError, "num_features must be a positive int, got 0",
                 {"num_features": 0}),
    LayerMistake("momentum-above-1", ValueError, "momentum must be in [0, 1], got 1.5",
                 {"momentum": 1.5}),
    LayerMistake("eps-zero", ValueError, "eps must be a finite float > 0, got 0.0",
                 {"eps": 0.0}),
    LayerMistake("unknown-convention", ValueError,
                 "convention must be one of ['flax', 'keras', 'mxnet', 'onnx', 'torch'] or a "
                 "Convention, got 'pytorch'", {"convention": "pytorch"}),
)


def check_layer_mistake(backend: Backend, mistake: LayerMistake) -> list[Comparison]:
    """The layer refuses a wrong constructor argument with the contract's exception/message."""
    config = LayerConfig(num_features=3).with_(**mistake.changes)
    try:
        backend.make_layer(config)
    except Exception as error:  # the comparison below reports any other exception
        raised = error
    else:
        raised = None
    got = "nothing" if raised is None else f"{type(raised).__name__}: {raised}"
    return [_exact(f"{mistake.id} raises", type(raised) is mistake.error,
                   f"  expected {mistake.error.__name__}, got {got}"),
            _exact(f"{mistake.id} message", raised is not None and str(raised) == mistake.message,
                   f"  expected {mistake.message!r}, got {got!r}")]


def check_mistake(backend: Backend, mistake: Mistake) -> list[Comparison]:
    """The wrong call raises an exception and modifies nothing; for an adapter that declares
    ``exact_errors``, the contract's exception type and message."""
    call = mistake.change(base_call() if backend.exact_errors else _own_terms(backend))
    array_names = ("x", "gamma", "beta", "running_mean", "running_var")
    native = {name: backend.asarray(value) if isinstance(value, np.ndarray) else value
              for name, value in call.items()}
    before = {name: np.array(backend.to_numpy(native[name]), copy=True)
              for name in array_names if isinstance(call[name], np.ndarray)}
    args = [native[name] for name in array_names]
    kwargs = {k: v for k, v in native.items() if k not in array_names}
    expected = mistake.message.format(array_type=backend.array_type)
    try:
        backend.batch_norm(*args, **kwargs)
    except Exception as error:  # the comparison below reports any other exception
        raised = error
    else:
        raised = None
    got = "nothing" if raised is None else f"{type(raised).__name__}: {raised}"
    if backend.exact_errors:
        results = [
            _exact(f"{mistake.id} raises", type(raised) is mistake.error,
                   f"  expected {mistake.error.__name__}, got {got}"),
            _exact(f"{mistake.id} message", raised is not None and str(raised) == expected,
                   f"  expected {expected!r}, got {got!r}"),
        ]
    else:
        results = [_exact(f"{mistake.id} raises", raised is not None,
                          f"  the call returned instead of raising: {mistake.id} went "
                          "unnoticed")]
    for name, value in before.items():
        after = backend.to_numpy(native[name])
        same = after.shape == value.shape and bool(np.array_equal(after, value, equal_nan=True))
        results.append(_exact(f"{mistake.id} leaves {name} unchanged", same,
                              f"  {name} changed"))
    return results

