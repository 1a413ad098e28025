"""The demo's report: PNG plots, ``metrics.json`` and ``index.html``, written from the metrics
dict of :func:`bnref.demo.experiment.metrics` (any subset of backends, with or without the
port experiment)."""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from bnref.demo.core import layer_names

__all__ = ["write_report"]

_TITLES = {"mlp": "MLP on MNIST-1D", "cnn": "CNN on 8x8 digits"}
_BN = {"none": "without BN", "bnref": "with BN (bnref)", "builtin": "with BN (built-in)"}
_STYLES = {"numpy": ("-", 4.0), "torch": ("--", 3.0), "jax": ("-.", 2.5), "tf": (":", 2.5),
           "mxnet": ("-", 1.0)}
_FLOOR = np.finfo(np.float64).eps / 4  # where an exact agreement (0) is drawn on a log axis
_DPI = 100  # figures are 9 inches wide: 900 px


def _split(runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The backends and models present, in the order they were run."""
    keys = [key.split("/") for key in runs]
    return list(dict.fromkeys(k[0] for k in keys)), list(dict.fromkeys(k[1] for k in keys))


def _reference(backends: list[str]) -> str:
    return "torch" if "torch" in backends else backends[0]


def _kernels(model: str, count: int) -> list[str]:
    names = [n.split("/")[0] for n in layer_names(model, False) if n.endswith("/kernel")]
    return names if len(names) == count else [f"layer {i}" for i in range(count)]


def _style_legend(ax, colors: dict[str, Any]) -> None:
    """A legend of colours (one per layer) and line styles (with / without BN)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=name) for name, c in colors.items()]
    handles += [Line2D([], [], color="k", ls="-", label=_BN["bnref"]),
                Line2D([], [], color="k", ls="--", label=_BN["none"])]
    ax.legend(handles=handles, fontsize=8)


def _loss_accuracy(plt, runs, backends, models):
    """(a) Training loss per step (top) and test accuracy at each evaluation (bottom), with
    bnref's BN and without, in one reference framework (torch when present)."""
    ref = _reference(backends)
    fig, axes = plt.subplots(2, len(models), figsize=(9, 7), squeeze=False)
    for col, model in enumerate(models):
        for bn, color in (("none", "tab:red"), ("bnref", "tab:blue")):
            run = runs.get(f"{ref}/{model}/{bn}")
            if run is None:
                continue
            axes[0, col].plot(run["loss"], color=color, label=_BN[bn])
            axes[1, col].plot(run["eval_steps"], run["test_accuracy"], "o-", color=color,
                              label=_BN[bn])
        axes[0, col].set(title=f"{_TITLES.get(model, model)}: training loss", xlabel="step",
                         ylabel="loss (batch mean cross-entropy)")
        axes[1, col].set(title=f"{_TITLES.get(model, model)}: test accuracy", xlabel="step",
                         ylabel="test accuracy")
        for ax in axes[:, col]:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{ref}: with BN (bnref's layer) and without")
    return fig


def _activations(plt, runs, backends, models):
    """(b) Each hidden block's pre-ReLU activation mean (top) and per-feature variance
    (bottom, log scale) over training, with bnref's BN (solid) and without (dashed), one
    colour per block, in the reference framework: source 000's per-layer measurement."""
    ref = _reference(backends)
    fig, axes = plt.subplots(2, len(models), figsize=(9, 7), squeeze=False)
    for col, model in enumerate(models):
        colors: dict[str, Any] = {}
        for bn, ls in (("bnref", "-"), ("none", "--")):
            run = runs.get(f"{ref}/{model}/{bn}")
            if run is None or not run["record_steps"]:
                continue
            for row, field in enumerate(("activation_mean", "activation_var")):
                values = np.asarray(run[field], np.float64)
                for block in range(values.shape[1]):
                    color = colors.setdefault(f"block {block}", f"C{block}")
                    axes[row, col].plot(run["record_steps"], values[:, block], ls=ls,
                                        color=color)
        title = _TITLES.get(model, model)
        axes[0, col].set(title=f"{title}: activation mean", xlabel="step",
                         ylabel="mean of pre-ReLU activation")
        axes[1, col].set(title=f"{title}: activation variance", xlabel="step",
                         ylabel="per-feature variance", yscale="log")
        for ax in axes[:, col]:
            _style_legend(ax, colors)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{ref}: each hidden block's input to its ReLU")
    return fig


def _gradients(plt, runs, backends, models):
    """(c) The 2-norm of each dense/conv kernel's gradient over training (log scale), with
    bnref's BN (solid) and without (dashed), one colour per layer, in the reference
    framework."""
    ref = _reference(backends)
    fig, axes = plt.subplots(1, len(models), figsize=(9, 4.5), squeeze=False)
    for col, model in enumerate(models):
        ax, colors = axes[0, col], {}
        for bn, ls in (("bnref", "-"), ("none", "--")):
            run = runs.get(f"{ref}/{model}/{bn}")
            if run is None or not run["record_steps"]:
                continue
            norms = np.asarray(run["grad_norm"], np.float64)
            for i, name in enumerate(_kernels(model, norms.shape[1])):
                color = colors.setdefault(name, f"C{i}")
                ax.plot(run["record_steps"], norms[:, i], ls=ls, color=color)
        ax.set(title=f"{_TITLES.get(model, model)}: gradient norms", xlabel="step",
               ylabel="||dL/dW|| of each kernel", yscale="log")
        _style_legend(ax, colors)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{ref}: gradient of each dense/conv kernel")
    return fig


def _pairwise(losses: dict[str, list[float]]) -> np.ndarray | None:
    """Per step, the largest |a - b| / |b| over every pair of frameworks (None: fewer than
    two). Exact agreement is drawn at float64's eps / 4, below anything measurable."""
    if len(losses) < 2:
        return None
    steps = min(len(v) for v in losses.values())
    worst = np.zeros(steps)
    for a, b in itertools.combinations(sorted(losses), 2):
        va, vb = (np.asarray(losses[k][:steps], np.float64) for k in (a, b))
        worst = np.maximum(worst, np.abs(va - vb) / np.maximum(np.abs(vb), 1e-300))
    return np.maximum(worst, _FLOOR)


def _frameworks(plt, runs, backends, models, dtype):
    """(d) Every framework's training loss, overlaid (they lie on top of each other), with
    bnref's BN and without; under each, the largest relative loss difference between any two
    frameworks at each step (log scale), against the dtype's machine epsilon."""
    fig, axes = plt.subplots(4, len(models), figsize=(9, 12), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2, 3, 2]})
    eps = float(np.finfo(np.dtype(dtype)).eps) if dtype in ("float32", "float64") else None
    for col, model in enumerate(models):
        title = model.upper()
        for row, bn in ((0, "bnref"), (2, "none")):
            losses = {b: runs[f"{b}/{model}/{bn}"]["loss"] for b in backends
                      if f"{b}/{model}/{bn}" in runs}
            ax = axes[row, col]
            for backend, loss in losses.items():
                ls, lw = _STYLES.get(backend, ("-", 1.5))
                ax.plot(loss, ls=ls, lw=lw, label=backend)
            ax.set(title=f"{title}, {_BN[bn]}: loss", xlabel="step", ylabel="loss")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            diff, ax = _pairwise(losses), axes[row + 1, col]
            if diff is None:
                ax.text(0.5, 0.5, "one framework: nothing to compare", ha="center",
                        va="center", transform=ax.transAxes)
                ax.set(xticks=[], yticks=[])
            else:
                ax.semilogy(diff, "k.-", lw=0.4, ms=3)
                for level, text, va in ((eps, f"{dtype} eps", "bottom"),
                                        (_FLOOR, "exactly equal", "top")):
                    if level is not None:
                        ax.axhline(level, color="tab:gray", ls=":", lw=1)
                        ax.text(0.99, level, text, transform=ax.get_yaxis_transform(),
                                ha="right", va=va, fontsize=8, color="tab:gray")
                ax.set_ylim(_FLOOR / 100, max(diff.max(), eps or 0) * 100)
            ax.set(title=f"{title}, {_BN[bn]}: max relative difference", xlabel="step",
                   ylabel="max |a-b| / |b|, all pairs")
            ax.grid(alpha=0.3)
    fig.suptitle(f"{', '.join(backends)}: the same run in each framework")
    return fig


def _ported(plt, port):
    """(e) A torch-trained MLP (built-in BN) moved to Keras and trained on: with torch's
    momentum number copied unchanged ("ported naively") and through ``bnref.convert``; test
    accuracy and how far the BN running variances drift from the ported values."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    labels = {"naive": "ported naively", "converted": "moved with bnref.convert"}
    for (name, run), color in zip(port["runs"].items(), ("tab:red", "tab:blue"), strict=False):
        momentum = port.get("momentum", {}).get(name)
        label = labels.get(name, name) + (f" (Keras momentum {momentum:g})"
                                          if momentum is not None else "")
        axes[0].plot(run["eval_steps"], run["test_accuracy"], "o-", color=color, label=label)
        if run.get("running_var_drift"):
            axes[1].plot(run["record_steps"], run["running_var_drift"], color=color,
                         label=label)
    axes[0].set(title="Keras, after the port: test accuracy", xlabel="step of further training",
                ylabel="test accuracy")
    axes[1].set(title="BN running variance: drift", xlabel="step of further training",
                ylabel="mean |var(t) - var(ported)| / var(ported)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON data."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON data: {type(value).__name__}")


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _page(metrics: dict[str, Any], figures: list[tuple[str, str]], backends: list[str]) -> str:
    s = metrics.get("settings", {})
    ran = (f"Ran {', '.join(backends)} in {s.get('dtype', '?')}: MLP {s.get('mlp_steps', '?')} "
           f"steps, CNN {s.get('cnn_steps', '?')} steps, {metrics.get('seconds', 0):.0f} s "
           "in all, from the same initial weights on the same batches.")
    parts = ["<h1>bnref demo: batch norm, with and without, in every framework</h1>",
             f"<p>{html.escape(ran)}</p>"]
    for name, caption in figures:
        parts.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    notes = metrics.get("port", {}).get("notes", [])
    if notes:
        parts += ["<p>bnref.convert's notes on the port:</p>", "<ul>",
                  *(f"<li>{html.escape(str(n))}</li>" for n in notes), "</ul>"]
    agreement = metrics.get("agreement", {})
    parts += ["<h2>Agreement</h2>",
              f"<p>Largest relative loss difference over the run, |a - b| / |b|, in "
              f"{html.escape(str(s.get('dtype', '?')))}.</p>",
              _table(("frameworks (model/BN: pair)", "max relative difference"),
                     [(k, f"{v:.2e}") for k, v in agreement.get("frameworks", {}).items()]),
              _table(("bnref vs built-in (model: framework)", "max relative difference"),
                     [(k, f"{v:.2e}") for k, v in
                      agreement.get("bnref_vs_builtin", {}).items()])]
    parts += ["<h2>SGD with momentum</h2>",
              "<p>The frameworks write momentum SGD differently; with a constant learning rate "
              "it is one update.</p>",
              _table(("framework", "update"), list(metrics.get("sgd", {}).items()))]
    style = ("body{font-family:sans-serif;max-width:940px;margin:auto;padding:1em}"
             "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-style:italic}"
             "table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #aaa;padding:3px 8px;text-align:left}"
             "td:last-child{font-family:monospace}")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>bnref demo</title><style>{style}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(metrics: dict[str, Any], out: Path) -> list[Path]:
    """Write the plots (PNG), ``metrics.json`` and ``index.html`` into ``out``; return the
    files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = metrics["runs"]
    backends, models = _split(runs)
    ref = _reference(backends) if backends else "?"
    plots = [
        ("loss_accuracy.png", lambda: _loss_accuracy(plt, runs, backends, models),
         f"Training loss and test accuracy with and without BN ({ref})."),
        ("activations.png", lambda: _activations(plt, runs, backends, models),
         f"Each hidden block's activation mean and variance over training, with and without "
         f"BN ({ref})."),
        ("gradients.png", lambda: _gradients(plt, runs, backends, models),
         f"Each layer's gradient norm over training, with and without BN ({ref})."),
        ("frameworks.png", lambda: _frameworks(plt, runs, backends, models,
                                               metrics.get("settings", {}).get("dtype")),
         "Every framework's loss curve from the same start, and their largest relative "
         "difference per step."),
    ]
    port = metrics.get("port") or {}
    if port.get("runs"):
        plots.append(("ported.png", lambda: _ported(plt, port),
                      "A torch-trained model moved to Keras naively and with bnref.convert: "
                      "test accuracy and running-variance drift over further training."))
    written, figures = [], []
    for name, draw, caption in plots:
        fig = draw()
        fig.tight_layout()
        fig.savefig(out / name, dpi=_DPI)
        plt.close(fig)
        written.append(out / name)
        figures.append((name, caption))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_plain) + "\n")
    (out / "index.html").write_text(_page(metrics, figures, backends), encoding="utf-8")
    return [*written, out / "metrics.json", out / "index.html"]
