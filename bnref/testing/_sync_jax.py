"""Real multi-device runs of ``bnref.jax.batch_norm(..., axis_name=)`` for the synchronized
property: :func:`run_jax_sync` runs every case under ``jax.shard_map`` over k host CPU devices,
in one bounded subprocess (``--xla_force_host_platform_device_count`` must be set before JAX
is imported).

JAX's collectives need one shape on every device, so the shards must be equal
(``sync_cases(even=True)``). Each device runs ``batch_norm`` on its shard with its own copy of
the parameters (a leading device axis, as the data), and the vjp with its ``dy``: ``dgamma``/
``dbeta`` per device are its parts, as data-parallel training has them.

Run as ``python -m bnref.testing._sync_jax CASES RESULTS``: the subprocess.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from bnref.conventions import DEFAULT
from bnref.testing.sync import SyncCase, Synced

__all__ = ["run_jax_sync"]

AXIS = "workers"


def run_jax_sync(cases: list[SyncCase], *, timeout: float = 240.0) -> list[Synced]:
    """Every case under ``shard_map`` over its ``k`` devices, in one subprocess."""
    devices = max(sc.k for sc in cases)
    for sc in cases:
        if len(set(sc.sizes)) != 1:
            raise ValueError(f"JAX's collectives need equal shards, got sizes {sc.sizes}")
    with tempfile.TemporaryDirectory(prefix="bnref-sync-jax-") as folder:
        cases_path, results_path = Path(folder) / "cases.pkl", Path(folder) / "results.pkl"
        cases_path.write_bytes(pickle.dumps(cases))
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={devices}").strip(),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                              os.environ.get("PYTHONPATH", "")])}
        # run() kills the subprocess when it outlives the timeout: nothing is left running.
        done = subprocess.run([sys.executable, "-m", "bnref.testing._sync_jax", str(cases_path),
                               str(results_path)], env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the JAX device worker exited with {done.returncode}:\n"
                               f"{done.stderr[-4000:]}")
        results = pickle.loads(results_path.read_bytes())
    out = []
    for status, value in results:
        if status != "ok":
            raise RuntimeError(f"the JAX device worker raised:\n{value}")
        out.append(value)
    return out


def _run(sc: SyncCase) -> Synced:
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec

    import bnref.jax as bj

    case, k = sc.case, sc.k
    options = sc.options()
    if case.momentum is DEFAULT:
        options.pop("momentum", None)
    names = ("gamma", "beta", "running_mean", "running_var")
    params = {name: np.stack([value] * k) for name, value in zip(names, case.arrays[1:],
                                                                 strict=True)
              if value is not None}
    xs = np.stack(sc.shards)
    dys = np.stack(sc.dys) if sc.dy is not None else np.zeros_like(xs)

    def member(xk, dyk, params):
        def forward(xk, gamma, beta):
            y, mean, var = bj.batch_norm(xk, gamma, beta, params.get("running_mean"),
                                         params.get("running_var"), training=True,
                                         axis_name=AXIS, **options)
            return y, (mean, var)

        y, pullback, (mean, var) = jax.vjp(forward, xk, params.get("gamma"),
                                           params.get("beta"), has_aux=True)
        dx, dgamma, dbeta = pullback(dyk)
        return {"y": y, "mean": mean, "var": var, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}

    mesh = jax.make_mesh((k,), (AXIS,), devices=jax.devices()[:k])

    def body(xs, dys, params):
        first = jax.tree.map(lambda a: a[0], (xs, dys, params))
        return jax.tree.map(lambda a: a[None], member(*first))

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(AXIS),
                                out_specs=PartitionSpec(AXIS)))(xs, dys, params)
    out = {name: None if value is None else list(np.asarray(value))
           for name, value in out.items()}
    if sc.dy is None:
        out["dx"] = out["dgamma"] = out["dbeta"] = None
    return Synced(out["y"], out["mean"], out["var"], out["dx"], out["dgamma"], out["dbeta"])


def _worker(cases_path: str, results_path: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 cases stay float64
    cases = pickle.loads(Path(cases_path).read_bytes())
    results: list[tuple[str, Any]] = []
    for sc in cases:
        try:
            results.append(("ok", _run(sc)))
        except Exception:
            results.append(("error", traceback.format_exc()))
    Path(results_path).write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
