"""The forward passes a phase runs, from its first trainable step on: one for evaluation, one for
training (under torchrun wrapped in DistributedDataParallel, which averages the gradients), each
compiled as the recipe says."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..model.network import Part, TransferNet
from ..recipe import Recipe
from .distributed import World

Forward = Callable[[torch.Tensor], torch.Tensor]


def forward_passes(
    model: TransferNet, begin: str, recipe: Recipe, world: World
) -> tuple[Forward, Forward]:
    """(evaluate, learn): the steps from `begin` on, the second with gradients averaged across
    ranks."""
    evaluate = compiled(Part(model, begin), recipe.compile)  # no gradients to average
    if world.size == 1:
        return evaluate, evaluate
    cuda = model.mean.is_cuda
    ddp = DistributedDataParallel(
        Part(model, begin),
        device_ids=[model.mean.device] if cuda else None,
        broadcast_buffers=False,
    )
    return evaluate, compiled(ddp, recipe.compile)


def compiled(part: nn.Module, mode: str) -> Forward:
    """`part`, compiled unless mode is "off" ("reduce-overhead" captures CUDA graphs: no per-kernel
    launch cost).

    The batch dimension is dynamic from the first call, so each module mode (training, evaluation)
    compiles once per phase: the ragged last batch and the evaluation batch size reuse its graph.
    """
    if mode == "off":
        return part
    module = torch.compile(part, mode=None if mode == "default" else mode)

    def forward(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return module(x)

    return forward
