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
        return self._answers([rank], timeout)[0]

    def _answers(self, ranks: list[int], timeout: float) -> list[Any]:
        """Every rank's answer (all of them read, so the next call starts in step), then the
        first worker error, if any, raised."""
        answers, errors = [], []
        for rank in ranks:
            conn = self._conns[rank]
            if not conn.poll(timeout):
                self.close()
                raise TimeoutError(f"torch sync worker {rank} did not answer in {timeout} s")
            status, value = conn.recv()
            answers.append(value)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise WorkerError("\n".join(errors))
        return answers

    def call(self, function: str, k: int, payload: Any) -> list[Any]:
        """``function(payload, group)`` on ranks ``0..k-1`` with ``group`` the process group
        of those ranks; their answers, in rank order. ``function`` is ``"module:name"`` (or a
        name in this module), importable in the workers."""
        if not 1 <= k <= self.world:
            raise ValueError(f"the pool has {self.world} ranks, the call needs {k}")
        for conn in self._conns.values():
            conn.send((function, k, payload))
        return self._answers(list(range(self.world)), self.timeout)[:k]

    def run(self, sc: SyncCase) -> Synced:
        """One training step of ``SyncBatchNorm`` on ``sc``'s shards over its ``k`` ranks."""
        answers = self.call("step", sc.k, sc)
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


def make_layer(sc: SyncCase, group: Any, cls: Any = None):
    """A ``SyncBatchNorm`` (or ``cls``) over ``group`` with ``sc``'s parameters and state.
    A case with beta but no gamma gets a weight of ones that is not learned (the same
    arithmetic: multiplying by 1 is exact)."""
    import torch

    import bnref.torch as bt
    from bnref.testing._torch import to_tensor

    case = sc.case
    channels = case.x.shape[case.channel_axis]
    options: dict[str, Any] = {"eps": case.eps, "axis": case.axis,
                               "convention": case.convention}
    if case.momentum is not DEFAULT:
        options["momentum"] = case.momentum
    if cls is None:
        cls, options["process_group"] = bt.SyncBatchNorm, group
    stats = case.running_mean is not None
    layer = cls(channels, affine=case.gamma is not None or case.beta is not None,
                bias=case.beta is not None, track_running_stats=stats,
                dtype=torch.float64 if case.dtype == "float64" else torch.float32, **options)
    with torch.no_grad():
        if case.gamma is not None:
            layer.weight.copy_(to_tensor(case.gamma))
        elif layer.weight is not None:
            layer.weight.requires_grad_(False)
        if case.beta is not None:
            layer.bias.copy_(to_tensor(case.beta))
        if stats:
            layer.running_mean.copy_(to_tensor(case.running_mean))
            layer.running_var.copy_(to_tensor(case.running_var))
    return layer


def _train_step(layer: Any, sc: SyncCase, rank: int) -> tuple:
    from bnref.testing._torch import to_numpy, to_tensor

    case = sc.case
    dy = sc.dys[rank] if sc.dy is not None else None
    x = to_tensor(sc.shards[rank]).requires_grad_(dy is not None)
    y = layer(x)
    dx = dgamma = dbeta = None
    if dy is not None:
        y.backward(to_tensor(dy))
        dx = to_numpy(x.grad)
        dgamma = to_numpy(layer.weight.grad) if case.gamma is not None else None
        dbeta = to_numpy(layer.bias.grad) if case.beta is not None else None
    stats = case.running_mean is not None
    return (to_numpy(y.detach()), to_numpy(layer.running_mean) if stats else None,
            to_numpy(layer.running_var) if stats else None, dx, dgamma, dbeta)


def step(sc: SyncCase, group: Any) -> tuple:
    """This rank's training step: (y, running_mean, running_var, dx, dweight, dbias)."""
    import torch.distributed as dist

    return _train_step(make_layer(sc, group), sc, dist.get_rank())


def step_beside_plain(sc: SyncCase, group: Any) -> tuple[tuple, tuple]:
    """The same step through ``SyncBatchNorm`` over ``group`` and through
    ``bnref.torch.BatchNorm``: equal when ``group`` has one rank."""
    import torch.distributed as dist

    import bnref.torch as bt

    rank = dist.get_rank()
    return (_train_step(make_layer(sc, group), sc, rank),
            _train_step(make_layer(sc, group, bt.BatchNorm), sc, rank))


def alone_in_eval(sc: SyncCase, group: Any) -> Any:
    """Rank 0 runs its layer in ``eval()`` while the other ranks of ``group`` do nothing:
    any collective would wait for them (until the group's timeout)."""
    import torch
    import torch.distributed as dist

    from bnref.testing._torch import to_numpy, to_tensor

    if dist.get_rank() != 0:
        return None
    layer = make_layer(sc, group).eval()
    with torch.no_grad():
        return to_numpy(layer(to_tensor(sc.shards[0])))


def builtin_on_cpu(sc: SyncCase, group: Any) -> str:
    """What ``torch.nn.SyncBatchNorm`` does with a CPU tensor in training over ``group``."""
    import torch
    import torch.distributed as dist

    from bnref.testing._torch import to_tensor

    layer = torch.nn.SyncBatchNorm(sc.case.x.shape[1], process_group=group)
    try:
        layer(to_tensor(sc.shards[dist.get_rank()]))
    except Exception as error:  # the refusal is the point: report it
        return f"{type(error).__name__}: {error}"
    return "ran"


def _resolve(function: str):
    import importlib

    module, _, name = function.rpartition(":")
    return getattr(importlib.import_module(module or __name__), name)


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
            message = conn.recv()
        except EOFError:  # the parent went away
            break
        if message is None:
            break
        try:
            function, k, payload = message
            result = _resolve(function)(payload, groups[k]) if rank < k else None
            conn.send(("ok", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
