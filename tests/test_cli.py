"""``bnref check`` and ``bnref conventions``: exit status, JSON, and that a wrong backend FAILs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest

from bnref import cli
from bnref.conventions import ALL_CONVENTIONS
from bnref.testing import backends
from bnref.testing._numpy import NumpyBackend


class WrongMomentumMeaning(NumpyBackend):
    """The oracle with momentum read the other way round (Keras meaning under torch's name)."""

    name = "wrong-momentum"

    def batch_norm(self, *arrays, momentum=0.1, convention="torch", **kwargs):
        flipped = 1.0 - momentum if convention == "torch" else momentum
        return super().batch_norm(*arrays, momentum=flipped, convention=convention, **kwargs)


@pytest.fixture
def wrong_backend(monkeypatch):
    monkeypatch.setitem(backends.KNOWN_BACKENDS, "wrong-momentum",
                        backends.BackendInfo("wrong-momentum", "numpy", WrongMomentumMeaning))
    yield "wrong-momentum"
    backends._LOADED.pop("wrong-momentum", None)


def test_conventions_prints_every_record(capsys):
    assert cli.main(["conventions"]) == 0
    out = capsys.readouterr().out
    for name, record in ALL_CONVENTIONS.items():
        assert name in out and record.layer in out


def test_conventions_json_round_trips_the_records(capsys):
    assert cli.main(["conventions", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {name: data[name]["default_momentum"] for name in data} == {
        name: c.default_momentum for name, c in ALL_CONVENTIONS.items()}


@pytest.fixture(scope="module")
def numpy_report():
    """``bnref check --backends numpy --examples 3 --json``: its exit status and report."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["check", "--backends", "numpy", "--examples", "3", "--json"])
    return status, json.loads(out.getvalue())


def test_check_numpy_passes_with_every_row(numpy_report):
    status, report = numpy_report
    assert status == 0
    checks = {(row["check"], row["dtype"]) for row in report["rows"]}
    assert report["passed"] and all(row["passed"] for row in report["rows"])
    assert {("forward", "float32"), ("gradients", "float16"), ("layer", "bfloat16"),
            ("finite differences", "float64"), ("vs onnxruntime", "float32"),
            ("bad input", "-"), ("bad layer arguments", "-")} <= checks
    assert all(row["cases"] > 0 for row in report["rows"])


def test_each_row_shows_the_error_and_tolerance_of_the_element_that_decides_it(numpy_report):
    _, report = numpy_report
    for row in report["rows"]:
        error, tolerance, ratio = row["deciding_error"], row["deciding_tolerance"], row["ratio"]
        assert row["tolerance"] == tolerance  # the old key, kept
        assert error <= row["max_error"] * (1 + 1e-12), row
        if tolerance == 0:
            assert error == ratio == 0, row
        else:
            assert math.isclose(error / tolerance, ratio, rel_tol=1e-9, abs_tol=1e-300), row
        if row["passed"]:
            assert error <= tolerance * (1 + 1e-12), row


def test_a_small_error_under_a_tight_tolerance_decides_over_a_large_one_under_a_wide_one():
    from bnref.testing.tolerances import compare

    row = cli.Row("numpy", "forward", "float32")
    # Element 0: error 12.7 under tolerance 1000 (ratio 0.0127); element 1: error 1e-4 under
    # 2.8e-4 (ratio ~0.357), which decides the row.
    row.add([compare([12.7, 1e-4], [0.0, 0.0], [1000.0, 2.8e-4], "y")])
    row.add([compare([0.0], [0.0], [1.0], "y")])
    assert row.passed
    assert row.max_error == 12.7
    assert row.tolerance == 2.8e-4
    assert math.isclose(row.error, 1e-4, rel_tol=1e-12)
    assert math.isclose(row.ratio, 1e-4 / 2.8e-4, rel_tol=1e-12)
    line = cli.format_rows([row]).splitlines()[2].split()
    assert line[4:] == ["0.0001", "0.00028", "0.357", "12.7", "PASS"]


def test_a_failing_or_crashing_row_keeps_error_tolerance_and_ratio_together():
    from bnref.testing.tolerances import compare

    exceeded = cli.Row("numpy", "forward", "float32")
    exceeded.add([compare([3e-4, 5.0], [0.0, 0.0], [1e-4, 100.0], "y")])
    assert not exceeded.passed and "y: |error| 0.0003 where the tolerance is 0.0001" in (
        exceeded.detail) and "largest |error| anywhere 5" in exceeded.detail
    assert math.isclose(exceeded.error, 3e-4) and exceeded.tolerance == 1e-4
    unchanged = cli.Row("numpy", "forward", "float32")  # where nothing may change: tolerance 0
    unchanged.add([compare([0.5], [0.0], 0.0, "running_mean")])
    assert (unchanged.error, unchanged.tolerance, unchanged.ratio) == (0.5, 0.0, math.inf)
    crashed = cli.Row("numpy", "forward", "float32")
    crashed.crashed(RuntimeError("boom"))
    assert not crashed.passed and crashed.detail == "RuntimeError: boom"
    assert crashed.as_dict()["deciding_error"] == math.inf


def test_check_prints_a_table_and_fails_a_wrong_backend(capsys, wrong_backend):
    status = cli.main(["check", "--backends", wrong_backend, "--examples", "40",
                       "--dtype", "float64"])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAIL" in out and "running_var vs oracle" in out


def test_check_refuses_an_unknown_backend():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "--backends", "caffe"])
    assert exit_info.value.code == 2


def test_lanes_run_every_unit_once_with_pairs_beside_their_costlier_backend():
    units = cli._units(["numpy", "torch", "jax", "tf", "mxnet"])
    lanes = cli._lanes(units, 2)
    assert len(lanes) == 2
    assert sorted(u for lane in lanes for u in lane) == sorted(units)
    jax_lane = next(lane for lane in lanes if "jax" in lane)
    assert {u for u in units if "jax" in u.split("~")} <= set(jax_lane)
    assert cli._lanes(units, 8) == [lane for lane in cli._lanes(units, 8) if lane]
    assert cli._lanes(["numpy"], 2) == [["numpy"]]


def test_drawn_cases_are_the_same_each_time_and_private_to_each_caller():
    from bnref.testing.strategies import bn_cases

    first = cli.draw_examples(bn_cases(dtypes=("float16",)), 4)
    first[0].x[...] = 12345  # a backend that wrongly wrote to its input
    again = cli.draw_examples(bn_cases(dtypes=("float16",)), 4)
    fresh = cli._draw(bn_cases(dtypes=("float16",)), 4)
    assert len(again) == 4
    for a, b in zip(again, fresh, strict=True):
        assert repr(a) == repr(b)
    assert not (again[0].x == 12345).all()


def test_compiling_backends_run_a_quarter_of_the_cases():
    from bnref.testing._numpy import NumpyBackend as Plain

    class Compiling(Plain):
        shape_pool = ((2, 3),)

    assert cli._case_count(20, Plain()) == 20
    assert cli._case_count(20, Plain(), Compiling()) == 5
    assert cli._case_count(40, Compiling()) == 10
    assert cli._case_count(3, Compiling()) == 3


def _python_m_bnref(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnref", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_python_m_bnref_runs_the_command():
    done = _python_m_bnref("conventions")
    assert done.returncode == 0, done.stderr
    assert done.stdout == cli.conventions_table() + "\n"


def test_python_m_bnref_exits_like_the_command_on_bad_arguments():
    done = _python_m_bnref("frobnicate")
    assert done.returncode == 2
    assert "usage: bnref" in done.stderr and "frobnicate" in done.stderr
    unknown = _python_m_bnref("check", "--backends", "caffe")
    assert unknown.returncode == 2 and "unknown backends" in unknown.stderr


# --- the "sync k=2 == full batch" row ---------------------------------------------------------


def _numpy_sync_runner(synchronized: bool):
    """A stand-in for an engine's 2-worker unit (``SYNC_RUNNERS``' signature), in numpy:
    synchronized through the oracle's sync_batch_norm, or each worker on its own shard."""
    import bnref.numpy as bn
    from bnref.testing.sync import Synced

    def run(cases):
        results = []
        for sc in cases:
            c, shards = sc.case, sc.shards
            if synchronized:
                ys, mean, var = bn.sync_batch_norm(shards, *c.arrays[1:], training=True,
                                                   **sc.options())
                means, variances = [mean] * sc.k, [var] * sc.k
            else:
                outs = [bn.batch_norm(s, *c.arrays[1:], training=True, **sc.options())
                        for s in shards]
                ys, means, variances = (list(part) for part in zip(*outs, strict=True))
            grads = (None, None, None)
            if sc.dy is not None:
                options = {"eps": c.eps, "axis": c.axis, "convention": c.convention}
                if synchronized:
                    grads = bn.sync_batch_norm_backward(sc.dys, shards, c.gamma, beta=c.beta,
                                                        per_shard=True, **options)
                else:
                    per = [bn.batch_norm_backward(dy, s, c.gamma, beta=c.beta, **options)
                           for dy, s in zip(sc.dys, shards, strict=True)]
                    grads = tuple(list(part) for part in zip(*per, strict=True))
            results.append(Synced(ys, means, variances, *grads))
        return results

    return run


@pytest.mark.parametrize("synchronized", [True, False], ids=["synchronized", "per-shard"])
def test_the_sync_row_passes_synchronized_workers_and_fails_per_shard_ones(monkeypatch,
                                                                           synchronized):
    """The row bnref check runs for each engine (tested here with a numpy stand-in for the
    engine; .ci/run's bnref check runs the real 2-worker units): workers that share the
    statistics pass it, workers that normalise their own shards fail it."""
    import types

    module = types.ModuleType("bnref_stand_in_sync")
    module.run = _numpy_sync_runner(synchronized)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.SYNC_RUNNERS, "stand-in", (f"{module.__name__}:run", False))
    [row] = cli._run_tasks("stand-in", [cli._sync_task("stand-in", NumpyBackend(), 5)])
    assert row.check == "sync k=2 == full batch"
    assert row.passed == synchronized, row.detail
    if not synchronized:  # the detail names a worker's disagreement
        assert "worker" in row.detail and "[FAIL]" in row.detail
