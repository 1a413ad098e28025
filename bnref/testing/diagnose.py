"""Why a batch norm disagrees with its convention: the classic mistakes, tested as hypotheses.

Probes. Five deterministic calls, inside what the backend declares: a batch whose axes 1 and -1
both hold the 3 channels (rank 3 when declared), with channel variances 1e-6, 1e-2 and 1 (so
eps, its placement and the unbiased factor all show) and running statistics far from the
batch's, in training and in inference, with eps, momentum and axis omitted and then passed
(eps 0.0625, momentum 0.25: exact in float32), in float64; and a float32 training batch at
offsets 1e4..3e4 with spreads 10..30, where E[x²]−E[x]² in float32 is off by tens of times the
two-pass tolerance (and rarely negative). A probe the backend refuses is recorded and left out.

Hypotheses. A :class:`Hypothesis` is a float64 model of batch norm with nine parameters,
written as a base convention plus the parameters it changes (the mistakes of
:data:`MISTAKES`). It predicts each probe's y, running mean and running variance, and fits when
every one is within ``K`` times a first-order rounding bound (:mod:`bnref.testing.tolerances`'
with the actual largest ``|x - mean| / sigma``, room for eps and momentum held in float32, and
under one-pass variance any variance within ``4 u sqrt(n) max|x|²`` of the true one). Up to
three mistakes on each of the five conventions are enumerated (~1300 distinct hypotheses;
predictions are cached per probe on the parameters they depend on). The answer is the fitting
hypothesis with the fewest differences from the declared convention, another base convention
counting as one; ties prefer the declared convention, then the smaller error. Mistakes no probe
can show (under a declared fixed eps, momentum or channel axis) are not tested, and ``details``
says so. Imports numpy only.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from bnref.conventions import CONVENTIONS, DEFAULT, Convention
from bnref.testing.backends import Backend, LayerConfig
from bnref.testing.tolerances import TINY, UNIT_ROUNDOFF, compute_dtype_name

__all__ = ["MISTAKES", "Diagnosis", "Hypothesis", "diagnose"]

# Mistake id -> the Hypothesis field it changes.
MISTAKES = {"momentum-other-term": "weights", "momentum-default": "momentum",
            "running-var-bias": "unbiased", "eps-default": "eps",
            "eps-outside-sqrt": "outside", "one-pass-variance": "one_pass",
            "channel-axis": "axis", "eval-moves-stats": "eval_moves",
            "eval-uses-batch-stats": "eval_batch"}
_IDS = {name: mistake for mistake, name in MISTAKES.items()}
EPS_VALUES = (1e-5, 1e-3, 1e-4, 1e-2, 1e-1, 1e-6, 1e-8)
MOMENTUM_VALUES = (0.1, 0.99, 0.9, 0.01, 0.001)
EPS_PASSED, MOMENTUM_PASSED = 0.0625, 0.25
K = 8.0  # the tolerance's multiple of the first-order rounding bound
_U32 = UNIT_ROUNDOFF["float32"]
_OUTPUTS = ("y in training", "y in inference", "running mean", "running var")


@dataclass(frozen=True)
class Hypothesis:
    """How an implementation might compute batch norm (fields in :data:`MISTAKES` order)."""

    weights: str  # "new": (1-m)*old + m*batch; "old": m*old + (1-m)*batch
    momentum: float  # when not passed
    unbiased: bool  # the running variance is fed n/(n-1) * var
    eps: float  # when not passed
    outside: bool = False  # sqrt(var) + eps instead of sqrt(var + eps)
    one_pass: bool = False  # var = E[x²]−E[x]² in the compute dtype
    axis: int = 1  # the channel axis when not passed
    eval_moves: bool = False  # inference moves the running statistics
    eval_batch: bool = False  # inference normalises with the batch's statistics

    @classmethod
    def of(cls, conv: Convention) -> Hypothesis:
        return cls(conv.momentum_weights, conv.default_momentum, conv.unbiased_running_var,
                   conv.default_eps, axis=conv.default_axis)

    def mistakes(self, base: Hypothesis) -> tuple[str, ...]:
        return tuple(_IDS[f.name] for f in fields(self)
                     if getattr(self, f.name) != getattr(base, f.name))


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found; ``str()`` is ``text``."""

    convention: str  # the declared convention it was checked against
    fits: bool  # some hypothesis explains every probe
    conforms: bool  # the declared convention itself fits
    findings: tuple[str, ...]  # the fitting hypothesis' mistakes ("other-convention" first)
    text: str  # one readable paragraph
    details: dict[str, Any] = field(default_factory=dict, compare=False)
    behaves_like: str = ""  # the convention the fitting hypothesis builds on ("": none fits)

    def __str__(self) -> str:
        return self.text


@dataclass
class _Probe:
    name: str
    arrays: tuple[np.ndarray, ...]  # x, gamma, beta, running_mean, running_var
    training: bool
    eps: float | None  # None: not passed
    momentum: Any  # DEFAULT: not passed
    axis: int | None  # None: not passed
    observed: tuple | None = None
    cache: dict = field(default_factory=dict)

    def moments(self, axis: int):
        """x in float64 with channels last; per-channel mean, biased var, count, max |x|."""
        if ("m", axis) not in self.cache:
            xm = np.moveaxis(self.arrays[0].astype(np.float64), axis, -1)
            flat = xm.reshape(-1, xm.shape[-1])
            self.cache["m", axis] = (xm, flat.mean(0), flat.var(0), flat.shape[0],
                                     np.abs(flat).max(0))
        return self.cache["m", axis]


def _ratio(observed, predicted, tolerance) -> tuple[float, float]:
    """(max |error| / tolerance, max |error|); NaN or a wrong shape is an infinite error."""
    if observed is None or np.shape(observed) != predicted.shape:
        return np.inf, np.inf
    error = np.abs(np.asarray(observed, np.float64) - predicted)
    error = np.where(np.isnan(error), np.inf, error)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((error == 0) | np.isinf(tolerance), 0.0, error / tolerance)
    return float(ratio.max(initial=0.0)), float(error.max(initial=0.0))


def _sigma(var, eps, outside):
    var = np.maximum(var, 0.0)
    return np.sqrt(var) + eps if outside else np.sqrt(var + eps)


def _check_y(p: _Probe, eps, outside, one_pass, axis, batch) -> tuple[float, float]:
    gamma, beta, rm, rv = (a.astype(np.float64) for a in p.arrays[1:])
    xm, mean, var, n, big = p.moments(axis)
    m, v = (mean, var) if batch else (rm, rv)
    sigma = _sigma(v, eps, outside)
    centred = xm - m
    dtype = p.arrays[0].dtype.name
    u, w = UNIT_ROUNDOFF[compute_dtype_name(dtype)], UNIT_ROUNDOFF[dtype]
    x_max = np.abs(centred).reshape(-1, centred.shape[-1]).max(0) / sigma
    kappa = (big + (0 if batch else np.abs(m))) / sigma
    g, ag = (np.sqrt(n) if batch else 1.0), np.abs(gamma)
    eps_share = eps / (sigma if outside else sigma**2)  # eps may be held in float32
    tol = K * (ag * u * g * (1 + kappa) * (1 + x_max) + (u + w) * (ag * x_max + np.abs(beta))
               + _U32 * ag * x_max * eps_share) + TINY[dtype]
    if one_pass:  # any variance in the cancellation band: y scales with 1 / sigma
        band = 4 * u * g * big**2
        low, high = _sigma(v - band, eps, outside), _sigma(v + band, eps, outside)
        with np.errstate(divide="ignore"):
            tol = tol + np.where(low > 0, ag * x_max * sigma * (1 / low - 1 / high), np.inf)
    observed = p.observed[0]
    if np.shape(observed) != p.arrays[0].shape:
        return np.inf, np.inf
    return _ratio(np.moveaxis(observed, axis, -1), gamma * centred / sigma + beta, tol)


def _check_stats(p: _Probe, weight=None, unbiased=False, one_pass=False, axis=0):
    """Running statistics moved with ``weight`` on the batch's, or unchanged (None)."""
    rm, rv = p.arrays[3].astype(np.float64), p.arrays[4].astype(np.float64)
    v, tiny = UNIT_ROUNDOFF[p.arrays[3].dtype.name], TINY[p.arrays[3].dtype.name]
    if weight is None:  # up to a rounding to the statistics' dtype
        return (_ratio(p.observed[1], rm, K * v * np.abs(rm) + tiny),
                _ratio(p.observed[2], rv, K * v * np.abs(rv) + tiny))
    _, mean, var, n, big = p.moments(axis)
    u, g, b = UNIT_ROUNDOFF[compute_dtype_name(p.arrays[0].dtype.name)], np.sqrt(n), weight
    factor = n / (n - 1) if unbiased else 1.0
    feed = var * factor
    mean_tol = K * (b * u * g * big + v * (np.abs(rm) + b * np.abs(mean))
                    + _U32 * np.abs(mean - rm)) + tiny
    var_tol = K * (2 * b * u * g * (feed + big * np.sqrt(var)) + v * (np.abs(rv) + b * feed)
                   + _U32 * np.abs(feed - rv)) + tiny
    if one_pass:
        var_tol = var_tol + b * factor * 4 * u * g * big**2
    return (_ratio(p.observed[1], (1 - b) * rm + b * mean, mean_tol),
            _ratio(p.observed[2], (1 - b) * rv + b * feed, var_tol))


def _errors(p: _Probe, h: Hypothesis) -> dict[str, tuple[float, float]]:
    """Per output of probe ``p``: (error / tolerance, |error|) under hypothesis ``h``."""
    momentum = h.momentum if p.momentum is DEFAULT else p.momentum
    axis = (h.axis if p.axis is None else p.axis) % p.arrays[0].ndim
    batch, moves = p.training or h.eval_batch, p.training or h.eval_moves
    y_key = ("y", h.eps if p.eps is None else p.eps, h.outside, h.one_pass and batch, axis,
             batch)
    s_key = ("s", momentum if h.weights == "new" else 1.0 - momentum, h.unbiased, h.one_pass,
             axis) if moves else ("s",)
    for key, check in ((y_key, _check_y), (s_key, _check_stats)):
        if key not in p.cache:
            p.cache[key] = check(p, *key[1:])
    kind = "y in training" if p.training else "y in inference"
    return dict(zip((kind, "running mean", "running var"), (p.cache[y_key], *p.cache[s_key]),
                    strict=True))


def _batch(shape, axis, dtype, offset, spread, running) -> tuple[np.ndarray, ...]:
    """x (offset + spread * N(0, 1) per channel), gamma, beta and the running statistics."""
    per = [3 if d == axis else 1 for d in range(len(shape))]
    x = np.reshape(offset, per) + np.reshape(spread, per) * np.random.default_rng(7).normal(
        size=shape)
    arrays = [x, [1.5, -0.75, 1.25], [0.25, -0.5, 0.125], *running]
    if dtype == "bfloat16":  # a backend that declares bfloat16 alone
        import ml_dtypes

        return (np.asarray(x, np.float32).astype(ml_dtypes.bfloat16),
                *(np.asarray(a, np.float32) for a in arrays[1:]))
    pdtype = "float64" if dtype == "float64" else "float32"
    return (np.asarray(x, dtype), *(np.asarray(a, pdtype) for a in arrays[1:]))


def _design(backend: Backend, conv: Convention) -> tuple[list[_Probe], dict[str, str]]:
    """The probes, inside the backend's declarations, and the mistakes they cannot show."""
    skipped: dict[str, str] = {}
    rank = next(r for r in (3, 4, 5, 2) if backend.ranks[0] <= r <= backend.ranks[1])
    fixed = backend.channel_axis
    axis = (conv.default_axis if fixed is None else fixed) % rank
    shape = {2: [8, 3], 3: [6, 3, 3], 4: [4, 3, 2, 3], 5: [2, 3, 2, 2, 3]}[rank]
    shape[axis] = 3
    # With a declared axis (conv's default here) the implementation takes no axis argument:
    # every probe omits it, and "its channels are elsewhere" stays testable.
    omitted_axis, passed_axis = None, (axis if fixed is None else None)
    if rank == 2:
        skipped["channel-axis"] = "only rank 2 is declared, where axes 1 and -1 coincide"
    eps, mom = (None, EPS_PASSED), (DEFAULT, MOMENTUM_PASSED)
    if backend.fixed_eps is not None:
        eps, skipped["eps-default"] = (backend.fixed_eps,) * 2, "fixed_eps is declared"
    if backend.fixed_momentum is not None:
        mom = (backend.fixed_momentum,) * 2
        skipped["momentum-default"] = "fixed_momentum is declared"
        if backend.fixed_momentum == 0.5:
            skipped["momentum-other-term"] = "fixed_momentum=0.5 weighs old and new alike"
    dtype = next(d for d in ("float64", "float32", "float16", "bfloat16") if d in backend.dtypes)
    spread = np.array([1e-3, 0.1, 1.0])
    offset = 2 * spread * [1, -1, 0.5]
    main = _batch(shape, axis, dtype, offset, spread,
                  (offset + spread * [-3, 2, 1.5], spread**2 * [4, 0.25, 9]))
    passed = f"eps={eps[1]:g}, momentum={mom[1]:g}" + (
        "" if passed_axis is None else f", axis={axis}")
    probes = [_Probe(f"{mode}, {dtype}, {what}", main, mode == "training", e, m, a)
              for mode in ("training", "inference")
              for what, e, m, a in (("defaults", eps[0], mom[0], omitted_axis),
                                    (passed, eps[1], mom[1], passed_axis))]
    if "float32" in backend.dtypes:
        offset, spread = np.array([1e4, -2e4, 3e4]), np.array([30.0, 10.0, 20.0])
        far = _batch(shape, axis, "float32", offset, spread, (offset + 50, spread**2 * 4))
        probes.append(_Probe(f"training, float32 at offsets 1e4, {passed}", far, True, eps[1],
                             mom[1], passed_axis))
    else:
        skipped["one-pass-variance"] = "float32 is not declared (it shows at offset 1e4 there)"
    return probes, skipped


def _run(backend: Backend, p: _Probe, convention: str, layer: bool):
    x, gamma, beta, rm, rv = (np.array(a, copy=True) for a in p.arrays)
    if not layer:
        kwargs = {} if p.momentum is DEFAULT else {"momentum": p.momentum}
        return backend.run_batch_norm(x, gamma, beta, rm, rv, training=p.training, eps=p.eps,
                                      axis=p.axis, convention=convention, **kwargs)
    handle = backend.make_layer(LayerConfig(3, convention, p.momentum, p.eps, axis=p.axis,
                                            param_dtype=rm.dtype.name))
    handle.load_state({"gamma": gamma, "beta": beta, "running_mean": rm, "running_var": rv})
    y = handle.forward(x, p.training)
    state = handle.state()
    return y, state.get("running_mean"), state.get("running_var")


def _observe(backend: Backend, probes: list[_Probe], convention: str) -> tuple[bool, dict]:
    """Run the probes: functionally, or through fresh layers when the first probe finds no
    ``batch_norm`` but a ``make_layer``. Returns (layer mode, refused probe -> exception)."""
    layer, refused = False, {}
    for index, p in enumerate(probes):
        for attempt in range(2):
            try:
                p.observed = _run(backend, p, convention, layer)
            except NotImplementedError as exc:
                if index == attempt == 0 and "make_layer" in backend.capabilities:
                    layer = True
                    continue
                refused[p.name] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # an implementation may refuse a probe
                refused[p.name] = f"{type(exc).__name__}: {exc}"
            break
    return layer, refused


def _hypotheses(declared: str, skipped,
                records: Mapping[str, Convention]) -> dict[Hypothesis, tuple[tuple, str]]:
    """Each base convention with up to 3 mistakes -> (rank, base) of its best explanation."""
    free = [f.name for f in fields(Hypothesis) if _IDS[f.name] not in skipped]
    order = [declared, *(name for name in records if name != declared)]
    known = records.values()
    values = {"momentum": dict.fromkeys((*(c.default_momentum for c in known), *MOMENTUM_VALUES)),
              "eps": dict.fromkeys((*(c.default_eps for c in known), *EPS_VALUES))}
    best: dict[Hypothesis, tuple[tuple, str]] = {}
    for index, name in enumerate(order):
        base = Hypothesis.of(records[name])
        other = {"weights": ("old" if base.weights == "new" else "new",), "axis": (-base.axis,),
                 **values}
        for count in range(4):
            for names in itertools.combinations(free, count):
                choices = [[v for v in other.get(n, (not getattr(base, n),))
                            if v != getattr(base, n)] for n in names]
                for changes in itertools.product(*choices):
                    h = replace(base, **dict(zip(names, changes, strict=True)))
                    rank = (count + (index > 0), index > 0, index)
                    if h not in best or rank < best[h][0]:
                        best[h] = (rank, name)
    return best


_PHRASES = {
    "momentum-other-term": lambda b, h: "its momentum weights the old value (m*old + "
    "(1-m)*batch, as Keras/Flax/MXNet write it)" if h.weights == "old" else "its momentum "
    "weights the new batch ((1-m)*old + m*batch, as PyTorch writes it)",
    "momentum-default": lambda b, h: f"its momentum is {h.momentum:g} instead of "
    f"{b.momentum:g} when not passed",
    "running-var-bias": lambda b, h: "its running variance is unbiased (fed n/(n-1) * var)"
    if h.unbiased else "its running variance is biased (fed var, not n/(n-1) * var)",
    "eps-default": lambda b, h: f"its eps is {h.eps:g} instead of {b.eps:g} when not passed",
    "eps-outside-sqrt": lambda b, h: "it adds eps outside the square root (sqrt(var) + eps, "
    "not sqrt(var + eps))",
    "one-pass-variance": lambda b, h: "it computes the variance in one pass, E[x²]−E[x]², "
    "which cancels catastrophically when |mean| >> std (as Flax's use_fast_variance=True does)",
    "channel-axis": lambda b, h: f"its channels are on axis {h.axis} instead of {b.axis} when "
    "axis is not passed",
    "eval-moves-stats": lambda b, h: "it moves the running statistics in inference too (they "
    "must come back unchanged)",
    "eval-uses-batch-stats": lambda b, h: "it normalises with the batch's statistics in "
    "inference instead of the running ones",
}


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _explain(h: Hypothesis, name: str, declared: str, skipped,
             records: Mapping[str, Convention]) -> str:
    """The hypothesis in words: "convention torch (eps ...)", "convention torch except that
    ...", or "convention keras (eps ...) rather than the declared torch[, except that ...]"."""
    base = Hypothesis.of(records[name])
    mistakes = [_PHRASES[m](base, h) for m in h.mistakes(base)]
    if name == declared and mistakes:
        return f"convention {name} except that {_join(mistakes)}"
    parts = [f"eps {base.eps:g}"] if "eps-default" not in skipped else []
    if "momentum-default" not in skipped:
        parts.append(f"momentum {base.momentum:g} weighting the "
                     f"{'new batch' if base.weights == 'new' else 'old value'}")
    parts.append(f"{'unbiased' if base.unbiased else 'biased'} running variance")
    if "channel-axis" not in skipped:
        parts.append(f"channels on axis {base.axis}")
    text = f"convention {name} ({', '.join(parts)})"
    if name != declared:
        same = [n for n in records if n != name and Hypothesis.of(records[n]) == base]
        text = text[:-1] + (f"; {_join(same)} has the same defaults)" if same else ")")
        text += f" rather than the declared {declared}"
    return f"{text}, except that {_join(mistakes)}" if mistakes else text


def diagnose(backend: Backend, convention: str | None = None) -> Diagnosis:
    """Which hypothesis explains ``backend``'s batch norm under ``convention`` (by default the
    first it declares)? See the module docstring for the method."""
    start = time.perf_counter()
    declared = backend.conventions[0] if convention is None else convention
    if declared not in CONVENTIONS or declared not in backend.conventions:
        raise ValueError(f"convention {declared!r} is not one the backend declares "
                         f"({tuple(backend.conventions)}) among {tuple(CONVENTIONS)}")
    # A declared channel axis is where the channels are when none is passed, whatever the
    # convention's default: every base hypothesis starts from it.
    fixed = backend.channel_axis
    records = {name: conv if fixed is None else replace(conv, default_axis=fixed)
               for name, conv in CONVENTIONS.items()}
    probes, skipped = _design(backend, records[declared])
    layer, refused = _observe(backend, probes, declared)
    kept = [p for p in probes if p.observed is not None]
    who = f"backend {backend.name!r}"
    notes = "".join(f" Not tested: {m} ({why})." for m, why in skipped.items()) + "".join(
        f" Refused probe '{name}' (left out): {why}." for name, why in refused.items())
    details: dict[str, Any] = {"not_tested": skipped, "refused": refused,
                               "mode": "layer" if layer else "functional",
                               "probes": [p.name for p in probes]}
    if not kept:
        details["seconds"] = time.perf_counter() - start
        return Diagnosis(declared, False, False, (), f"{who} refused every probe.{notes}", details)

    def table(h: Hypothesis) -> dict[str, dict[str, dict[str, float]]]:
        return {p.name: {key: {"ratio": r, "error": e} for key, (r, e) in _errors(p, h).items()}
                for p in kept}

    scored = [(rank, max(r for p in kept for r, _ in _errors(p, h).values()), base, h)
              for h, (rank, base) in _hypotheses(declared, skipped, records).items()]
    fitting = [s for s in scored if s[1] <= 1.0]
    rank, error, base, h = (min(fitting, key=lambda s: (s[0][:2], s[1], s[0][2])) if fitting
                            else min(scored, key=lambda s: (s[1], s[0])))
    findings = (("other-convention",) if base != declared else ()) + h.mistakes(
        Hypothesis.of(records[base]))
    declared_errors = table(Hypothesis.of(records[declared]))
    details.update(hypothesis=asdict(h), findings=findings, worst_ratio=error, errors=table(h),
                   declared_errors=declared_errors, hypotheses=len(scored),
                   alternatives=[_explain(s[3], s[2], declared, skipped, records) for s in fitting
                                 if s[0][0] == rank[0] and s[3] != h])
    if fitting:
        verb = "conforms to" if rank[0] == 0 else "behaves like"
        text = f"{who} {verb} {_explain(h, base, declared, skipped, records)}."
    else:
        worst: dict[str, dict[str, float]] = {}
        for errors in declared_errors.values():
            for key, e in errors.items():
                worst[key] = max(worst.get(key, e), e, key=lambda item: item["ratio"])
        keys = [key for key in _OUTPUTS if key in worst]
        off = [f"{key} is off by up to {worst[key]['error']:.3g} ({worst[key]['ratio']:.3g} "
               "times its tolerance)" for key in keys if worst[key]["ratio"] > 1]
        agree = [key for key in keys if worst[key]["ratio"] <= 1]
        text = (f"No hypothesis explains {who}: against convention {declared}, {_join(off)}"
                f"{f' ({_join(agree)} agree)' if agree else ''}. The closest hypothesis is "
                f"{_explain(h, base, declared, skipped, records)}, off by {error:.3g} times its "
                "tolerance.")
        details["closest"], findings, base = findings, (), ""
    details["seconds"] = time.perf_counter() - start
    return Diagnosis(declared, bool(fitting), bool(fitting) and rank[0] == 0, findings,
                     text + notes, details, base)
