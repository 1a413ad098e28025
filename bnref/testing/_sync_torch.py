"""Real multi-process runs of :class:`bnref.torch.SyncBatchNorm` for the synchronized property.

:class:`TorchSyncPool` starts ``world`` worker processes that join one gloo process group on
loopback (rendezvous through a file: no port to pick; gloo's own connections take ephemeral
ports) and create a process group of the first ``k`` ranks for every ``k`` up to ``world``.
Each :meth:`TorchSyncPool.run` sends one :class:`~bnref.testing.sync.SyncCase` to every
worker; ranks ``0..k-1`` each run one training step of a ``SyncBatchNorm`` over the group of
``k`` ranks on their shard (forward, then backward with their ``dy``) and send back ``y``, the
running statistics, ``dx``, ``dweight`` and ``dbias``. So Hypothesis can drive real
collectives one example at a time, the workers staying up between examples.

Every wait is bounded: the process group has a timeout, the parent waits for each answer at
most ``timeout`` seconds, and :meth:`TorchSyncPool.close` (also on ``with`` exit, and at
interpreter exit) ends the workers, killing them if they do not stop. A worker whose parent
goes away exits on the closed connection.

Run as ``python -m bnref.testing._sync_torch ADDRESS AUTHKEY RANK WORLD STORE``: a worker.
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import traceback
from datetime import timedelta
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from bnref.conventions import DEFAULT
from bnref.testing.sync import SyncCase, Synced

__all__ = ["TorchSyncPool", "run_torch_sync"]

STARTUP_TIMEOUT = 120.0  # seconds for every worker to import torch and join the group


class WorkerError(RuntimeError):
    """An exception inside a worker, with its traceback."""


class TorchSyncPool:
    """``world`` gloo ranks on this machine, kept up to run one case after another."""

    def __init__(self, world: int = 4, *, timeout: float = 120.0) -> None:
        self.world, self.timeout = world, timeout
        self._dir = tempfile.TemporaryDirectory(prefix="bnref-sync-")
        authkey = secrets.token_bytes(16)
        # The listening socket takes the default timeout at creation: accept() is bounded,
        # and the connections it returns are blocking (multiprocessing sets them so).
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(STARTUP_TIMEOUT)
        try:
            self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        finally:
            socket.setdefaulttimeout(previous)
        host, port = self._listener.address
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                               os.environ.get("PYTHONPATH", "")]))
        store = Path(self._dir.name) / "store"
        self._procs = [
            subprocess.Popen([sys.executable, "-m", "bnref.testing._sync_torch", f"{host}:{port}",
                              authkey.hex(), str(rank), str(world), str(store)], env=env)
            for rank in range(world)]
        atexit.register(self.close)
        self._conns: dict[int, Connection] = {}
        try:
            self._accept()
        except BaseException:
            self.close()
            raise

    def _accept(self) -> None:
        while len(self._conns) < self.world:
            try:
                conn = self._listener.accept()
            except TimeoutError as error:
                raise TimeoutError(f"torch sync workers did not start in {STARTUP_TIMEOUT} s "
                                   f"(exit codes {[p.poll() for p in self._procs]})") from error
            rank = conn.recv()
            self._conns[rank] = conn
        for rank in range(self.world):  # every rank has joined the group and made the groups
            self._receive(rank, STARTUP_TIMEOUT)

    def _receive(self, rank: int, timeout: float) -> Any:
        conn = self._conns[rank]
        if not conn.poll(timeout):
            self.close()
            raise TimeoutError(f"torch sync worker {rank} did not answer in {timeout} s")
        status, value = conn.recv()
        if status == "error":
            raise WorkerError(f"rank {rank}:\n{value}")
        return value

    def run(self, sc: SyncCase) -> Synced:
        """One training step of ``SyncBatchNorm`` on ``sc``'s shards over its ``k`` ranks."""
        if not 1 <= sc.k <= self.world:
            raise ValueError(f"the pool has {self.world} ranks, the case needs {sc.k}")
        for conn in self._conns.values():
            conn.send(sc)
        answers = [self._receive(rank, self.timeout) for rank in range(self.world)][:sc.k]
        return Synced(*(list(values) for values in zip(*answers, strict=True)))

    def close(self) -> None:
        for conn in getattr(self, "_conns", {}).values():
            try:
                conn.send(None)
                conn.close()
            except OSError:
                pass
        for proc in getattr(self, "_procs", []):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._conns, self._procs = {}, []
        if hasattr(self, "_listener"):
            self._listener.close()
            self._dir.cleanup()
            del self._listener

    def __enter__(self) -> TorchSyncPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_torch_sync(cases: list[SyncCase], *, timeout: float = 120.0) -> list[Synced]:
    """Every case through one pool as large as the largest ``k``."""
    with TorchSyncPool(max(sc.k for sc in cases), timeout=timeout) as pool:
        return [pool.run(sc) for sc in cases]


# -- the worker -------------------------------------------------------------------------------


def _step(sc: SyncCase, group: Any) -> tuple:
    """This rank's training step: (y, running_mean, running_var, dx, dweight, dbias)."""
    import torch
    import torch.distributed as dist

    import bnref.torch as bt
    from bnref.testing._torch import to_numpy, to_tensor

    rank = dist.get_rank()
    case = sc.case
    shard, dy = sc.shards[rank], sc.dys[rank] if sc.dy is not None else None
    channels = case.x.shape[case.channel_axis]
    options = {"eps": case.eps, "axis": case.axis, "convention": case.convention}
    if case.momentum is not DEFAULT:
        options["momentum"] = case.momentum
    stats = case.running_mean is not None
    layer = bt.SyncBatchNorm(channels, affine=case.gamma is not None or case.beta is not None,
                             bias=case.beta is not None, track_running_stats=stats,
                             process_group=group, dtype=torch.float64
                             if case.dtype == "float64" else torch.float32, **options)
    with torch.no_grad():
        if case.gamma is not None:
            layer.weight.copy_(to_tensor(case.gamma))
        elif layer.weight is not None:  # beta alone: a weight of ones, not learned
            layer.weight.requires_grad_(False)
        if case.beta is not None:
            layer.bias.copy_(to_tensor(case.beta))
        if stats:
            layer.running_mean.copy_(to_tensor(case.running_mean))
            layer.running_var.copy_(to_tensor(case.running_var))
    x = to_tensor(shard).requires_grad_(dy is not None)
    y = layer(x)
    dx = dgamma = dbeta = None
    if dy is not None:
        y.backward(to_tensor(dy))
        dx = to_numpy(x.grad)
        if case.gamma is not None:
            dgamma = to_numpy(layer.weight.grad)
        if case.beta is not None:
            dbeta = to_numpy(layer.bias.grad)
    mean = to_numpy(layer.running_mean) if stats else None
    var = to_numpy(layer.running_var) if stats else None
    return to_numpy(y.detach()), mean, var, dx, dgamma, dbeta


def _worker(address: str, authkey: str, rank: int, world: int, store: str) -> None:
    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(authkey))
    conn.send(rank)
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        # Every rank makes every group, in one order (new_group is itself collective).
        groups = {k: dist.new_group(list(range(k))) for k in range(1, world + 1)}
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            sc = conn.recv()
        except EOFError:  # the parent went away
            break
        if sc is None:
            break
        try:
            result = _step(sc, groups[sc.k]) if rank < sc.k else (None,) * 6
            conn.send(("ok", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
