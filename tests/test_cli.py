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
