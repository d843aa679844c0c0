"""A run folder's training: both phases into `out`, leaving the files that make a run resumable and
readable:

recipe.json, the checkpoint and a history.csv row after every epoch, and TensorBoard events.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import atomic
from ..data.augment import as_tensors
from ..data.cifar import Splits
from ..model.network import TransferNet, build_model, place
from ..model.weights import Pretrained
from ..recipe import Recipe
from .checkpoint import checkpoint_bytes
from .distributed import ALONE, World
from .logbook import Logbook
from .loop import Saving, fit

CHECKPOINT = "checkpoint.pt"


def write_history(history: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]) if history else ["epoch"])
    writer.writeheader()
    writer.writerows(history)
    atomic.write_text(path, buf.getvalue())


def shipped_epoch(history: list[dict], recipe: Recipe) -> dict:
    """Which epoch's weights the run ships, and why."""
    row = next((h for h in history if h["shipped"]), None)  # `fit` marks exactly one row
    if row is None:
        return {}
    why = (
        "the best validation accuracy (keep=best_val; ties go to the earlier epoch)"
        if recipe.keep == "best_val"
        else "the last epoch (keep=last)"
    )
    return {
        "epoch": row["epoch"],
        "phase": row["phase"],
        "val_acc": row["val_acc"],
        "keep": recipe.keep,
        "why": why,
    }


def train_to_folder(
    recipe: Recipe,
    out: Path,
    splits: Splits,
    pretrained: Pretrained,
    dev: torch.device,
    *,
    resume_state: dict | None = None,
    progress: bool = True,
    meta: dict | None = None,
    on_epoch: Callable[[list[dict]], None] | None = None,
    world: World = ALONE,
) -> tuple[TransferNet, list[dict], float]:
    """Both phases on `splits`' training and validation images, into `out`: the checkpoint,
    history.csv and TensorBoard events after every epoch, and recipe.json. The test set is not
    touched.

    `on_epoch(history)` runs after each epoch's files are written (`tune` reports to its pruner
    there). Returns the trained model (the shipped epoch's weights), the history and the training
    seconds. Under torchrun every rank trains; rank 0 alone writes.
    """
    if world.main:
        atomic.write_text(out / "recipe.json", recipe.dumps() + "\n")
    torch.manual_seed(recipe.seed)  # the head's initialisation
    classes, size = splits.train.classes, splits.train.images.shape[1]
    model = place(build_model(recipe, pretrained, classes, size), recipe, dev)
    if world.main:
        atomic.ensure_free(
            out,
            checkpoint_bytes(model, recipe) * (1 if resume_state else 2) + 32 * atomic.MiB,
            "the checkpoint (an atomic save holds the old and the new one)",
        )
    t_train = time.perf_counter()
    logbook = Logbook(out / "tensorboard") if world.main else None

    def after_epoch(history: list[dict], step_losses: list[float], step_lrs: list[float]) -> None:
        logbook.epoch(history, step_losses, step_lrs)
        if on_epoch is not None:
            on_epoch(history)

    # history.csv gains a row once the checkpoint holding that epoch is in place: a row means it can
    # resume
    try:
        history = fit(
            model,
            recipe,
            as_tensors(splits.train.images, splits.train.labels, dev),
            as_tensors(splits.val.images, splits.val.labels, dev),
            saving=Saving(
                checkpoint=out / CHECKPOINT if world.main else None,
                resume=resume_state,
                meta=meta,
                on_saved=(lambda rows: write_history(rows, out / "history.csv"))
                if world.main
                else None,
            ),
            on_epoch=after_epoch if world.main else None,
            progress=progress and world.main,
            world=world,
        )
    finally:
        if logbook is not None:
            logbook.close()
    train_s = time.perf_counter() - t_train
    if world.main:
        write_history(history, out / "history.csv")  # now with the `shipped` column
    return model, history, train_s
