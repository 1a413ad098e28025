"""Data-parallel training with synchronized batch norm on CPU: torch.distributed + gloo + DDP.

Every process builds the same small conv net with ``torch.nn.BatchNorm2d`` layers, converts
them with ``bnref.torch.SyncBatchNorm.convert_sync_batchnorm``, wraps the model in
``DistributedDataParallel`` and trains on its equal share of each batch. Synchronized batch
norm normalises with the statistics of the whole batch, and DDP averages the gradients, so
every rank ends with the weights (and running statistics) one process gets by training on the
whole batches.

Two processes on this machine::

    torchrun --standalone --nproc-per-node 2 examples/ddp_sync_batchnorm.py

Across machines, the same script with torchrun's rendezvous on each of them::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 --rdzv-id job1 examples/ddp_sync_batchnorm.py

Without torchrun it trains in one process (SyncBatchNorm outside a process group is the plain
bnref layer): the reference the distributed run must reproduce.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bnref.torch as bt


def build_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The conv net with torch's own batch norm, as a model would be written."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return model.to(dtype)


def batches(steps: int, size: int, dtype: torch.dtype,
            seed: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same full batches on every rank (images with a non-zero mean, random labels)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images = torch.randn(size, 3, 12, 12, generator=generator, dtype=dtype) * 2 + 3
        labels = torch.randint(0, 10, (size,), generator=generator)
        yield images, labels


def train(model: nn.Module, steps: int, size: int, rank: int, world: int,
          dtype: torch.dtype) -> list[float]:
    """SGD with momentum; each rank takes its equal share of every batch. Returns the
    rank's losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for images, labels in batches(steps, size, dtype):
        images, labels = images.chunk(world)[rank], labels.chunk(world)[rank]
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="the full batch, over all ranks")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", help="save each rank's final state_dict in this directory")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")  # nccl on GPUs; SyncBatchNorm works with either
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must split evenly over {world} ranks")

    model = bt.SyncBatchNorm.convert_sync_batchnorm(build_model(dtype))
    trained = DistributedDataParallel(model) if distributed else model
    losses = train(trained, args.steps, args.batch, rank, world, dtype)
    print(f"rank {rank} of {world}: loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"after {args.steps} steps")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(args.out, f"rank{rank}.pt"))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
