"""``bnref demo``: the frameworks agree step by step, bnref's layer agrees with each built-in, BN
helps the deep MLP, the report is written and renders, and the committed docs are of the code
as it is.

The agreement bound (docs/teaching.md): every step of a float64 run rounds each of its
results once per operation, a relative ``u = 2**-53`` each; a step of these small models is a
chain of at most about ``2**7`` such roundings between the weights and the loss, so one step
can move two frameworks' losses apart by ``2**7 u`` relative, and ``S`` steps by ``S * 2**7 u``
(the differences add up step after step; they do not compound, as long as no rounding flips a
ReLU or an argmax, which float64's tiny roundings do not do here). 300 steps: 4.3e-12.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bnref.testing.fixtures import backend_or_skip

for _backend in ("torch", "jax", "tf", "mxnet"):
    backend_or_skip(_backend)  # every framework is part of the demo (required in CI)
if importlib.util.find_spec("mnist1d") is None:
    pytest.fail("bnref demo needs the demo extra (mnist1d, scikit-learn, matplotlib)",
                pytrace=False)

import bnref.demo  # noqa: E402
from bnref.demo.experiment import BACKENDS, Settings, relative_difference  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "docs" / "demo"
U64 = 2.0 ** -53
U32 = 2.0 ** -24


def bound(steps: int, unit: float) -> float:
    """The documented per-run bound: ``steps * 2**7 * u``."""
    return steps * 2 ** 7 * unit


@pytest.fixture(scope="module")
def quick64(tmp_path_factory):
    """Every framework, both models, quick settings, float64, with the report written."""
    out = tmp_path_factory.mktemp("demo")
    return bnref.demo.run(out, quick=True, dtype="float64", progress=False), out


def _steps(metrics, model: str) -> int:
    return metrics["settings"][f"{model}_steps"]


def test_every_framework_ran_every_variant(quick64):
    metrics, _ = quick64
    expected = {f"{b}/{m}/{bn}" for b in BACKENDS for m in ("mlp", "cnn")
                for bn in ("none", "bnref", "builtin") if not (b == "numpy" and bn == "builtin")}
    assert set(metrics["runs"]) == expected
    for key, run in metrics["runs"].items():
        model = key.split("/")[1]
        assert len(run["loss"]) == _steps(metrics, model), key
        assert np.isfinite(run["loss"]).all(), key


def test_float64_frameworks_agree_within_the_bound(quick64):
    metrics, _ = quick64
    pairs = metrics["agreement"]["frameworks"]
    # (mlp, cnn) x (10 pairs without BN + 10 with bnref's + 6 of the four built-ins)
    assert len(pairs) == 2 * (10 + 10 + 6)
    for name, difference in pairs.items():
        model = name.split("/")[0]
        assert difference <= bound(_steps(metrics, model), U64), (name, difference)


def test_float64_bnref_agrees_with_each_builtin_within_the_bound(quick64):
    metrics, _ = quick64
    differences = metrics["agreement"]["bnref_vs_builtin"]
    assert len(differences) == 2 * 4  # every framework but numpy, both models
    for name, difference in differences.items():
        model = name.split(":")[0]
        assert difference <= bound(_steps(metrics, model), U64), (name, difference)


def test_the_same_test_accuracy_everywhere_in_float64(quick64):
    """Without BN every framework classifies the test set alike. With BN, inference uses the
    running variance, which PyTorch's convention feeds the unbiased batch variance and the
    others the biased one: numpy and torch (bnref's torch convention, the default) agree,
    and jax, tf and mxnet agree."""
    metrics, _ = quick64
    families = {"none": [BACKENDS], "bnref": [("numpy", "torch"), ("jax", "tf", "mxnet")]}
    for model in ("mlp", "cnn"):
        for bn, groups in families.items():
            for group in groups:
                accuracies = {b: metrics["runs"][f"{b}/{model}/{bn}"]["test_accuracy"]
                              for b in group}
                assert len({tuple(a) for a in accuracies.values()}) == 1, (model, bn, accuracies)


def test_the_report_is_written(quick64):
    _, out = quick64
    page = (out / "index.html").read_text()
    for name in ("loss_accuracy.png", "activations.png", "gradients.png", "frameworks.png",
                 "ported.png"):
        assert (out / name).stat().st_size > 10_000, name
        assert f'src="{name}"' in page, name
    assert json.loads((out / "metrics.json").read_text())["settings"]["dtype"] == "float64"


def test_the_page_renders_in_headless_chromium(quick64, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed here (Debian package 'chromium')")
    _, out = quick64
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1000,3000",
                    (out / "index.html").as_uri()], capture_output=True, timeout=120,
                   check=True)
    assert shot.stat().st_size > 50_000  # the plots are in it, not a blank page


@pytest.fixture(scope="module")
def mlp32():
    """The MLP runs of every framework at the default settings, float32 (the CNN's are left
    out to keep the demo's tests within their 90 s)."""
    return bnref.demo.run(None, dtype="float32", progress=False, models=("mlp",))


def test_bn_helps_the_deep_mlp(mlp32):
    """With the same steps, from the same weights, the MLP with BN ends at a lower training
    loss (the mean of its last 10 batches) than without: every framework, default settings."""
    metrics = mlp32
    for backend in BACKENDS:
        with_bn = np.mean(metrics["runs"][f"{backend}/mlp/bnref"]["loss"][-10:])
        without = np.mean(metrics["runs"][f"{backend}/mlp/none"]["loss"][-10:])
        assert with_bn < without, (backend, with_bn, without)


def test_the_committed_metrics_are_the_code_as_it_is(mlp32):
    """The MLP runs of every framework, regenerated at the committed settings, match
    docs/demo/metrics.json within the float32 bound (the pictures in the docs come from it)."""
    committed = json.loads((COMMITTED / "metrics.json").read_text())
    settings = committed["settings"]
    assert settings["dtype"] == "float32" and settings == Settings().as_dict()
    assert {key.split("/")[0] for key in mlp32["runs"]} == set(BACKENDS)
    for key, run in mlp32["runs"].items():
        difference = relative_difference(run["loss"], committed["runs"][key]["loss"])
        assert difference <= bound(settings["mlp_steps"], U32), (key, difference)


def test_the_extra_is_named_when_missing(monkeypatch):
    monkeypatch.setattr(bnref.demo, "_NEEDS", {"no_such_module_bnref": "no-such-package"})
    with pytest.raises(bnref.demo.MissingExtra, match=r"bnref\[demo\]"):
        bnref.demo.run(None)


def test_the_command_passes_its_options_and_names_the_worst_pair(quick64, monkeypatch,
                                                                   capsys):
    """``bnref demo`` as a user types it: its options reach ``bnref.demo.run`` (the quick
    float64 run above stands in for the run itself), exit 0, the largest difference between
    the frameworks printed with its pair, and where the page is."""
    from bnref import cli

    metrics, out = quick64
    calls = []

    def run(out_dir, **options):
        calls.append((out_dir, options))
        return metrics

    monkeypatch.setattr(bnref.demo, "run", run)
    status = cli.main(["demo", "--quick", "--float64", "--backends", "numpy, torch",
                       "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert calls == [(str(out), {"backends": ["numpy", "torch"], "quick": True,
                                 "dtype": "float64", "progress": False})]
    pairs = metrics["agreement"]["frameworks"]
    worst = max(pairs, key=pairs.get)
    assert (f"largest relative loss difference between frameworks: {pairs[worst]:.3g} "
            f"({worst})") in printed
    assert f"wrote {out}/index.html" in printed


@pytest.mark.parametrize(("argv", "message"), [
    (["--backends", "caffe"], "backends must be among"),
    (["--backends", "numpy", "--out", "{tmp}"], "bnref[demo]"),
], ids=["unknown-backend", "missing-extra"])
def test_the_command_exits_2_and_says_why(monkeypatch, tmp_path, capsys, argv, message):
    from bnref import cli

    if message == "bnref[demo]":
        monkeypatch.setattr(bnref.demo, "_NEEDS", {"no_such_module_bnref": "no-such-package"})
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["demo", "--quick", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_jax_runs_need_flax_and_say_so(monkeypatch):
    from bnref.demo import experiment

    real = importlib.util.find_spec
    monkeypatch.setattr(experiment.importlib.util, "find_spec",
                        lambda name, *a: None if name == "flax" else real(name, *a))
    assert "jax" not in experiment.available_backends()
    with pytest.raises(ValueError, match=r"\['jax'\] are not installed here \(they import jax: "
                                         r"flax\)"):
        bnref.demo.run(None, backends=["jax"], quick=True)
