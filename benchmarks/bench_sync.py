"""What synchronizing batch norm costs: a training step with and without it, in the same run.

    python benchmarks/bench_sync.py [--repeats 5] [--batch 32]

torch: two gloo ranks on this machine (one thread each), each running a data-parallel
training step (``DistributedDataParallel``: forward, backward, gradient all-reduce) of conv 3x3
(64 -> 64) + batch norm + ReLU on its own (batch, 64, 28, 28) float32 batch:
``bnref.torch.SyncBatchNorm`` over both ranks against ``bnref.torch.BatchNorm``, alternating
rounds in both ranks at once. The sync layer adds one all-gather of 2C + 1 numbers in the
forward and one all-reduce of 2C in the backward, and each is a point where the faster rank
waits for the slower; the target is a ratio <= 1.3.

jax: the same block's batch norm step (forward and gradient of ``bnref.jax.batch_norm``, NHWC)
under ``jax.shard_map`` over two host CPU devices, with ``axis_name=`` (two psums forward,
two backward) against the same function without it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import medians, reuse_freed_memory

TARGET = 1.3


def torch_rank(rank: int, world: int, store: str, repeats: int, batch: int) -> None:
    import torch
    import torch.distributed as dist

    import bnref.torch as bt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    torch.manual_seed(rank)
    x = torch.randn(batch, 64, 28, 28) * 2 + 1

    def step_with(norm: torch.nn.Module):
        torch.manual_seed(0)
        block = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(
            torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), norm, torch.nn.ReLU()))

        def step() -> None:
            block.zero_grad(set_to_none=True)
            block(x).sum().backward()
        return step

    plain, synced = medians(step_with(bt.BatchNorm(64)), step_with(bt.SyncBatchNorm(64)),
                            repeats)
    if rank == 0:
        print(f"torch {torch.__version__}, {world} gloo ranks, 1 thread each, per-rank batch "
              f"({batch}, 64, 28, 28) float32, DDP(conv3x3 + BN + ReLU), forward+backward")
        print(f"  BatchNorm (unsynchronized) {plain * 1e3:8.1f} ms")
        print(f"  SyncBatchNorm              {synced * 1e3:8.1f} ms   ratio "
              f"{synced / plain:.2f} (target <= {TARGET})")
    dist.destroy_process_group()


def run_torch(repeats: int, batch: int) -> None:
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        procs = [subprocess.Popen([sys.executable, __file__, "--torch-rank", str(rank),
                                   "--store", store, "--repeats", str(repeats),
                                   "--batch", str(batch)], env=env)
                 for rank in range(world)]
        try:
            codes = [proc.wait(timeout=600) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        if any(codes):
            raise SystemExit(f"torch ranks failed: exit codes {codes}")


def run_jax(repeats: int, batch: int) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    import bnref.jax as bj

    devices = jax.devices()[:2]
    mesh = jax.make_mesh((2,), ("data",), devices=devices)
    x = jax.random.normal(jax.random.key(0), (2 * batch, 28, 28, 64), jnp.float32) * 2 + 1
    gamma, beta = jnp.ones(64), jnp.zeros(64)

    def step(axis_name):
        def loss(x, gamma, beta):
            y, _, _ = bj.batch_norm(x, gamma, beta, None, None, training=True,
                                    convention="flax", axis_name=axis_name)
            return jnp.sum(jax.nn.relu(y))

        def body(x, gamma, beta):
            return jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta)

        spec = PartitionSpec("data")
        run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, PartitionSpec(),
                                                               PartitionSpec()),
                                    out_specs=(spec, spec, spec), check_vma=False))
        return lambda: jax.block_until_ready(run(x, gamma, beta))

    plain, synced = medians(step(None), step("data"), repeats)
    print(f"jax {jax.__version__}, shard_map over 2 host CPU devices, per-device batch "
          f"({batch}, 28, 28, 64) float32, batch_norm forward+gradient")
    print(f"  without axis_name {plain * 1e3:8.1f} ms")
    print(f"  axis_name='data'  {synced * 1e3:8.1f} ms   ratio {synced / plain:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--torch-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--jax", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_rank is not None:
        torch_rank(args.torch_rank, 2, args.store, args.repeats, args.batch)
    elif args.jax:
        run_jax(args.repeats, args.batch)
    else:
        run_torch(args.repeats, args.batch)
        # JAX needs its device count before it is imported: a process of its own.
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        subprocess.run([sys.executable, __file__, "--jax", "--repeats", str(args.repeats),
                        "--batch", str(args.batch)], env=env, check=True, timeout=600)


if __name__ == "__main__":
    reuse_freed_memory()
    main()
