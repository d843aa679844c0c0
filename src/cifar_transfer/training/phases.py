"""The two phases' rules: which stages train in each, BatchNorm's mode, the optimizer and the
learning-rate schedule."""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from torch import nn

from ..errors import CifarTransferError
from ..model.network import TransferNet
from ..recipe import STEPS, Recipe, step_name


class TrainingError(CifarTransferError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


class Phase(IntEnum):
    """The two phases, numbered as history.csv, checkpoints and `lr-find --phase` number them."""

    HEAD = 1  # the base frozen: the head trains on its features
    FINETUNE = 2  # the base unfrozen from `finetune_from`: those stages train with the head


def trainable_stages(model: TransferNet, phase: Phase, recipe: Recipe) -> list[nn.Module]:
    """The backbone modules that train in this phase: none with the head, `finetune_from` onwards
    after."""
    if phase == Phase.HEAD:
        return []
    b = model.backbone
    names = STEPS[STEPS.index(step_name(recipe.finetune_from)) : STEPS.index("pool")]
    return [
        m for name in names for m in ([b.conv1, b.bn1] if name == "stem" else [model.block(name)])
    ]


def freeze_base(model: TransferNet, recipe: Recipe) -> list[nn.Parameter]:
    """Freeze the whole base, BatchNorm in inference mode: the head's parameters, which alone
    train."""
    return set_phase(model, Phase.HEAD, recipe)


def unfreeze_from(model: TransferNet, recipe: Recipe) -> list[nn.Parameter]:
    """Unfreeze the base from `finetune_from` on (BatchNorm there in the recipe's `finetune_bn`
    mode): the parameters that train with the head."""
    return set_phase(model, Phase.FINETUNE, recipe)


def set_phase(model: TransferNet, phase: Phase, recipe: Recipe) -> list[nn.Parameter]:
    """Freeze the base except the phase's trainable stages, put BatchNorm in the recipe's mode
    (frozen stages always in inference mode), and return the trainable parameters."""
    model.train()
    model.backbone.requires_grad_(False)
    trainable = trainable_stages(model, phase, recipe)
    for m in trainable:
        m.requires_grad_(True)
    learning_bn = (
        {id(m) for t in trainable for m in t.modules()} if recipe.finetune_bn == "train" else set()
    )
    for m in model.backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in learning_bn:
            m.eval()
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(
    params: list[nn.Parameter], phase: Phase, recipe: Recipe
) -> torch.optim.Optimizer:
    """Adam or SGD; weight decay on weights only, not on norms and biases."""
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    kind = recipe.head_optimizer if phase == Phase.HEAD else recipe.finetune_optimizer
    lr = recipe.head_lr if phase == Phase.HEAD else recipe.finetune_lr
    fused = params[0].is_cuda  # one kernel for all parameters; on CPU the default (foreach) is used
    if kind == "adam":
        # Keras's default epsilon, as in the seed
        return torch.optim.Adam(groups, lr=lr, eps=1e-7, fused=fused)
    return torch.optim.SGD(
        groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov, fused=fused
    )


def make_schedule(opt: torch.optim.Optimizer, phase: Phase, recipe: Recipe, steps_per_epoch: int):
    """Per-step learning-rate factor: constant in phase 1; in phase 2 linear warm-up, then constant
    or cosine."""
    total = recipe.finetune_epochs * steps_per_epoch
    warmup = round(recipe.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if phase == Phase.HEAD:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
