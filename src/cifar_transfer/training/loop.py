"""Two-phase training, as one explicit loop (after torchvision's reference train.py): freeze the
base and train the head on its features, then unfreeze the base from `finetune_from` and fine-tune
it with the head.

Data is resident on the device; losses and accuracies are accumulated in device tensors and read
back only when the progress bar is refreshed. What each phase trains on (cached activations of the
frozen steps, or images) is `inputs`' concern; the loss is `losses`'; the forward passes (DDP,
compile) are `passes`'; the random streams follow `seeds`' rule. A checkpoint is written after every
epoch (`checkpoint.Checkpointer`); `resume` continues from one with identical results.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..model.inference import autocast, predict_logits
from ..model.network import TransferNet
from ..recipe import Recipe
from .checkpoint import Checkpointer, Progress, restore
from .distributed import ALONE, DistributedError, World, gather, total
from .inputs import Activations, PhaseInputs, TrainingInputs, draw_batch
from .losses import training_loss
from .passes import Forward, forward_passes
from .phases import Phase, TrainingError, freeze_base, make_optimizer, make_schedule, unfreeze_from
from .seeds import order_and_augmentation

# uint8 images (N x 3 x S x S) and int64 labels, on the device
Pair = tuple[torch.Tensor, torch.Tensor]
EpochHook = Callable[[list[dict], list[float], list[float]], None]

LOG_EVERY = (
    25  # steps between progress-bar refreshes and loss checks (each one is a host synchronisation)
)


@dataclass(frozen=True)
class Saving:
    """Where `fit` keeps its checkpoints and what it resumes from."""

    checkpoint: Path | None = (
        None  # written after every epoch (None: not written, as on ranks other than 0)
    )
    resume: dict | None = None  # a checkpoint written by an earlier call with the same recipe
    meta: dict | None = None  # kept in every checkpoint as it is
    on_saved: Callable[[list[dict]], None] | None = (
        None  # runs (in the writer's thread) once a checkpoint is in place
    )


def fit(
    model: TransferNet,
    recipe: Recipe,
    train: Pair,
    val: Pair,
    *,
    saving: Saving = Saving(),
    on_epoch: EpochHook | None = None,
    progress: bool = True,
    world: World = ALONE,
) -> list[dict]:
    """Train `model` in place: freeze the base and train the head, then unfreeze from
    `finetune_from` and fine-tune; return the per-epoch history.

    `train` and `val` are uint8 image and label tensors on the training device. After each epoch,
    `on_epoch(history, step_losses, step_lrs)` is called at once; the checkpoint is written in a
    background thread while the next epoch trains. With `keep=best_val` the model ends with the
    weights of the epoch with the best validation accuracy; each history row's `shipped` says
    whether its epoch's weights are the ones kept.

    Under torchrun (`world`), every rank calls fit with all the data; each trains on its share of
    every global batch (DistributedDataParallel averages the gradients), and caching and validation
    are split and gathered. Only the rank given a checkpoint path writes one.
    """
    if recipe.batch_size % world.size:
        raise DistributedError(
            f"recipe field batch_size={recipe.batch_size} is the global batch: it must divide "
            f"among the {world.size} processes (give a multiple of {world.size})"
        )
    order, augmentation = order_and_augmentation(recipe.seed, train[0].device, world)
    torch.manual_seed(recipe.seed)  # dropout
    if world.size > 1 and recipe.sync_bn and recipe.finetune_bn == "train" and train[0].is_cuda:
        nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)  # statistics of the global batch
    done = (
        Progress()
        if saving.resume is None
        else restore(saving.resume, model, recipe, order, augmentation, world)
    )
    inputs = PhaseInputs(model, recipe, train[0], val[0], world, progress)
    with Checkpointer(saving.checkpoint, saving.meta, saving.on_saved, world) as saver:
        trainer = _Trainer(
            model, recipe, (train[1], val[1]), inputs, done, saver, world, order, augmentation
        )
        # the caller's say
        trainer.progress, trainer.on_epoch, trainer.resume = (
            progress,
            on_epoch,
            saving.resume,
        )
        trainer.phase(Phase.HEAD, freeze_base, recipe.head_epochs)
        trainer.phase(Phase.FINETUNE, unfreeze_from, recipe.finetune_epochs)
    keep_shipped(model, done)
    return done.history


def keep_shipped(model: TransferNet, done: Progress) -> None:
    """Load the best epoch's weights (keep=best_val) unless they are the last's; mark the shipped
    epoch."""
    best = done.best
    if best is not None and done.history and best["epoch"] != done.history[-1]["epoch"]:
        model.load_state_dict(best["model"])
    shipped = best["epoch"] if best is not None else len(done.history)
    for row in done.history:
        row["shipped"] = row["epoch"] == shipped
    # None when unknown (the shipped epoch ran before a resume)
    model.val_logits = done.shipped_val_logits
    model.eval()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in inference mode inside the block, every module's own mode (frozen BatchNorm,
    trained dropout) back after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class _Trainer:
    """One call of `fit`: what its phases and epochs share."""

    model: TransferNet
    recipe: Recipe
    labels: Pair  # training and validation labels
    inputs: PhaseInputs
    done: Progress
    saver: Checkpointer
    world: World
    order: torch.Generator  # the batches' order, the same on every rank
    augmentation: torch.Generator  # this rank's augmentation draws
    progress: bool = True
    on_epoch: EpochHook | None = None
    resume: dict | None = None

    def phase(
        self, phase: Phase, make_trainable: Callable[[TransferNet, Recipe], list], epochs: int
    ) -> None:
        """The phase's epochs not yet done, with a fresh optimizer (or the checkpoint's, mid-
        phase)."""
        first = self.done.first_epoch(phase, epochs)
        if first is None:
            return
        started = time.perf_counter()  # the first epoch's time includes any caching
        params = make_trainable(self.model, self.recipe)
        xs, begin = self.inputs.for_phase(phase)
        evaluate, learn = forward_passes(self.model, begin, self.recipe, self.world)
        opt = make_optimizer(params, phase, self.recipe)
        sched = make_schedule(
            opt, phase, self.recipe, math.ceil(len(self.labels[0]) / self.recipe.batch_size)
        )
        if first > 0:  # resumed within this phase
            opt.load_state_dict(self.resume["optimizer"])
            sched.load_state_dict(self.resume["scheduler"])
        for epoch in range(first, epochs):
            t0 = started if epoch == first else time.perf_counter()
            desc = f"phase {int(phase)} epoch {epoch + 1}/{epochs}"
            lr = opt.param_groups[0]["lr"]
            train_loss, train_acc, step_losses, step_lrs = self.train_epoch(
                learn, xs[0], opt, sched, desc
            )
            with evaluating(self.model):
                val_loss, val_acc, val_logits = _validate(
                    evaluate, xs[1], self.labels[1], self.recipe, self.world
                )
            row = {
                "phase": int(phase),
                "epoch": len(self.done.history) + 1,
                "phase_epoch": epoch + 1,
                "lr": lr,
            }
            row |= {
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
            }
            row["seconds"] = time.perf_counter() - t0
            self.finish_epoch(row, val_logits, desc, opt, sched, step_losses, step_lrs)

    def finish_epoch(
        self, row: dict, val_logits, desc: str, opt, sched, step_losses: list, step_lrs: list
    ) -> None:
        """Record the epoch, say it, checkpoint it and tell the caller."""
        self.done.record(
            row, self.model, keep_best=self.recipe.keep == "best_val", val_logits=val_logits
        )
        if self.progress:
            tqdm.write(
                f"{desc}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | val loss "
                f"{row['val_loss']:.4f} acc {row['val_acc']:.4f} | {row['seconds']:.1f}s"
            )
        self.saver.save(
            self.done, self.recipe, self.model, opt, sched, self.order, self.augmentation
        )
        if self.on_epoch is not None:
            self.on_epoch(self.done.history, step_losses, step_lrs)

    def train_epoch(
        self, learn: Forward, x: TrainingInputs, opt, sched, desc: str
    ) -> tuple[float, float, list[float], list[float]]:
        """One pass over the training set in shuffled batches; returns mean loss and accuracy, and
        each step's loss and learning rate (read back once, at the end).

        Each rank takes its share of every global batch.
        """
        y, recipe, world = self.labels[0], self.recipe, self.world
        n, bs = len(y), recipe.batch_size
        steps = math.ceil(n / bs)
        perm = torch.randperm(n, generator=self.order, device=self.order.device).to(y.device)
        loss_sums = torch.zeros(steps, device=y.device)
        correct = torch.zeros(steps, device=y.device)
        lrs = []
        bar = tqdm(range(steps), desc=desc, unit="batch", disable=not self.progress, leave=False)
        for i in bar:
            idx = perm[i * bs : (i + 1) * bs]
            idx = idx[world.rows(len(idx))]
            xb, yb = draw_batch(x, idx, self.augmentation, recipe), y[idx]
            with autocast(y.device, recipe.precision):
                out = learn(xb.inputs).float()
            loss = training_loss(out, yb, xb.mixed, recipe)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            loss_sums[i] = loss.detach() * len(yb)
            correct[i] = (out[: len(yb)].argmax(1) == yb).sum()
            if i + 1 == steps:  # every rank's sums, in every rank
                loss_sums, correct = total(loss_sums, world), total(correct, world)
            if (
                self.progress and (i + 1) % LOG_EVERY == 0
            ) or i + 1 == steps:  # else one host sync an epoch
                _check_finite(loss_sums[: i + 1], desc)
                seen = min(n, (i + 1) * bs)
                loss_so_far, acc_so_far = (
                    loss_sums[: i + 1].sum().item() / seen,
                    correct[: i + 1].sum().item() / seen,
                )
                bar.set_postfix(loss=f"{loss_so_far:.4f}", acc=f"{acc_so_far:.4f}")
        sizes = torch.full((steps,), float(bs), device=y.device)
        sizes[-1] = n - (steps - 1) * bs
        return (
            loss_sums.sum().item() / n,
            correct.sum().item() / n,
            (loss_sums / sizes).tolist(),
            lrs,
        )


def _check_finite(loss_sums: torch.Tensor, desc: str) -> None:
    bad = (~torch.isfinite(loss_sums)).nonzero()
    if len(bad):
        raise TrainingError(
            f"{desc}, step {int(bad[0]) + 1}: non-finite loss; the last good checkpoint (if any) "
            "is kept: lower the learning rate, or resume with --resume"
        )


def _validate(
    evaluate: Forward,
    x: torch.Tensor | Activations,
    y: torch.Tensor,
    recipe: Recipe,
    world: World = ALONE,
) -> tuple[float, float, torch.Tensor | None]:
    """Loss, accuracy and logits on the validation images, each rank predicting its share."""
    if len(y) == 0:
        return math.nan, math.nan, None
    x = x[0] if isinstance(x, tuple) else x
    logits = gather(
        predict_logits(evaluate, x[world.rows(len(x))], recipe.eval_batch_size, recipe.precision),
        world,
    )
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item(), logits
