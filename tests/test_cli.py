"""``bnref check`` and ``bnref conventions``: exit status, JSON, and that a wrong backend FAILs."""

from __future__ import annotations

import json

import pytest

from bnref import cli
from bnref.conventions import CONVENTIONS
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
    for name, record in CONVENTIONS.items():
        assert name in out and record.layer in out


def test_conventions_json_round_trips_the_records(capsys):
    assert cli.main(["conventions", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {name: data[name]["default_momentum"] for name in data} == {
        name: c.default_momentum for name, c in CONVENTIONS.items()}


def test_check_numpy_passes_with_every_row(capsys):
    assert cli.main(["check", "--backends", "numpy", "--examples", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = {(row["check"], row["dtype"]) for row in report["rows"]}
    assert report["passed"] and all(row["passed"] for row in report["rows"])
    assert {("forward", "float32"), ("gradients", "float16"), ("layer", "bfloat16"),
            ("finite differences", "float64"), ("vs onnxruntime", "float32"),
            ("bad input", "-"), ("bad layer arguments", "-")} <= checks
    assert all(row["cases"] > 0 for row in report["rows"])


def test_check_prints_a_table_and_fails_a_wrong_backend(capsys, wrong_backend):
    status = cli.main(["check", "--backends", wrong_backend, "--examples", "10",
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
