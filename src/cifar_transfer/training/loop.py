"""Two-phase training: phase 1 trains the head on a frozen base, phase 2 fine-tunes the base from a chosen stage.

One explicit loop (after torchvision's reference train.py). Data is resident on the device; losses and
accuracies are accumulated in device tensors and read back only when the progress bar is refreshed.

Frozen steps see the same input every epoch, so their activations are computed once and the trainable steps
train on them: the same mathematics (frozen BatchNorm is in inference mode), a fraction of the cost. Phase 1
trains the head on cached base features; phase 2 with `finetune_from` past the stem trains on cached
activations of the stages before it. Flip augmentation survives caching: each image is cached with its mirror
and every step draws one of the two per image. Random crops cannot be cached; they run the full forward pass
(as does everything with `cache=false`).

A checkpoint is written after every epoch (`checkpoint.Checkpointer`); `resume` continues from one with
identical results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data.augment import augment, augmixed, shifted, to_input
from ..model.inference import autocast, predict_logits
from ..model.network import Part, TransferNet, folded
from ..recipe import Recipe
from .checkpoint import Checkpointer, Progress, restore
from .distributed import ALONE, DistributedError, World, gather, total
from .phases import TrainingError, make_optimizer, make_schedule, set_phase

Views = tuple[torch.Tensor, ...]  # cached activations of each image (and of its mirror, with flip augmentation)
Pair = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N x 3 x 32 x 32) and int64 labels, on the device

LOG_EVERY = 25  # steps between progress-bar refreshes and loss checks (each one is a host synchronisation)


def fit(
    model: TransferNet,
    recipe: Recipe,
    train: Pair,
    val: Pair,
    *,
    checkpoint: Path | None = None,
    resume: dict | None = None,
    progress: bool = True,
    on_epoch: Callable[[list[dict], list[float], list[float]], None] | None = None,
    on_saved: Callable[[list[dict]], None] | None = None,
    meta: dict | None = None,
    world: World = ALONE,
) -> list[dict]:
    """Train `model` in place through both phases (the head on the frozen base, then the base from
    `finetune_from` on); return the per-epoch history.

    `train` and `val` are uint8 image and label tensors on the training device. `resume` is a checkpoint
    dict written by a previous call with the same recipe. After each epoch, `on_epoch(history, step_losses,
    step_lrs)` is called at once, with that epoch's loss and learning rate at every step; the checkpoint is
    written in a background thread while the next epoch trains, and `on_saved(history)` runs (in that thread)
    once it is in place. `meta` is kept in every checkpoint as it is. With `keep=best_val` the model ends with
    the weights of the epoch with the best validation accuracy; each history row's `shipped` says whether its
    epoch's weights are the ones kept.

    Under torchrun (`world`), every rank calls fit with all the data; each trains on its share of every global
    batch (DistributedDataParallel averages the gradients), and caching and validation are split and gathered.
    Only the rank given a `checkpoint` writes one.
    """
    if recipe.batch_size % world.size:
        raise DistributedError(
            f"recipe field batch_size={recipe.batch_size} is the global batch: it must divide "
            f"among the {world.size} processes (give a multiple of {world.size})"
        )
    device = train[0].device
    order = torch.Generator(device=device).manual_seed(recipe.seed)  # the same on every rank
    augmentation = (
        order if world.size == 1 else torch.Generator(device=device).manual_seed(recipe.seed + 7919 * world.rank)
    )  # each rank its own
    torch.manual_seed(recipe.seed)  # dropout
    if world.size > 1 and recipe.sync_bn and recipe.finetune_bn == "train" and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)  # statistics of the global batch
    at = Progress() if resume is None else restore(resume, model, recipe, order, augmentation, world)
    inputs = PhaseInputs(model, recipe, train[0], val[0], world, progress)
    with Checkpointer(checkpoint, meta, on_saved, world) as saver:
        run = _Fit(model, recipe, (train[1], val[1]), inputs, order, augmentation, at, saver, world, progress, on_epoch)
        for phase, epochs in ((1, recipe.head_epochs), (2, recipe.finetune_epochs)):
            first = at.first_epoch(phase, epochs)
            if first is not None:
                run.phase(phase, first, epochs, resume)
    ship(model, at)
    return at.history


def ship(model: TransferNet, at: Progress) -> None:
    """Load the best epoch's weights (keep=best_val) unless they are the last's; mark the shipped epoch."""
    best = at.best
    if best is not None and at.history and best["epoch"] != at.history[-1]["epoch"]:
        model.load_state_dict(best["model"])
    shipped = best["epoch"] if best is not None else len(at.history)
    for row in at.history:
        row["shipped"] = row["epoch"] == shipped
    model.val_logits = at.shipped_val_logits  # None when unknown (the shipped epoch ran before a resume)
    model.eval()


@dataclass
class _Fit:
    """One call of `fit`: what its phases and epochs share."""

    model: TransferNet
    recipe: Recipe
    labels: Pair  # training and validation labels
    inputs: PhaseInputs
    order: torch.Generator
    augmentation: torch.Generator
    at: Progress
    saver: Checkpointer
    world: World
    progress: bool
    on_epoch: Callable[[list[dict], list[float], list[float]], None] | None

    def phase(self, phase: int, first: int, epochs: int, resume: dict | None) -> None:
        """Epochs `first`..`epochs - 1` of `phase`, with a fresh optimizer (or the checkpoint's, mid-phase)."""
        started = time.perf_counter()  # the first epoch's time includes any caching
        params = set_phase(self.model, phase, self.recipe)
        xs, begin = self.inputs.for_phase(phase)
        forward, learn = modules(self.model, begin, self.recipe, self.world)
        opt = make_optimizer(params, phase, self.recipe)
        sched = make_schedule(opt, phase, self.recipe, math.ceil(len(self.labels[0]) / self.recipe.batch_size))
        if first > 0:  # resumed within this phase
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
        for epoch in range(first, epochs):
            t0 = started if epoch == first else time.perf_counter()
            desc = f"phase {phase} epoch {epoch + 1}/{epochs}"
            row, val_logits, step_losses, step_lrs = self.epoch(phase, epoch, desc, xs, forward, learn, opt, sched)
            row["seconds"] = time.perf_counter() - t0
            self.at.record(row, self.model, keep_best=self.recipe.keep == "best_val", val_logits=val_logits)
            if self.progress:
                tqdm.write(
                    f"{desc}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                    f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | {row['seconds']:.1f}s"
                )
            self.saver.save(self.at, self.recipe, self.model, opt, sched, self.order, self.augmentation)
            if self.on_epoch is not None:
                self.on_epoch(self.at.history, step_losses, step_lrs)

    def epoch(self, phase: int, epoch: int, desc: str, xs, forward, learn, opt, sched):
        """One training pass and the validation after it: the history row, each step's loss and rate."""
        lr = opt.param_groups[0]["lr"]
        set_phase(self.model, phase, self.recipe)
        train_loss, train_acc, step_losses, step_lrs = _run_epoch(
            learn,
            xs[0],
            self.labels[0],
            opt,
            sched,
            self.order,
            self.augmentation,
            self.recipe,
            desc,
            self.progress,
            self.world,
        )
        self.model.eval()
        val_loss, val_acc, val_logits = _validate(forward, xs[1], self.labels[1], self.recipe, self.world)
        row = {
            "phase": phase,
            "epoch": len(self.at.history) + 1,
            "phase_epoch": epoch + 1,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
        }
        return row, val_logits, step_losses, step_lrs


@dataclass
class Fresh:
    """Cached training inputs of which a third of each batch is made anew every step: AugMix of the images, run
    through the frozen steps (a new mix every step cannot be cached; forwards only, a third of the images).

    With the recipe's `consistency`, the third keeps its clean views and two mixes of each of its images follow
    the batch instead, for AugMix's Jensen-Shannon consistency loss (the mixes are of the image as stored, the
    clean view its mirror half the time: the loss asks for flip invariance too)."""

    views: Views  # each image's cached activations and its mirror's
    images: torch.Tensor  # the uint8 training images
    frozen: Part  # the frozen steps the views came through, BatchNorm folded

    @torch.no_grad()
    def batch(self, idx: torch.Tensor, gen: torch.Generator, recipe: Recipe) -> Batch:
        xb = _batch(self.views, idx, gen, recipe).inputs
        pick = (torch.rand(len(idx), generator=gen, device=gen.device) < 1 / 3).to(idx.device)
        if not pick.any():
            return Batch(xb)
        mixes = 2 if recipe.consistency else 1
        with autocast(idx.device, recipe.precision):
            fresh = self.frozen(to_input(augmixed(self.images[idx[pick]].repeat(mixes, 1, 1, 1), gen)))
        if recipe.consistency:
            return Batch(torch.cat([xb, fresh.to(xb.dtype)]), pick.nonzero().squeeze(1))
        xb[pick] = fresh.to(xb.dtype)  # _batch's views are a new tensor, never the cache
        return Batch(xb)


@dataclass
class Batch:
    """One step's inputs: a row per image, then (for the consistency loss) two AugMix views of each image in
    `mixed` (all first mixes, then all second)."""

    inputs: torch.Tensor
    mixed: torch.Tensor | None = None  # rows of the images whose mixes follow


class PhaseInputs:
    """What each phase trains and validates on: the uint8 images, or what the frozen steps make of them,
    computed once (the activations entering `finetune_from`, and phase 1's base features from those)."""

    def __init__(
        self, model: TransferNet, recipe: Recipe, train: torch.Tensor, val: torch.Tensor, world: World, progress: bool
    ):
        self.model, self.recipe, self.images, self.world, self.progress = model, recipe, (train, val), world, progress
        self.views = 2 if recipe.augment in ("flip", "flip+noise", "flip+augmix") else 1
        self.frozen: tuple[Views, Views] | None = None  # activations entering `finetune_from`, for train and val

    def for_phase(self, phase: int) -> tuple[tuple, str]:
        """(training inputs, validation inputs) and the step they enter the model at."""
        r = self.recipe
        if r.cache and r.finetune_from != "stem" and self.frozen is None:
            self.frozen = self.cache(
                self.images, "stem", r.finetune_from, f"caching activations entering {r.finetune_from}"
            )
        xs, at = (self.frozen, r.finetune_from) if self.frozen else (self.images, "stem")
        if not r.cache or (phase == 1 and r.augment == "crop+flip"):  # the full forward pass
            return xs, "stem"
        begin = "head" if phase == 1 else r.finetune_from
        if begin != at:  # phase 1: the head trains on base features computed once
            xs = self.cache(xs, at, begin, "phase 1: caching base features")
        if phase == 2 and r.augment == "flip+augmix" and begin != "stem":  # phase 1: flips (AugMix needs the base)
            frozen = Part(folded(self.model), "stem", begin)
            xs = (Fresh(xs[0], self.images[0], frozen), xs[1])
        return xs, begin

    def cache(self, xs: tuple, start: str, stop: str, desc: str) -> tuple[Views, Views]:
        images = xs[0]
        if isinstance(images, torch.Tensor) and self.recipe.augment == "flip+noise":
            # the shifted copy is drawn once, from the seed (the same on every rank), and cached as a third view
            draw = torch.Generator(device=images.device).manual_seed(self.recipe.seed + 104729)
            images = (images, images.flip(-1), shifted(images, draw))
        train = cache_activations(
            self.model, images, start, stop, self.recipe, self.views, desc if self.progress else None, self.world
        )
        return train, cache_activations(self.model, xs[1], start, stop, self.recipe, world=self.world)


def modules(model: TransferNet, begin: str, recipe: Recipe, world: World) -> tuple[Callable, Callable]:
    """The steps from `begin` on, for evaluation and for training (under torchrun wrapped in DDP, which averages
    the gradients), compiled as the recipe says."""
    forward = compiled(Part(model, begin), recipe.compile)  # evaluation: no gradients to average
    if world.size == 1:
        return forward, forward
    cuda = model.mean.is_cuda
    ddp = DistributedDataParallel(
        Part(model, begin), device_ids=[model.mean.device] if cuda else None, broadcast_buffers=False
    )
    return forward, compiled(ddp, recipe.compile)


def _batch(x: torch.Tensor | Views | Fresh, idx: torch.Tensor, gen: torch.Generator, recipe: Recipe) -> Batch:
    """The inputs of one step: uint8 images augmented now, or one cached view per image drawn at random."""
    if isinstance(x, Fresh):
        return x.batch(idx, gen, recipe)
    if isinstance(x, tuple):
        if len(x) == 1:
            return Batch(x[0][idx])
        if len(x) == 3:  # image, mirror, shifted copy: one each step, a third each
            view = torch.randint(0, 3, (len(idx),), generator=gen, device=gen.device).to(idx.device)
            return Batch(torch.stack([v[idx] for v in x])[view, torch.arange(len(idx), device=idx.device)])
        mirror = torch.rand(len(idx), generator=gen, device=gen.device).to(idx.device) < 0.5
        return Batch(torch.where(mirror.view(-1, *[1] * (x[0].ndim - 1)), x[1][idx], x[0][idx]))
    return Batch(to_input(augment(x[idx], recipe.augment, gen)))


def training_loss(out: torch.Tensor, y: torch.Tensor, mixed: torch.Tensor | None, recipe: Recipe) -> torch.Tensor:
    """Cross-entropy on the batch's own rows (`out[:len(y)]`); with `mixed`, plus `recipe.consistency` times the
    Jensen-Shannon divergence among each mixed image's prediction and its two mixes' (the rows after)."""
    loss = F.cross_entropy(out[: len(y)], y, label_smoothing=recipe.label_smoothing)
    if mixed is None:
        return loss
    return loss + recipe.consistency * js_divergence(out[mixed], *out[len(y) :].chunk(2))


def js_divergence(*logits: torch.Tensor) -> torch.Tensor:
    """Mean Jensen-Shannon divergence among the softmax distributions of `logits`, row by row (as AugMix's
    reference computes it: the mixture clamped away from zero before its log)."""
    probs = [F.softmax(z, dim=1) for z in logits]
    mixture = (sum(probs) / len(probs)).clamp(1e-7, 1).log()
    return sum(F.kl_div(mixture, p, reduction="batchmean") for p in probs) / len(probs)


def _run_epoch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor | Views | Fresh,
    y: torch.Tensor,
    opt,
    sched,
    gen: torch.Generator,
    aug: torch.Generator,
    recipe: Recipe,
    desc: str,
    progress: bool,
    world: World,
) -> tuple[float, float, list[float], list[float]]:
    """One pass over (x, y) in shuffled batches; returns mean loss and accuracy, and each step's loss and
    learning rate (read back once, at the end).

    `gen` draws the order (the same on every rank: each takes its share of every global batch); `aug` draws
    augmentation (its own on each rank)."""
    n, bs = len(y), recipe.batch_size
    steps = math.ceil(n / bs)
    perm = torch.randperm(n, generator=gen, device=gen.device).to(y.device)
    loss_sums = torch.zeros(steps, device=y.device)
    lrs = []
    correct = torch.zeros(steps, device=y.device)
    bar = tqdm(range(steps), desc=desc, unit="batch", disable=not progress, leave=False)
    for i in bar:
        idx = perm[i * bs : (i + 1) * bs]
        idx = idx[world.rows(len(idx))]
        xb, yb = _batch(x, idx, aug, recipe), y[idx]
        with autocast(y.device, recipe.precision):
            out = forward(xb.inputs).float()
        loss = training_loss(out, yb, xb.mixed, recipe)
        out = out[: len(yb)]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        loss_sums[i] = loss.detach() * len(yb)
        correct[i] = (out.argmax(1) == yb).sum()
        if i + 1 == steps:  # every rank's sums, in every rank
            loss_sums, correct = total(loss_sums, world), total(correct, world)
        if (progress and (i + 1) % LOG_EVERY == 0) or i + 1 == steps:  # without a bar: one host sync an epoch
            bad = (~torch.isfinite(loss_sums[: i + 1])).nonzero()
            if len(bad):
                raise TrainingError(
                    f"{desc}, step {int(bad[0]) + 1}: non-finite loss; the last good checkpoint "
                    "(if any) is kept: lower the learning rate, or resume with --resume"
                )
            seen = min(n, (i + 1) * bs)
            bar.set_postfix(
                loss=f"{loss_sums[: i + 1].sum().item() / seen:.4f}", acc=f"{correct[: i + 1].sum().item() / seen:.4f}"
            )
    sizes = torch.full((steps,), float(bs), device=y.device)
    sizes[-1] = n - (steps - 1) * bs
    return loss_sums.sum().item() / n, correct.sum().item() / n, (loss_sums / sizes).tolist(), lrs


def _validate(
    forward, x: torch.Tensor | Views, y: torch.Tensor, recipe: Recipe, world: World = ALONE
) -> tuple[float, float, torch.Tensor | None]:
    """Loss, accuracy and logits on the validation images, each rank predicting its share."""
    if len(y) == 0:
        return math.nan, math.nan, None
    x = x[0] if isinstance(x, tuple) else x
    logits = gather(predict_logits(forward, x[world.rows(len(x))], recipe.eval_batch_size, recipe.precision), world)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item(), logits


def cache_activations(
    model: TransferNet,
    x: torch.Tensor | Views,
    start: str,
    stop: str,
    recipe: Recipe,
    views: int = 1,
    desc: str | None = None,
    world: World = ALONE,
) -> Views:
    """What the frozen steps from `start` up to `stop` make of `x`, computed once (each rank its share, then
    gathered: every rank holds all of it), with their BatchNorm folded into the convolutions.

    `x` is uint8 images (with views=2 their mirror images are cached too) or the views a previous call made.
    The blocks' activations are kept in bf16 unless the recipe's precision is fp32: half the memory (lean's are
    3.3 GB so); where "auto" computes in fp32 they are rounded once, as bf16 autocast rounds every block's output.
    The base features entering the head keep the precision they were computed in.
    """
    if isinstance(x, torch.Tensor):
        x = (x, x.flip(-1))[:views]
    part = Part(folded(model), start, stop)  # the steps are frozen when cached: BatchNorm in inference mode
    kept = torch.bfloat16 if stop != "head" and recipe.precision != "fp32" else None  # None: as computed
    return tuple(
        gather(
            predict_logits(part, v[world.rows(len(v))], recipe.eval_batch_size, recipe.precision, desc, kept),
            world,
        )
        if len(v)
        else v
        for v in x
    )


def compiled(part: nn.Module, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`part`, compiled unless mode is "off" ("reduce-overhead" captures CUDA graphs: no per-kernel launch cost).

    The batch dimension is dynamic from the first call, so each module mode (training, evaluation) compiles once
    per phase: the ragged last batch and the evaluation batch size reuse its graph."""
    if mode == "off":
        return part
    module = torch.compile(part, mode=None if mode == "default" else mode)

    def forward(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return module(x)

    return forward
