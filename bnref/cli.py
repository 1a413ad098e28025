"""The ``bnref`` command.

``bnref check`` runs the conformance matrix -- every installed backend against the float64
oracle (forward, gradients, layer trajectories), against its framework's own implementations,
through every bad input of the contract, and every pair of backends against each other
(rows ``torch~jax``: the same cases through both) -- on a fixed set of cases drawn deterministically
from the shared Hypothesis strategies, and prints one row per (backend, check, dtype): the
element that decides it (largest error/tolerance) with its |error|, its tolerance and their
ratio, then the largest |error| of any element (a separate figure: it may sit where the
tolerance is wide), and PASS/FAIL. Exit status 1 on any FAIL.

``bnref conventions`` prints what each framework means by momentum, eps and the channel axis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bnref.conventions import ALL_CONVENTIONS

DEFAULT_EXAMPLES = 20


@dataclass
class Row:
    """One row of the matrix. ``error``, ``tolerance`` and ``ratio`` all belong to the element
    that decides the row (the largest error/tolerance over its cases); ``max_error`` is the
    largest |error| of any element, which may be elsewhere, under a wider tolerance."""

    backend: str
    check: str
    dtype: str
    cases: int = 0
    error: float = 0.0
    tolerance: float = 0.0
    ratio: float = 0.0
    max_error: float = 0.0
    detail: str = ""
    skipped: str = ""  # why the row did not run (a capability the adapter does not declare)
    first_failure: int | None = None  # 1-based index of the first failing case

    @property
    def passed(self) -> bool:
        return bool(self.skipped) or (self.cases > 0 and self.ratio <= 1.0)

    @property
    def verdict(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.passed else "FAIL"

    def add(self, comparisons: Iterable[Any]) -> None:
        self.cases += 1
        comparisons = list(comparisons)
        if self.first_failure is None and not all(r.passed for r in comparisons):
            self.first_failure = self.cases
        for result in comparisons:
            self.max_error = max(self.max_error, result.max_error)
            if result.ratio > self.ratio or (not result.passed and not self.detail):
                self.ratio, self.tolerance = result.ratio, result.tolerance
                self.error = result.deciding_error
                if not result.passed:
                    self.detail = str(result)

    def crashed(self, error: Exception) -> None:
        """A case that raised: a failure of the row, with no element to show."""
        self.cases += 1
        if self.first_failure is None:
            self.first_failure = self.cases
        self.ratio, self.error, self.tolerance = float("inf"), float("inf"), 0.0
        self.detail = f"{type(error).__name__}: {error}"

    def as_dict(self) -> dict[str, Any]:
        # "tolerance" and "ratio" were already the deciding element's; "deciding_tolerance"
        # repeats the former beside "deciding_error" so the pair reads as one element's.
        return {"backend": self.backend, "check": self.check, "dtype": self.dtype,
                "cases": self.cases, "deciding_error": self.error,
                "deciding_tolerance": self.tolerance, "ratio": self.ratio,
                "max_error": self.max_error, "tolerance": self.tolerance,
                "passed": self.passed, "skipped": self.skipped,
                "first_failure": self.first_failure, "detail": self.detail}


class Progress:
    """A one-line progress bar on stderr, shown only on a terminal once a second has passed."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled or time.monotonic() - self.start < 1.0:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} {label:<40.40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and time.monotonic() - self.start >= 1.0:
            sys.stderr.write("\r" + " " * 80 + "\r")


# Drawn cases by (strategy repr, count). Derandomized draws depend only on the strategy, whose
# repr Hypothesis builds from every argument; many rows share one (each backend's forward rows,
# the pairs), and drawing took ~40% of a worker's time before this.
_DRAWN: dict[tuple[str, int], list[Any]] = {}


def draw_examples(strategy, count: int) -> list[Any]:
    """``count`` values of a strategy, the same ones on every run (derandomized Hypothesis).
    Each call gets its own copy: a backend that mutated a case must not reach other rows."""
    import copy

    key = (repr(strategy), count)
    if key not in _DRAWN:
        _DRAWN[key] = _draw(strategy, count)
    return copy.deepcopy(_DRAWN[key])


def _draw(strategy, count: int) -> list[Any]:
    from hypothesis import HealthCheck, Phase, given, settings

    drawn: list[Any] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn[:count]


@dataclass(frozen=True)
class Task:
    """One row of the matrix: how to draw its cases and how to check one."""

    check: str
    dtype: str
    cases: Callable[[], list[Any]]
    run: Callable[[Any], list[Any]]
    skipped: str = ""  # non-empty: the row is reported as skipped, with this reason


def _skip(check: str, dtype: str, reason: str) -> Task:
    return Task(check, dtype, list, lambda case: [], skipped=reason)


def _case_count(examples: int, *backends) -> int:
    """Cases per row: ``examples``, or a quarter of it (at least 5) when a backend compiles
    per shape (it declares a shape pool, which its cases are drawn from). Each of JAX's cases
    is a new compile (~0.1 s forward, ~0.15 s gradient here), and those compiles were most of
    the check's time; its property tests run 40 examples per property instead."""
    if any(b.shape_pool for b in backends):
        return min(examples, max(5, examples // 4))
    return examples


def _tasks(name: str, backend, examples: int, dtypes: Sequence[str] | None,
           registered: bool = True) -> list[Task]:
    """Every row of one backend, drawn inside what its adapter declares; a capability it does
    not have (gradients, a layer) or a case it cannot take is a skipped row with the reason."""
    from bnref.testing import checks, strategies
    from bnref.testing.backends import KNOWN_BACKENDS
    from bnref.testing.strategies import Unsupported, with_directions, with_dy

    def wanted(dtype: str) -> bool:
        return dtypes is None or dtype in dtypes

    # A third party's JAX code runs op by op (each op compiled once per pooled shape), not as
    # one compile per case like bnref's jitted backend: it gets every case.
    count = _case_count(examples, backend) if registered else examples
    capabilities = backend.capabilities

    def row(check: str, dtype: str, needs: str | None, strategy, run) -> Task:
        if needs is not None and needs not in capabilities:
            return _skip(check, dtype, f"the adapter has no {needs}")
        try:
            drawn = strategy()
        except Unsupported as reason:
            return _skip(check, dtype, str(reason))
        return Task(check, dtype, lambda: draw_examples(drawn, count), run)

    def bn_cases(**restrictions):
        return lambda: strategies.cases_for(backend, **restrictions)

    def drawn(strategy):
        return lambda: draw_examples(strategy, count)

    tasks: list[Task] = []
    for dtype in filter(wanted, backend.dtypes):
        if registered and name == "numpy" and dtype == "float64":
            continue  # the oracle itself: compared with itself it proves nothing
        one = (dtype,)
        tasks += [
            row("forward", dtype, None, bn_cases(dtypes=one),
                lambda case: checks.check_forward(backend, case)),
            row("gradients", dtype, "gradients",
                lambda one=one: with_dy(strategies.cases_for(backend, dtypes=one,
                                                             training=True)),
                lambda pair: checks.check_gradients(backend, *pair)),
            row("layer", dtype, "make_layer",
                lambda one=one: strategies.layer_cases_for(backend, dtypes=one),
                lambda case: checks.check_layer(backend, case)),
        ]
    if wanted("float64") and "float64" in backend.dtypes:
        tasks.append(row(
            "finite differences", "float64", "gradients",
            lambda: with_directions(strategies.cases_for(backend, dtypes=("float64",),
                                                         training=True)),
            lambda triple: checks.check_finite_differences(backend, *triple)))

    info = KNOWN_BACKENDS.get(name) if registered else None
    pool = {"shapes": backend.shape_pool}
    # (label, names, built-in getter, strategy from its restrictions, check)
    kinds = [
        ("vs", info.builtins if info else (), backend.builtin,
         lambda r: strategies.bn_cases(**{**pool, **r}),
         lambda b: lambda case: checks.check_builtin(backend, b, case)),
        ("gradients vs", info.gradient_builtins if info else (), backend.builtin,
         lambda r: with_dy(strategies.bn_cases(**{**pool, **r, "training": True})),
         lambda b: lambda pair: checks.check_builtin_gradients(backend, b, *pair)),
        ("layer vs", info.layer_builtins if info else (), backend.layer_builtin,
         lambda r: strategies.layer_cases(**{**pool, **r}),
         lambda b: lambda case: checks.check_layer(backend, case, reference=b)),
    ]
    for label, names, get, strategy, check in kinds:
        for builtin_name in names:
            builtin = get(builtin_name)
            for dtype in filter(wanted, builtin.cases.get("dtypes", ("float32",))):
                restrictions = {**builtin.cases, "dtypes": (dtype,)}
                tasks.append(Task(f"{label} {builtin_name}", dtype,
                                  drawn(strategy(restrictions)), check(builtin)))
    if registered and name in SYNC_RUNNERS and wanted("float32"):
        # A handful of cases: the row shows the engine synchronizes; the property tests
        # (tests/test_*_sync.py) run the volume.
        tasks.append(_sync_task(name, backend, min(count, SYNC_CASES)))
    mistakes = [m for m in checks.MISTAKES if m.applies_to(backend) is None]
    tasks.append(Task("bad input", "-", lambda: mistakes,
                      lambda mistake: checks.check_mistake(backend, mistake)))
    if backend.exact_errors and "make_layer" in capabilities:
        tasks.append(Task("bad layer arguments", "-", lambda: list(checks.LAYER_MISTAKES),
                          lambda mistake: checks.check_layer_mistake(backend, mistake)))
    return tasks


SYNC_CASES = 5
# Each backend's synchronized run: "module:function" taking a list of SyncCases (k = 2) and
# returning one Synced per case from a real multi-process or multi-device unit; and whether
# its engine needs equal shards.
SYNC_RUNNERS = {
    "torch": ("bnref.testing._sync_torch:run_torch_sync", False),
    "jax": ("bnref.testing._sync_jax:run_jax_sync", True),
    "tf": ("bnref.testing._sync_tf:run_tf_sync", False),
    "mxnet": ("bnref.testing._sync_mxnet:run_mxnet_sync", False),
}


def _sync_task(name: str, backend, count: int) -> Task:
    """The row "sync k=2 == full batch": every case through one real 2-worker unit (gloo
    ranks, host devices), then the shared property per case (forward, gradients, running
    statistics)."""
    import importlib

    from bnref.testing import sync
    from bnref.testing.strategies import SHAPE_POOL

    path, even = SYNC_RUNNERS[name]
    module, function = path.split(":")
    shapes = {"shapes": backend.shape_pool or SHAPE_POOL}
    strategy = sync.sync_cases(ks=(2,), dtypes=("float32",), even=even, **shapes).filter(
        lambda sc: sc.k == 2)
    results: dict[int, Any] = {}

    def run(indexed: tuple[int, Any]) -> list[Any]:
        index, sc = indexed
        if not results:  # the first case runs them all: one unit, started once
            cases = [case for _, case in drawn()]
            outputs = getattr(importlib.import_module(module), function)(cases)
            results.update(enumerate(outputs))
        return sync.forward_comparisons(sc, results[index]) + sync.backward_comparisons(
            sc, results[index])

    def drawn() -> list[tuple[int, Any]]:
        return list(enumerate(draw_examples(strategy, count)))

    return Task("sync k=2 == full batch", "float32", drawn, run)


def _pair_tasks(a, b, examples: int, dtypes: Sequence[str] | None) -> list[Task]:
    """Rows comparing two backends with each other on the same drawn cases."""
    from bnref.testing import checks, pairwise, strategies

    count = _case_count(examples, a, b)
    shared = pairwise.shared_cases(a, b)
    tasks = []
    for dtype in shared["dtypes"]:
        if dtypes is not None and dtype not in dtypes:
            continue
        restrict = {**shared, "dtypes": (dtype,)}

        def drawn(strategy):
            return lambda: draw_examples(strategy, count)

        tasks += [
            Task("pair forward", dtype, drawn(strategies.bn_cases(**restrict)),
                 lambda case: checks.check_builtin(a, pairwise.as_builtin(b), case, "pair")),
            Task("pair gradients", dtype,
                 drawn(strategies.with_dy(strategies.bn_cases(**restrict, training=True))),
                 lambda pair: checks.check_builtin_gradients(a, pairwise.as_builtin(b), *pair,
                                                             "pair gradients")),
            Task("pair layer", dtype, drawn(strategies.layer_cases(**restrict)),
                 lambda case: checks.check_layer(a, case, "pair layer",
                                                 pairwise.as_layer_builtin(b))),
        ]
    return tasks


# Rough seconds a backend's own unit takes here (JAX compiles every new shape and flag set); a
# pair unit costs about _PAIR_COST once the processes' compiled functions are warm.
_COST = {"jax": 28, "tf": 10, "mxnet": 6, "torch": 4, "numpy": 2}
_PAIR_COST = 2


def _cost(unit: str) -> int:
    return _COST.get(unit, 5) if "~" not in unit else _PAIR_COST


def _lanes(units: Sequence[str], jobs: int) -> list[list[str]]:
    """Split the units into at most ``jobs`` lanes, one worker process each. A pair goes to the
    lane of its costlier backend: that process has imported the framework and compiled its
    functions for the same shapes already (a pair run elsewhere paid JAX's compiles twice).
    Groups go heaviest first into the least loaded lane."""
    groups: dict[str, list[str]] = {}
    for unit in units:
        anchor = max(unit.split("~"), key=lambda name: _COST.get(name, 5))
        groups.setdefault(anchor, []).append(unit)
    lanes: list[list[str]] = [[] for _ in range(jobs)]
    loads = [0] * jobs
    for members in sorted(groups.values(), key=lambda g: -sum(map(_cost, g))):
        lane = loads.index(min(loads))
        lanes[lane] += members
        loads[lane] += sum(map(_cost, members))
    return [lane for lane in lanes if lane]


def _units(backends: Sequence[str]) -> list[str]:
    """The matrix's independent units: each backend, then each pair ("torch~jax")."""
    from bnref.testing.backends import KNOWN_BACKENDS

    own = [name for name in backends if KNOWN_BACKENDS[name].module]
    return [*backends, *(f"{a}~{b}" for i, a in enumerate(own) for b in own[i + 1:])]


def _unit_rows(unit: str, examples: int, dtypes: Sequence[str] | None) -> list[Row]:
    """Draw and run one unit's rows (in a worker process when running in parallel)."""
    from bnref.testing.backends import load_backend

    if "~" in unit:
        first, second = unit.split("~")
        tasks = _pair_tasks(load_backend(first), load_backend(second), examples, dtypes)
    else:
        tasks = _tasks(unit, load_backend(unit), examples, dtypes)
    return _run_tasks(unit, tasks)


def _run_tasks(unit: str, tasks: Sequence[Task]) -> list[Row]:
    rows = []
    for task in tasks:
        row = Row(unit, task.check, task.dtype, skipped=task.skipped)
        for case in task.cases():
            try:
                row.add(task.run(case))
            except Exception as error:  # a crash is a failure of that row, reported as such
                row.crashed(error)
        rows.append(row)
    return rows


def run_check(backends: Sequence[str], examples: int, dtypes: Sequence[str] | None,
              progress: bool, jobs: int = 1) -> list[Row]:
    """Every unit's rows, in unit order. With ``jobs > 1`` units run in up to that many worker
    processes (spawned, so each imports only the frameworks its units need; see _lanes)."""
    from bnref.testing.backends import KNOWN_BACKENDS

    units = _units(backends)
    if not all(KNOWN_BACKENDS[name].module for name in backends):
        jobs = 1  # a backend registered in this process only: workers would not know it
    bar = Progress(len(units), progress)
    results: dict[str, list[Row]] = {}
    if jobs <= 1:
        for unit in units:
            results[unit] = _unit_rows(unit, examples, dtypes)
            bar.step(unit)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        lanes = _lanes(units, jobs)
        pools = [ProcessPoolExecutor(max_workers=1, mp_context=context) for _ in lanes]
        try:
            futures = {pool.submit(_unit_rows, unit, examples, dtypes): unit
                       for pool, lane in zip(pools, lanes, strict=True) for unit in lane}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.step(futures[future])
        finally:
            for pool in pools:
                pool.shutdown()
    bar.close()
    return [row for unit in units for row in results[unit]]


def _table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


TABLE_HEADERS = ("backend", "check", "dtype", "cases", "|error|", "tolerance", "error/tol",
                 "max |error| anywhere", "result")


def format_rows(rows: Sequence[Row]) -> str:
    """The table. |error|, tolerance and error/tol are the deciding element's (the worst
    ratio); "max |error| anywhere" is the largest error of any element, under its own
    (possibly much wider) tolerance, and does not decide the row."""
    body = [[r.backend, r.check, r.dtype, str(r.cases), f"{r.error:.3g}", f"{r.tolerance:.3g}",
             f"{r.ratio:.3g}", f"{r.max_error:.3g}", r.verdict]
            if not r.skipped else [r.backend, r.check, r.dtype, "0", "-", "-", "-", "-", "SKIP"]
            for r in rows]
    text = _table(TABLE_HEADERS, body)
    failures = [f"{r.backend} {r.check} {r.dtype}: {r.detail}" for r in rows if not r.passed]
    skipped = [f"{r.backend} {r.check} {r.dtype}: {r.skipped}" for r in rows if r.skipped]
    return (text + ("\n\nSkipped:\n" + "\n".join(skipped) if skipped else "")
            + ("\n\nFailures:\n" + "\n".join(failures) if failures else ""))


def conventions_table() -> str:
    """Every record: the five frameworks', then the libraries' (Equinox, Haiku)."""
    body = []
    for c in ALL_CONVENTIONS.values():
        momentum = "required" if c.default_momentum is None else f"{c.default_momentum:g}"
        body.append([c.name, c.layer, c.update_rule, momentum, f"{c.default_eps:g}",
                     "unbiased" if c.unbiased_running_var else "biased",
                     str(c.default_axis),
                     ", ".join(c.state_names[k] for k in ("gamma", "beta", "running_mean",
                                                          "running_var"))])
    return _table(["convention", "built-in", "running update", "momentum", "eps",
                   "running var", "axis", "gamma, beta, mean, var names"], body)


def _add_implementation_arguments(command, required: bool) -> None:
    """--implementation / --layer and what the default adapter needs to know."""
    what = command.add_mutually_exclusive_group(required=required)
    what.add_argument("--implementation", metavar="MODULE:FUNCTION",
                      help="your batch_norm function (bnref's functional signature; "
                           "'pkg.module:name' or 'path/to/file.py:name')")
    what.add_argument("--layer", metavar="MODULE:CLASS", help="your batch-norm layer class")
    command.add_argument("--framework", choices=("numpy", "torch", "jax", "tf", "mxnet"),
                         help="the framework it is written in (with --implementation/--layer)")
    command.add_argument("--convention", default=None,
                         help="the convention it claims to follow: torch, keras, flax, mxnet "
                              "or onnx (default: the framework's own)")
    command.add_argument("--declare", action="append", default=[], metavar="NAME=VALUE",
                         help="an adapter declaration, e.g. ranks=(4,4), channel_axis=-1, "
                              "optional_affine=True (repeatable; see bnref.testing.Backend)")
    command.add_argument("--layer-kwargs", default=None, metavar="JSON",
                         help="extra constructor arguments for --layer, as a JSON object")
    command.add_argument("--state-names", default=None, metavar="JSON",
                         help="--layer's state names, from bnref's (gamma, beta, "
                              "running_mean, running_var, num_batches_tracked) to yours, "
                              "as a JSON object")


_FRAMEWORK_CONVENTION = {"numpy": "torch", "torch": "torch", "jax": "flax", "tf": "keras",
                         "mxnet": "mxnet"}


def _declarations(items: Sequence[str]) -> dict[str, Any]:
    import ast

    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--declare must be NAME=VALUE, got {item!r}")
        try:
            out[name.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[name.strip()] = raw.strip()
    return out


def third_party_backend(args: argparse.Namespace):
    """The default adapter for ``--implementation``/``--layer`` (see bnref.testing.adapters)."""
    from bnref.testing.adapters import function_backend, layer_backend

    if args.framework is None:
        raise ValueError("--framework is required with --implementation/--layer "
                         "(numpy, torch, jax, tf or mxnet)")
    if os.getcwd() not in sys.path:  # 'pkg.module' relative to where the command runs
        sys.path.insert(0, os.getcwd())
    convention = args.convention or _FRAMEWORK_CONVENTION[args.framework]
    declarations = _declarations(args.declare)
    if args.implementation:
        return function_backend(args.implementation, framework=args.framework,
                                convention=convention, **declarations)
    return layer_backend(args.layer, framework=args.framework, convention=convention,
                         layer_kwargs=_json_object("--layer-kwargs", args.layer_kwargs),
                         state_names=_json_object("--state-names", args.state_names),
                         **declarations)


def _json_object(option: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{option} must be a JSON object, got {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, got {text!r}")
    return value


def _check_third_party(args: argparse.Namespace) -> int:
    from bnref.testing.diagnose import diagnose

    backend = third_party_backend(args)
    started = time.monotonic()
    rows = _run_tasks(backend.name, _tasks(backend.name, backend, args.examples, args.dtypes,
                                           registered=False))
    diagnosis = diagnose(backend)
    elapsed = time.monotonic() - started
    passed = all(r.passed for r in rows)
    if args.json:
        print(json.dumps({"passed": passed, "seconds": round(elapsed, 2),
                          "declared": _jsonable(backend.declared()),
                          "diagnosis": _diagnosis_dict(diagnosis),
                          "rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(format_rows(rows))
        verdict = "all PASS" if passed else f"{sum(not r.passed for r in rows)} FAIL"
        print(f"\n{len(rows)} rows, {verdict}, {elapsed:.1f} s")
        print(f"\ndiagnosis: {diagnosis.text}")
    return 0 if passed else 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _diagnosis_dict(diagnosis) -> dict[str, Any]:
    return {"convention": diagnosis.convention, "fits": diagnosis.fits,
            "conforms": diagnosis.conforms, "findings": list(diagnosis.findings),
            "behaves_like": diagnosis.behaves_like, "text": diagnosis.text,
            "not_tested": _jsonable(diagnosis.details.get("not_tested", {})),
            "refused": _jsonable(diagnosis.details.get("refused", {}))}


def _diagnose(args: argparse.Namespace) -> int:
    """``bnref diagnose``: exit 0 when the implementation conforms, 1 otherwise."""
    from bnref.testing.diagnose import diagnose

    diagnosis = diagnose(third_party_backend(args))
    if args.json:
        print(json.dumps(_diagnosis_dict(diagnosis), indent=2))
    else:
        print(diagnosis.text)
    return 0 if diagnosis.conforms else 1


def _demo(args: argparse.Namespace) -> int:
    import bnref.demo

    backends = ([n.strip() for n in args.backends.split(",") if n.strip()]
                if args.backends else None)
    try:
        metrics = bnref.demo.run(args.out, backends=backends, quick=args.quick,
                                 dtype="float64" if args.float64 else "float32",
                                 progress=sys.stderr.isatty())
    except (bnref.demo.MissingExtra, ValueError) as error:
        print(f"bnref demo: {error}", file=sys.stderr)
        return 2
    pairs = metrics["agreement"]["frameworks"]
    if pairs:
        worst = max(pairs, key=pairs.get)
        print(f"largest relative loss difference between frameworks: {pairs[worst]:.3g} "
              f"({worst})")
    print(f"wrote {args.out}/index.html ({metrics['seconds']:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnref", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run the conformance matrix (of bnref's backends, or "
                                         "of your implementation with --implementation/--layer)")
    check.add_argument("--backends", help="comma-separated (default: every installed one)")
    check.add_argument("--dtype", action="append", dest="dtypes",
                       help="only this dtype (repeatable)")
    check.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                       help=f"cases per row (default {DEFAULT_EXAMPLES}; a quarter, at least "
                            "5, for backends that compile per shape)")
    check.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                       help="worker processes (default: 2, or 1 on one core)")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_implementation_arguments(check, required=False)
    diag = sub.add_parser("diagnose", help="name the classic batch-norm mistakes your "
                                           "implementation makes, if any (exit 1 if any)")
    _add_implementation_arguments(diag, required=True)
    diag.add_argument("--json", action="store_true")
    conv = sub.add_parser("conventions", help="print the conventions table")
    conv.add_argument("--json", action="store_true")
    demo = sub.add_parser("demo", help="train with and without BN in every installed "
                                       "framework from the same weights; write plots, "
                                       "metrics.json and index.html")
    demo.add_argument("--out", default="bnref-demo", help="output folder (default bnref-demo)")
    demo.add_argument("--backends", help="comma-separated (default: every installed one)")
    demo.add_argument("--quick", action="store_true", help="fewer samples and steps")
    demo.add_argument("--float64", action="store_true", help="train in float64")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command in ("check", "diagnose") and (args.implementation or args.layer):
        if args.convention is not None and args.convention not in ALL_CONVENTIONS:
            parser.error(f"--convention must be one of {sorted(ALL_CONVENTIONS)}, got "
                         f"{args.convention!r}")
        try:
            return (_diagnose if args.command == "diagnose" else _check_third_party)(args)
        except (ValueError, TypeError, ImportError, AttributeError) as error:
            print(f"bnref {args.command}: {error}", file=sys.stderr)
            return 2

    if args.command == "conventions":
        if args.json:
            print(json.dumps({name: {**c.__dict__, "state_names": dict(c.state_names)}
                              for name, c in ALL_CONVENTIONS.items()}, indent=2))
        else:
            print(conventions_table())
        return 0

    from bnref.testing.backends import (
        KNOWN_BACKENDS,
        installed_backends,
        is_installed,
        required_backends,
    )

    if args.backends:
        names = [n.strip() for n in args.backends.split(",") if n.strip()]
        unknown = [n for n in names if n not in KNOWN_BACKENDS]
        if unknown:
            parser.error(f"unknown backends {unknown}; known: {sorted(KNOWN_BACKENDS)}")
    else:
        names = installed_backends()
    missing = [n for n in {*names, *required_backends()} if not is_installed(n)]
    if missing:
        print(f"bnref check: backends not installed: {sorted(missing)}", file=sys.stderr)
        return 1
    started = time.monotonic()
    rows = run_check(names, args.examples, args.dtypes,
                     progress=sys.stderr.isatty() and not args.json, jobs=args.jobs)
    elapsed = time.monotonic() - started
    passed = all(r.passed for r in rows)
    if args.json:
        print(json.dumps({"passed": passed, "seconds": round(elapsed, 2),
                          "rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(format_rows(rows))
        verdict = "all PASS" if passed else f"{sum(not r.passed for r in rows)} FAIL"
        print(f"\n{len(rows)} rows, {verdict}, {elapsed:.1f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
