"""The tolerance policy: how far a backend may be from the float64 oracle, and why.

Every comparison in bnref goes through :func:`compare` with a per-element tolerance built here;
there is no bare ``allclose``. The bounds are first-order rounding-error bounds, per channel.

Notation, per channel ``c`` (``n`` values): ``u`` is the unit roundoff of the *compute* dtype
(float32 for float16/bfloat16/float32 inputs, float64 for float64), ``v`` that of the dtype
the result is stored in, ``sigma = sqrt(var + eps)``, ``S = max |x|`` (with ``|running_mean|``
added in inference), ``kappa = S / sigma`` the channel's condition number, ``X = max |xhat|``,
and ``g(n) = sqrt(n)`` the growth of rounding error in a sum of ``n`` terms (pairwise and
blocked sums grow like ``log n``, naive ones like ``sqrt n`` on average; we take the larger).

Forward, ``y = gamma * (x - mean) / sigma + beta``:
  * the computed mean is off by ``|dmean| <= u g(n) S``; subtracting it from ``x`` moves
    ``xhat`` by ``u g(n) kappa``. The two-pass variance is off by a relative
    ``u g(n) (1 + kappa)`` (a first-order term from the centring error, which E[x²]−E[x]²
    would turn into ``u kappa²``: that is the bug this bound is tight enough to catch), moving
    ``xhat`` by ``X`` times that. Together: ``|gamma| u g(n) (1 + kappa) (1 + X)``.
  * subtract, multiply and add round once each, and the result is rounded to the output dtype:
    ``(3u + v) (|gamma| X + |beta|)``.
  In inference no sum is taken (``g = 1``) and ``kappa`` uses the running statistics.

Running statistics, ``new = a * old + b * batch`` with ``a + b = 1``:
  ``b (u g(n) S)`` for the mean, ``b * 2 (u g(n) (var + S sd) + (u g(n) S)²)`` for the
  (possibly unbiased, so at most doubled) variance -- the squared term is the centring error,
  which is all that is left on a constant channel -- plus one rounding of each operand and of
  the stored result.

Gradients (training mode), with ``D = max |dy|``:
  ``dx = gamma / sigma * (dy - mean(dy) - xhat * mean(dy * xhat))`` is off by
  ``|gamma| / sigma * D (1 + X)² (u g(n) (1 + kappa) + v)``; ``dgamma = sum(dy * xhat)`` by
  ``n D (u g(n) (1 + kappa) (1 + X) + v_p)``; ``dbeta = sum(dy)`` by ``n D (u g(n) + v_p)``,
  ``v_p`` being the parameter dtype's roundoff.

Every bound also adds the smallest normal number of the result's dtype (:data:`TINY`): values
that underflow, or are flushed to zero, lose up to that much whatever their relative accuracy.
Some compilers (XLA on CPU) also flush subnormal *inputs and intermediates* to zero: a
per-channel scale below TINY of the compute dtype then loses ``|x - mean| * TINY``, and a sum
of ``n`` subnormal terms ``n * TINY``; those terms are added too (they matter only when every
value involved is that small).

Each bound is multiplied by :data:`SAFETY` (4) for the handful of roundings first-order analysis
folds together. A backend/dtype/check that needs more gets an entry in :data:`OVERRIDES`
with the reason; the entry multiplies the bound, it never replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_FINITE",
    "OVERRIDES",
    "SAFETY",
    "TINY",
    "UNIT_ROUNDOFF",
    "ChannelStats",
    "Comparison",
    "assert_close",
    "compare",
    "compute_dtype_name",
    "forward_tolerance",
    "gradient_tolerances",
    "model_tolerance",
    "rounding_spread",
    "running_stat_tolerances",
]

UNIT_ROUNDOFF = {
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float32": 2.0**-24,
    "float64": 2.0**-53,
}
# Smallest normal number: below it results underflow (or flush to zero) with an absolute error
# up to this size, which no relative bound covers.
TINY = {
    "float16": 2.0**-14,
    "bfloat16": 2.0**-126,
    "float32": 2.0**-126,
    "float64": 2.0**-1022,
}
# Largest finite number of each dtype: test inputs keep outputs well below it.
MAX_FINITE = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
    "float64": 1.7976931348623157e308,
}
SAFETY = 4.0

# (backend, dtype, check) -> (factor, reason). "*" matches any backend or dtype.
OVERRIDES: dict[tuple[str, str, str], tuple[float, str]] = {}


def compute_dtype_name(dtype: str) -> str:
    """float64 is computed in float64, everything narrower in float32."""
    return "float64" if dtype == "float64" else "float32"


def override_factor(backend: str, dtype: str, check: str) -> float:
    for key in ((backend, dtype, check), (backend, "*", check), ("*", dtype, check)):
        if key in OVERRIDES:
            return OVERRIDES[key][0]
    return 1.0


def _growth(n: int) -> float:
    return float(np.sqrt(max(n, 1)))


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel float64 facts about a batch (from the exact, already-rounded input)."""

    count: int
    mean: np.ndarray
    var: np.ndarray
    max_abs: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, axis: int) -> ChannelStats:
        x64 = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis])
        return cls(x64.shape[0], x64.mean(axis=0), x64.var(axis=0), np.abs(x64).max(axis=0))


def _per_channel(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(values, np.float64).reshape(shape)


def forward_tolerance(
    x: np.ndarray,
    axis: int,
    *,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    mean: np.ndarray,
    var: np.ndarray,
    batch_stats: bool,
    factor: float = 1.0,
) -> np.ndarray:
    """Per-element bound on ``|y - y_oracle|``, broadcastable to ``x``'s shape.

    ``mean``/``var`` are the statistics the normalisation used (batch or running).
    """
    dtype = x.dtype.name
    u, v = UNIT_ROUNDOFF[compute_dtype_name(dtype)], UNIT_ROUNDOFF[dtype]
    stats = ChannelStats.of(x, axis)
    sigma = np.sqrt(np.asarray(var, np.float64) + eps)
    scale_in = stats.max_abs + (0.0 if batch_stats else np.abs(np.asarray(mean, np.float64)))
    kappa = scale_in / sigma
    x_hat_max = (stats.max_abs + np.abs(np.asarray(mean, np.float64))) / sigma
    g = _growth(stats.count) if batch_stats else 1.0
    abs_gamma = np.ones_like(sigma) if gamma is None else np.abs(gamma.astype(np.float64))
    abs_beta = np.zeros_like(sigma) if beta is None else np.abs(beta.astype(np.float64))
    flushed = TINY[compute_dtype_name(dtype)] * (
        stats.max_abs + np.abs(np.asarray(mean, np.float64)) + abs_gamma / sigma + 1)
    bound = (abs_gamma * u * g * (1 + kappa) * (1 + x_hat_max)
             + (3 * u + v) * (abs_gamma * x_hat_max + abs_beta) + TINY[dtype] + flushed)
    return _per_channel(SAFETY * factor * bound, x.ndim, axis)


def running_stat_tolerances(
    x: np.ndarray,
    axis: int,
    *,
    old_mean: np.ndarray,
    old_var: np.ndarray,
    new_value_weight: float,
    stat_dtype: str,
    factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on ``|new_running_mean - oracle|`` and ``|new_running_var - oracle|``, shape (C,)."""
    u = UNIT_ROUNDOFF[compute_dtype_name(x.dtype.name)]
    v = max(UNIT_ROUNDOFF[stat_dtype], u)
    stats = ChannelStats.of(x, axis)
    g, b = _growth(stats.count), new_value_weight
    sd = np.sqrt(stats.var)
    unbiased_var = stats.var * (2.0 if stats.count > 1 else 1.0)
    tiny = TINY[stat_dtype]
    mean_bound = (b * u * g * stats.max_abs + v * (np.abs(old_mean) + 2 * np.abs(stats.mean))
                  + tiny)
    mean_error = u * g * stats.max_abs
    var_bound = (b * 2 * (u * g * (unbiased_var + stats.max_abs * sd) + mean_error**2)
                 + v * (np.abs(old_var) + 2 * unbiased_var) + tiny)
    return SAFETY * factor * mean_bound, SAFETY * factor * var_bound


def gradient_tolerances(
    x: np.ndarray,
    dy: np.ndarray,
    axis: int,
    *,
    gamma: np.ndarray | None,
    eps: float,
    param_dtype: str,
    factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounds on the errors of ``dx`` (broadcastable to x), ``dgamma`` and ``dbeta`` ((C,))."""
    dtype = x.dtype.name
    u, v = UNIT_ROUNDOFF[compute_dtype_name(dtype)], UNIT_ROUNDOFF[dtype]
    v_p = UNIT_ROUNDOFF[param_dtype]
    stats = ChannelStats.of(x, axis)
    d = ChannelStats.of(dy, axis).max_abs
    sigma = np.sqrt(stats.var + eps)
    kappa = stats.max_abs / sigma
    x_hat_max = (stats.max_abs + np.abs(stats.mean)) / sigma
    g, n = _growth(stats.count), stats.count
    e = u * g * (1 + kappa)
    abs_gamma = np.ones_like(sigma) if gamma is None else np.abs(gamma.astype(np.float64))
    flushed = TINY[compute_dtype_name(dtype)] * n * (1 + x_hat_max) ** 2
    dx_bound = (abs_gamma / sigma * d * (1 + x_hat_max) ** 2 * (e + v) + TINY[dtype]
                + flushed * (1 + abs_gamma / sigma))
    dgamma_bound = n * d * (e * (1 + x_hat_max) + v_p) + TINY[param_dtype] + flushed
    dbeta_bound = n * d * (u * g + v_p) + TINY[param_dtype] + flushed
    k = SAFETY * factor
    return _per_channel(k * dx_bound, x.ndim, axis), k * dgamma_bound, k * dbeta_bound


def rounding_spread(expected, reference) -> float:
    """A whole network after several training steps: the reference's own rounding spread.

    The bounds above cover one batch-norm call. Through a network and its optimizer steps each
    layer's rounding is amplified by every later layer and step, and no first-order bound is
    tight enough to be useful. So a model-level comparison measures how far the reference
    implementation is from *itself* when evaluated in another, equally correct order (the
    built-in model again in channels_last memory format: other kernels, other summation
    orders): ``max |a - b| / max |a|`` over every floating array compared (dicts of name ->
    float64 array). It must be nonzero, or the comparison would demand bit-identical results.
    """
    levels = []
    for key, a in expected.items():
        a, b = np.asarray(a, np.float64), np.asarray(reference[key], np.float64)
        scale = np.abs(a).max() if a.size else 0.0
        levels.append(float(np.abs(a - b).max() / scale) if scale else 0.0)
    level = max(levels, default=0.0)
    if not level > 0:
        raise ValueError("the reference run rounds exactly like the first: no spread to scale by")
    return level


def model_tolerance(expected, spread: float, dtype: str, factor: float = 1.0) -> float:
    """The bound for one array of a model-level comparison: :data:`SAFETY` times the
    reference's own spread (:func:`rounding_spread`) at this array's scale, plus TINY."""
    scale = float(np.abs(np.asarray(expected, np.float64)).max()) if np.size(expected) else 0.0
    return SAFETY * factor * (spread * scale + TINY[dtype])


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing one result with its reference under a tolerance."""

    what: str
    max_error: float
    tolerance: float  # the tolerance where error / tolerance is largest
    ratio: float  # max over elements of error / tolerance; <= 1 passes
    detail: str = ""
    error: float | None = None  # |error| where error / tolerance is largest (None: max_error)

    @property
    def deciding_error(self) -> float:
        """|error| of the element that decides the comparison (pairs with ``tolerance``)."""
        return self.max_error if self.error is None else self.error

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0

    def __str__(self) -> str:
        if not self.passed and self.tolerance == 0 and not np.isfinite(self.ratio):
            # Not a numerical difference (a missing value, a shape, a dtype, an exception):
            # the detail says what, and "error inf, tolerance 0" would only hide it.
            return f"{self.what}: {self.detail.strip()} [FAIL]"
        verdict = "ok" if self.passed else "FAIL"
        # The deciding element's error, tolerance and ratio belong together; the largest
        # error anywhere may sit where the tolerance is wider, so it is reported apart.
        text = (f"{self.what}: |error| {self.deciding_error:.3g} where the tolerance is "
                f"{self.tolerance:.3g} (error/tolerance {self.ratio:.3g}); largest |error| "
                f"anywhere {self.max_error:.3g} [{verdict}]")
        return f"{text}\n{self.detail}" if self.detail and not self.passed else text


def compare(actual, expected, tolerance, what: str) -> Comparison:
    """Compare element-wise: ``|actual - expected| <= tolerance`` (NaN/inf must match exactly)."""
    if actual is None or expected is None:
        same = actual is None and expected is None
        detail = ("got None where a value was expected" if actual is None
                  else f"got an array of shape {np.shape(actual)} where None was expected")
        return Comparison(what, 0.0 if same else np.inf, 0.0, 0.0 if same else np.inf,
                          "" if same else detail)
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        hint = ": is the channel axis right?" if a.ndim == e.ndim else ""
        return Comparison(what, np.inf, 0.0, np.inf,
                          f"got shape {a.shape}, expected {e.shape}{hint}")
    tol = np.broadcast_to(np.asarray(tolerance, np.float64), e.shape)
    both_nonfinite_equal = ~np.isfinite(e) & (a == e) | (np.isnan(e) & np.isnan(a))
    error = np.where(both_nonfinite_equal, 0.0, np.abs(a - e))
    error = np.where(np.isnan(error), np.inf, error)
    if error.size == 0:
        return Comparison(what, 0.0, 0.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0, 0.0, error / tol)
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    detail = (f"  worst at index {tuple(int(i) for i in worst)}: got {a[worst]!r}, "
              f"expected {e[worst]!r}")
    return Comparison(what, float(error.max()), float(tol[worst]), float(ratio[worst]), detail,
                      error=float(error[worst]))


def assert_close(actual, expected, tolerance, what: str) -> Comparison:
    """:func:`compare`, raising ``AssertionError`` with the details when it fails."""
    result = compare(actual, expected, tolerance, what)
    if not result.passed:
        raise AssertionError(str(result))
    return result
