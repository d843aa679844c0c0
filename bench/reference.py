"""A deliberately plain two-phase loop: the baseline each speed-up in bench.py is measured against.

fp32, default memory layout, no feature caching (phase 1 runs the frozen base every epoch), the
optimizers' default implementations (never fused), and a host synchronisation every step
(`loss.item()`), as a first PyTorch port of the Keras recipe would be written. The mathematics is
the recipe's: the same optimizer, learning rates, weight decay on weights only, schedule and label
smoothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifar_transfer.data.augment import augment
from cifar_transfer.model.network import TransferNet
from cifar_transfer.recipe import Recipe
from cifar_transfer.training.phases import make_schedule, set_phase


def train_plain(
    model: TransferNet, recipe: Recipe, x: torch.Tensor, y: torch.Tensor
) -> list[float]:
    """Train in place on uint8 images `x` (N x 3 x 32 x 32) with labels `y`; return per-step
    losses."""
    gen = torch.Generator(device=x.device).manual_seed(recipe.seed)
    steps = -(-len(y) // recipe.batch_size)
    losses = []
    for phase, epochs in ((1, recipe.head_epochs), (2, recipe.finetune_epochs)):
        params = set_phase(model, phase, recipe)
        opt = plain_optimizer(params, phase, recipe)
        sched = make_schedule(opt, phase, recipe, steps)
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen, device=x.device)
            for i in range(steps):
                idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
                xb = augment(x[idx], recipe.augment, gen)
                loss = F.cross_entropy(
                    model(xb.float() / 255), y[idx], label_smoothing=recipe.label_smoothing
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
    return losses


def plain_optimizer(
    params: list[torch.nn.Parameter], phase: int, recipe: Recipe
) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if (recipe.head_optimizer if phase == 1 else recipe.finetune_optimizer) == "adam":
        return torch.optim.Adam(
            groups, lr=recipe.head_lr if phase == 1 else recipe.finetune_lr, eps=1e-7
        )
    return torch.optim.SGD(
        groups,
        lr=recipe.head_lr if phase == 1 else recipe.finetune_lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
    )


@torch.no_grad()
def accuracy_plain(
    model: TransferNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (
            (model(x[i : i + batch_size].float() / 255).argmax(1) == y[i : i + batch_size])
            .sum()
            .item()
        )
    return correct / len(y)
