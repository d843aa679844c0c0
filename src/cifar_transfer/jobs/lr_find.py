"""`cifar-transfer lr-find`: the learning-rate range test (Smith 2017; fastai's `lr_find`) for
either phase.

The learning rate grows exponentially from `start` to `end` over at most `steps` optimizer steps on
training batches; the run stops once the smoothed loss exceeds 4x its best. It works on a copy of
the model, so the model it is given is left as it was. The suggestion is the rate where the smoothed
loss falls fastest ("steepest"), the usual pick; the minimum's rate divided by ten is reported
beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import atomic
from ..data.augment import as_tensors, augment, to_input
from ..data.sources import load_splits
from ..machine import default_weights
from ..model.inference import autocast
from ..model.network import Part, TransferNet, build_model, load_model, pick_device, place
from ..model.weights import load_pretrained
from ..recipe import Recipe, RecipeError
from ..reporting import figures
from ..training.phases import Phase, make_optimizer, set_phase

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected
DIVERGED = 4.0  # stop when the smoothed loss exceeds this multiple of its best
FLAT = 0.05  # a smoothed loss that never falls 5% below its start has no descent to suggest from


def lr_find(
    model: TransferNet,
    recipe: Recipe,
    images: torch.Tensor,
    labels: torch.Tensor,
    phase: int = 1,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
) -> dict:
    """The range test on (images, labels) (uint8 on the model's device) for `phase`'s trainable
    parameters."""
    if not (0 < start < end and math.isfinite(end)) or steps < 3:
        raise RecipeError(
            f"lr-find: needs 0 < start < end and at least 3 steps (got start={start}, end={end}, "
            f"steps={steps})"
        )
    model = copy.deepcopy(model)
    phase = Phase(phase)
    params = set_phase(model, phase, recipe)
    opt = make_optimizer(params, phase, recipe)
    forward = Part(model, "stem")
    gen = torch.Generator(device=images.device).manual_seed(recipe.seed)
    lrs, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    order = torch.randperm(len(labels), generator=gen, device=gen.device).to(labels.device)
    for step in range(steps):
        lr = start * (end / start) ** (step / max(steps - 1, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = order[
            (step * recipe.batch_size + torch.arange(recipe.batch_size, device=labels.device))
            % len(labels)
        ]
        with autocast(images.device, recipe.precision):
            out = forward(to_input(augment(images[idx], recipe.augment, gen))).float()
        loss = F.cross_entropy(out, labels[idx], label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        lrs.append(lr)
        losses.append(value)
        smoothed.append(average / (1 - SMOOTHING ** (step + 1)))
        best = min(best, smoothed[-1])
        if smoothed[-1] > DIVERGED * best:
            break
    return {
        "phase": int(phase),
        "optimizer": recipe.head_optimizer if phase == Phase.HEAD else recipe.finetune_optimizer,
        "start": start,
        "end": end,
        "steps": len(lrs),
        "lrs": lrs,
        "losses": losses,
        "smoothed": smoothed,
        **suggest(lrs, smoothed),
    }


def suggest(lrs: list[float], smoothed: list[float]) -> dict:
    """The steepest descent of the smoothed loss against log(lr), and the loss minimum's rate / 10.

    A curve with no descent (a model already trained: the loss is flat until it rises) gets a tenth
    of where it rises.
    """
    if len(lrs) < 3:
        return {"suggestion": None, "method": "too few steps before the loss diverged"}
    low = min(smoothed)
    if smoothed[0] - low < FLAT * smoothed[0]:
        rises = next((lr for lr, s in zip(lrs, smoothed) if s > (1 + FLAT) * low), lrs[-1])
        return {
            "suggestion": rises / 10,
            "method": f"a tenth of where the flat loss starts to rise ({rises:.1e})",
            "minimum_over_10": lrs[int(np.argmin(smoothed))] / 10,
        }
    slopes = np.gradient(np.asarray(smoothed), np.log(np.asarray(lrs)))
    # ignore the first and last tenth: the average is still settling at the start and the loss turns
    # up at the end
    skip = len(slopes) // 10
    steepest = lrs[skip + int(np.argmin(slopes[skip : len(slopes) - skip]))]
    return {
        "suggestion": steepest,
        "method": "steepest descent of the smoothed loss",
        "minimum_over_10": lrs[int(np.argmin(smoothed))] / 10,
    }


def lr_find_job(
    recipe: Recipe,
    out: Path,
    *,
    phase: int = 1,
    start_from: Path | None = None,
    data: str | Path | None = None,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    download: bool = True,
    steps: int = 100,
    start: float = 1e-7,
    end: float = 10.0,
) -> dict:
    """`lr-find`: the range test on the recipe's training split of CIFAR-10 or of the folder `data`
    (never validation or test images), from the pretrained weights with a fresh head, or from a
    saved run's model (`start_from`, the sensible start for phase 2); writes lr_find.json and
    lr_find.png into `out`."""
    atomic.check_writable(out)  # before minutes of work
    dev = pick_device(device)
    if start_from is not None:
        # the saved network's shape wins
        model, saved = load_model(start_from / "model.safetensors")
        shape = {
            "resolution": saved.resolution,
            "head_hidden": saved.head_hidden,
            "dropout": saved.dropout,
        }
        # a folder read as it was
        recipe = dataclasses.replace(recipe, **shape, image_size=model.image_size)
    splits = load_splits(recipe, data, data_dir, download, progress=False).splits
    classes, size = splits.train.classes, splits.train.images.shape[1]
    if start_from is None:
        torch.manual_seed(recipe.seed)
        model = build_model(recipe, load_pretrained(weights or default_weights()), classes, size)
    elif model.classes != classes:
        raise RecipeError(
            f"lr-find --from {start_from}: its model knows other classes than the data's "
            f"({classes})"
        )
    images, labels = as_tensors(splits.train.images, splits.train.labels, dev)
    result = lr_find(place(model, recipe, dev), recipe, images, labels, phase, start, end, steps)
    result["start_from"] = str(start_from) if start_from else "pretrained weights, fresh head"
    atomic.write_json(out / "lr_find.json", result)
    figures.lr_find(result, out / "lr_find.png")
    return result
