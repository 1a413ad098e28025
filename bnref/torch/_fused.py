"""The training kernels of :mod:`bnref.torch.functional` as compiled, fused loops, for large
CPU inputs.

The same formulas as the eager kernels (the same pilot, the same shifted sums), written once
more as whole-tensor expressions and compiled by ``torch.compile`` (Inductor's C++/OpenMP
code), so that each pass over memory is one loop instead of a few eager operations per cache
chunk::

    pilot      = first + mean(x[:k] - first)        (the eager kernels' pilot, k rows)
    sum_d      = sum(x - pilot),  sum_d2 = sum((x - pilot)²)          one read of x
    y          = (x - pilot) * scale + (shift - delta * scale)        one read, one write
    sum_dy     = sum(dy),  sum_dyd = sum(dy * (x - pilot))            one read of x and dy
    dx         = a * dy + b * (x - pilot) + k                         one read each, one write

Sums over a channels-innermost view ``(rows, C)`` are split into ``_SPLIT`` row blocks first:
a plain reduction over the outer axis runs on one thread in the generated code.

The compile is paid once per process for each kernel and each dtype/layout class (sizes are
dynamic, so a new shape does not recompile): about 2-6 s cold, under 1 s when Inductor's
on-disk cache already holds the code. Used only for CPU tensors of at least
:data:`MIN_NUMEL` elements, outside ``torch.func`` transforms and outside a user's own
``torch.compile`` (which fuses the eager kernels itself). ``BNREF_TORCH_FUSED=0`` turns it off;
if compiling fails (no C++ compiler, say), a warning says so once and the eager kernels run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

# Below this the eager kernels are a chunk or two and the compiled call's own overhead
# (guards, argument handling: ~30 µs) would be a visible share.
MIN_NUMEL = 1 << 20
_SPLIT = 256
_enabled = os.environ.get("BNREF_TORCH_FUSED", "1") != "0"
_compiled: dict[Callable, Callable] = {}


def is_transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform, or batched by the legacy vmap
    that gradcheck's batched-gradient check uses: batched tensors cannot be written through
    ``out=`` (the eager kernels) nor passed to a compiled function (these)."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace these queries (and needs none)
        return False
    functorch = torch._C._functorch
    return functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t)


def usable(x3: torch.Tensor) -> bool:
    """Whether the ``(before, C, after)`` view ``x3`` goes through the fused kernels."""
    if not _enabled or x3.device.type != "cpu" or x3.numel() < MIN_NUMEL:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return not is_transformed(x3)


def run(kernel: Callable, *args):
    """``kernel(*args)`` compiled, or ``None`` (eager kernels then) if compiling fails."""
    global _enabled
    compiled = _compiled.get(kernel)
    if compiled is None:
        compiled = _compiled[kernel] = torch.compile(kernel, dynamic=True, fullgraph=True)
    try:
        # Compiling emits torch's own deprecation warnings, which a user's "-W error" (or
        # pytest's filterwarnings = error) would turn into a failed compile: not theirs to see.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compiled(*args)
    except Exception as error:  # any compiler failure means: run the eager kernels
        _enabled = False
        warnings.warn(f"bnref.torch: the compiled kernels are unavailable ({type(error).__name__}"
                      f": {str(error).splitlines()[0] if str(error) else ''}); the eager "
                      "kernels run instead", RuntimeWarning, stacklevel=3)
        return None


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of a ``(before, C, after)`` tensor."""
    before, channels, after = t.shape
    if after != 1:
        return t.sum((0, 2))
    rows = before // _SPLIT * _SPLIT
    head = t[:rows].reshape(_SPLIT, -1, channels).sum(1).sum(0)
    return head + t[rows:].sum((0, 2))


def moments(x3: torch.Tensor, pilot_rows: int, dtype: torch.dtype):
    """(pilot, delta, var) per channel: the mean is ``pilot + delta``, ``var`` biased."""
    first = x3[:1, :, :1].to(dtype)
    head = x3[:pilot_rows].to(dtype) - first
    pilot = first + (head.sum((0, 2), keepdim=True) / (pilot_rows * x3.shape[2]))
    d = x3.to(dtype) - pilot
    n = x3.shape[0] * x3.shape[2]
    delta = _channel_sum(d) / n
    var = (_channel_sum(d * d) / n - delta * delta).clamp_min(0)
    return pilot.view(-1), delta, var


def normalized(x3: torch.Tensor, pilot: torch.Tensor, delta: torch.Tensor,
               scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    shift = shift - delta * scale
    d = x3.to(scale.dtype) - pilot.view(1, -1, 1)
    return (d * scale.view(1, -1, 1) + shift.view(1, -1, 1)).to(x3.dtype)


def gradient_sums(x3: torch.Tensor, dy3: torch.Tensor, pilot: torch.Tensor,
                  delta: torch.Tensor):
    dy = dy3.to(pilot.dtype)
    sum_dy = _channel_sum(dy)
    sum_dyd = _channel_sum(dy * (x3.to(pilot.dtype) - pilot.view(1, -1, 1)))
    return sum_dy, sum_dyd - delta * sum_dy


def input_gradient(x3: torch.Tensor, dy3: torch.Tensor, pilot: torch.Tensor,
                   a: torch.Tensor, b: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    d = x3.to(pilot.dtype) - pilot.view(1, -1, 1)
    dx = dy3.to(pilot.dtype) * a.view(1, -1, 1) + d * b.view(1, -1, 1) + k.view(1, -1, 1)
    return dx.to(x3.dtype)
