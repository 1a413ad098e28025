"""The demo's models in PyTorch: ``torch.nn`` layers, ``torch.optim.SGD``, ``F.cross_entropy``."""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnref.demo.core import MODELS, Job, RunResult, from_out_in, to_out_in

__all__ = ["train"]


def _norm(job: Job, channels: int, two_d: bool) -> nn.Module:
    """BN with torch's momentum (the new batch's weight) and the shared eps."""
    h = job.hyper
    if job.bn == "bnref":
        import bnref.torch as bt

        cls = bt.BatchNorm2d if two_d else bt.BatchNorm1d
    else:
        cls = nn.BatchNorm2d if two_d else nn.BatchNorm1d
    return cls(channels, eps=h.bn_eps, momentum=h.bn_new_weight)


class _Net(nn.Module):
    """Hidden blocks (kernel layer, optional BN) then the output layer; the forward keeps each
    block's pre-ReLU activation."""

    def __init__(self, job: Job) -> None:
        super().__init__()
        bn = job.bn != "none"
        if job.model == "mlp":
            widths = MODELS["mlp"]["widths"]
            self.layers = nn.ModuleList(nn.Linear(a, b)
                                        for a, b in itertools.pairwise(widths[:-1]))
            self.norms = nn.ModuleList(_norm(job, w, False) for w in widths[1:-1]) if bn else None
            self.head = nn.Linear(widths[-2], widths[-1])
        else:
            spec = MODELS["cnn"]
            chans = spec["channels"]
            self.layers = nn.ModuleList(nn.Conv2d(a, b, spec["kernel"], padding=1)
                                        for a, b in itertools.pairwise(chans))
            self.norms = nn.ModuleList(_norm(job, c, True) for c in chans[1:]) if bn else None
            self.head = nn.Linear(chans[-1], spec["classes"])
        self.conv = job.model == "cnn"
        self.pre_relu: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pre_relu = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x)
            self.pre_relu.append(x)
            x = torch.relu(x)
        if self.conv:
            x = x.mean(dim=(2, 3))
        return self.head(x)

    def kernels(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.layers] + [self.head.weight]


def _parameters(net: _Net) -> dict[str, torch.Tensor]:
    """Canonical name -> the tensor that holds it."""
    out: dict[str, torch.Tensor] = {}
    prefix = "dense" if not net.conv else "conv"
    for i, layer in enumerate(net.layers):
        out[f"{prefix}{i}/kernel"], out[f"{prefix}{i}/bias"] = layer.weight, layer.bias
        if net.norms is not None:
            norm = net.norms[i]
            out.update({f"bn{i}/gamma": norm.weight, f"bn{i}/beta": norm.bias,
                        f"bn{i}/running_mean": norm.running_mean,
                        f"bn{i}/running_var": norm.running_var})
    head = len(net.layers)
    out[f"dense{head}/kernel"], out[f"dense{head}/bias"] = net.head.weight, net.head.bias
    return out


def build(job: Job) -> _Net:
    dtype = getattr(torch, job.dtype)
    net = _Net(job).to(dtype)
    with torch.no_grad():
        for name, tensor in _parameters(net).items():
            tensor.copy_(torch.from_numpy(to_out_in(name, job.weights[name])))
    return net


def state(net: _Net) -> dict[str, np.ndarray]:
    return {name: from_out_in(name, t.detach().double().numpy())
            for name, t in _parameters(net).items()}


def train(job: Job) -> RunResult:
    start = time.perf_counter()
    torch.manual_seed(0)
    dtype = getattr(torch, job.dtype)
    net = build(job)
    optimizer = torch.optim.SGD(net.parameters(), lr=job.hyper.lr, momentum=job.hyper.momentum)
    x_train = torch.from_numpy(job.x_train).to(dtype)
    y_train = torch.from_numpy(job.y_train)
    x_test = torch.from_numpy(job.x_test).to(dtype)
    y_test = torch.from_numpy(job.y_test)
    result = RunResult()
    for step, rows in enumerate(job.batches):
        index = torch.from_numpy(rows)
        net.train()
        loss = F.cross_entropy(net(x_train[index]), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        result.loss.append(loss.item())
        if job.records_at(step):
            result.record(step, [a.detach().numpy() for a in net.pre_relu],
                          [k.grad.numpy() for k in net.kernels()],
                          [n.running_var.numpy() for n in net.norms or ()])
        optimizer.step()
        if job.evaluates_at(step):
            net.eval()
            with torch.no_grad():
                predicted = net(x_test).argmax(dim=1)
            result.eval_steps.append(step)
            result.test_accuracy.append(float((predicted == y_test).double().mean()))
        job.tick(step)
    result.final = state(net)
    result.seconds = time.perf_counter() - start
    return result
