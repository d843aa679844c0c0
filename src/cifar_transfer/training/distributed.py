"""Several processes, one run: `torchrun --nproc_per_node=N -m cifar_transfer run ...` (and
`--nnodes`, `--rdzv-endpoint` across machines), as torchvision's reference scripts do it.

Each process (rank) finds its place in torchrun's environment; NCCL joins GPUs (one per process),
gloo joins CPU processes. A plain `cifar-transfer run` is a world of one and touches none of this.
Work is split by rows: every rank takes a contiguous share of a batch, of the images whose
activations are cached, of the validation and test images, and `gather` puts the pieces back
together in order on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CifarTransferError


class DistributedError(CifarTransferError):
    """A world that cannot run the recipe (a batch that does not divide, a device missing)."""


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's processes; the default is a plain, single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0 alone writes outputs and checkpoints."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n rows (shares differ by at most one row)."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def describe(self) -> dict:
        return {"world_size": self.size, "backend": self.backend, "rank": self.rank}


ALONE = World()  # a plain process


def join(device: str = "auto") -> World:
    """The world torchrun started this process in (WORLD_SIZE, RANK, LOCAL_RANK), joined; a world of
    one without torchrun.

    CUDA processes use the GPU of their local rank and NCCL; CPU processes use gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return ALONE
    if dist.is_initialized():  # joined already (a second run in the same process)
        return World(
            dist.get_rank(), size, int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend()
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): give "
                "torchrun --nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    return World(dist.get_rank(), size, local_rank, backend)


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per process: a CUDA rank trains on the GPU of its local rank."""
    return (
        torch.device("cuda", world.local_rank)
        if world.size > 1 and device.type == "cuda"
        else device
    )


def gather(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's `rows` share of a tensor, concatenated in rank order, on every rank."""
    if world.size == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world.size)]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])


def total(x: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `x` over all ranks, on every rank."""
    if world.size > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def joined(device: str = "auto") -> Iterator[World]:
    """`join` for the length of a run, then leave (a world of one joins nothing)."""
    world = join(device)
    try:
        yield world
    finally:
        leave(world)
