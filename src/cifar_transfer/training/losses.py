"""The training loss: cross-entropy (with the recipe's label smoothing), plus AugMix's Jensen-
Shannon consistency term where the recipe asks for it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..recipe import Recipe


def training_loss(
    out: torch.Tensor, y: torch.Tensor, mixed: torch.Tensor | None, recipe: Recipe
) -> torch.Tensor:
    """Cross-entropy on the batch's own rows (`out[:len(y)]`); with `mixed`, plus
    `recipe.consistency` times the Jensen-Shannon divergence among each mixed image's prediction and
    its two mixes' (the rows after)."""
    loss = F.cross_entropy(out[: len(y)], y, label_smoothing=recipe.label_smoothing)
    if mixed is None:
        return loss
    return loss + recipe.consistency * js_divergence(out[mixed], *out[len(y) :].chunk(2))


def js_divergence(*logits: torch.Tensor) -> torch.Tensor:
    """Mean Jensen-Shannon divergence among the softmax distributions of `logits`, row by row (as
    AugMix's reference computes it: the mixture clamped away from zero before its log)."""
    probs = [F.softmax(z, dim=1) for z in logits]
    mixture = (sum(probs) / len(probs)).clamp(1e-7, 1).log()
    return sum(F.kl_div(mixture, p, reduction="batchmean") for p in probs) / len(probs)
