"""Every random stream of training, drawn from the recipe's seed by one rule:

- the batch order: `seed`, the same on every rank (each rank takes its share of every global batch);
- augmentation: one process draws it from the order's own generator; rank r of several from
  `seed + AUGMENTATION_STRIDE * r`, so no two ranks share draws;
- the shifted copies `flip+noise` caches: `seed + SHIFTED_COPY_OFFSET`, the same on every rank
  (drawn once);
- dropout and the head's initialisation: torch's global generator, seeded with `seed`.

The offsets are primes far apart, so the streams of nearby seeds never coincide. Checkpoints keep
the generators' states, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import torch

from .distributed import World

AUGMENTATION_STRIDE = 7919
SHIFTED_COPY_OFFSET = 104729


def order_and_augmentation(
    seed: int, device: torch.device, world: World
) -> tuple[torch.Generator, torch.Generator]:
    """The batch order's generator and this rank's augmentation generator (one object in a single
    process)."""
    order = torch.Generator(device=device).manual_seed(seed)
    if world.size == 1:
        return order, order
    return order, torch.Generator(device=device).manual_seed(
        seed + AUGMENTATION_STRIDE * world.rank
    )


def shifted_copies(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed + SHIFTED_COPY_OFFSET)
