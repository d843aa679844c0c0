"""Two-phase training: phase 1 trains the head on a frozen base, phase 2 fine-tunes the base from a chosen stage.

One explicit loop (after torchvision's reference train.py). Data is resident on the device; losses and
accuracies are accumulated in device tensors and read back only when the progress bar is refreshed.

Frozen steps see the same input every epoch, so their activations are computed once and the trainable steps
train on them: the same mathematics (frozen BatchNorm is in inference mode), a fraction of the cost. Phase 1
trains the head on cached base features; phase 2 with `finetune_from` past the stem trains on cached
activations of the stages before it. Flip augmentation survives caching: each image is cached with its mirror
and every step draws one of the two per image. Random crops cannot be cached; they run the full forward pass
(as does everything with `cache=false`).

A checkpoint is written atomically after every epoch, from a copy of the state in a background thread while
the next epoch trains; `resume` continues from one with identical results.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves, tree_map
from tqdm import tqdm

from . import atomic
from .augment import augment, to_input
from .distributed import ALONE, DistributedError, World, gather, total
from .errors import CifarTransferError
from .evaluate import autocast, predict_logits
from .model import Part, TransferNet, first_line
from .recipe import STEPS, Recipe, step_name

Views = tuple[torch.Tensor, ...]  # cached activations of each image (and of its mirror, with flip augmentation)

LOG_EVERY = 25  # steps between progress-bar refreshes and loss checks (each one is a host synchronisation)


class TrainingError(CifarTransferError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


def trainable_stages(model: TransferNet, phase: int, recipe: Recipe) -> list[nn.Module]:
    """The backbone modules that train in this phase: none in phase 1, `finetune_from` onwards in phase 2."""
    if phase == 1:
        return []
    b = model.backbone
    names = STEPS[STEPS.index(step_name(recipe.finetune_from)):STEPS.index("pool")]
    return [m for name in names
            for m in ([b.conv1, b.bn1] if name == "stem" else [model.block(name)])]


def set_phase(model: TransferNet, phase: int, recipe: Recipe) -> list[nn.Parameter]:
    """Freeze the base except the phase's trainable stages, put BatchNorm in the recipe's mode (frozen stages
    always in inference mode), and return the trainable parameters."""
    model.train()
    model.backbone.requires_grad_(False)
    trainable = trainable_stages(model, phase, recipe)
    for m in trainable:
        m.requires_grad_(True)
    learning_bn = {id(m) for t in trainable for m in t.modules()} if recipe.finetune_bn == "train" else set()
    for m in model.backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in learning_bn:
            m.eval()
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], phase: int, recipe: Recipe) -> torch.optim.Optimizer:
    """Adam or SGD; weight decay on weights only, not on norms and biases."""
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    kind = recipe.head_optimizer if phase == 1 else recipe.finetune_optimizer
    lr = recipe.head_lr if phase == 1 else recipe.finetune_lr
    fused = params[0].is_cuda  # one kernel for all parameters; on CPU the default (foreach) is used
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, eps=1e-7, fused=fused)  # Keras's default epsilon, as in the seed
    return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov, fused=fused)


def make_schedule(opt: torch.optim.Optimizer, phase: int, recipe: Recipe, steps_per_epoch: int):
    """Per-step learning-rate factor: constant in phase 1; in phase 2 linear warm-up, then constant or cosine."""
    total = recipe.finetune_epochs * steps_per_epoch
    warmup = round(recipe.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if phase == 1:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _batch(x: torch.Tensor | Views, idx: torch.Tensor, gen: torch.Generator, recipe: Recipe) -> torch.Tensor:
    """The inputs of one step: uint8 images augmented now, or one cached view per image drawn at random."""
    if isinstance(x, tuple):
        if len(x) == 1:
            return x[0][idx]
        mirror = torch.rand(len(idx), generator=gen, device=gen.device).to(idx.device) < 0.5
        return torch.where(mirror.view(-1, *[1] * (x[0].ndim - 1)), x[1][idx], x[0][idx])
    return to_input(augment(x[idx], recipe.augment, gen))


def _run_epoch(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor | Views, y: torch.Tensor, opt, sched,
    gen: torch.Generator, aug: torch.Generator, recipe: Recipe, desc: str, progress: bool, world: World,
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
        idx = perm[i * bs:(i + 1) * bs]
        idx = idx[world.rows(len(idx))]
        xb, yb = _batch(x, idx, aug, recipe), y[idx]
        with autocast(y.device, recipe.precision):
            out = forward(xb).float()
        loss = F.cross_entropy(out, yb, label_smoothing=recipe.label_smoothing)
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
            bad = (~torch.isfinite(loss_sums[:i + 1])).nonzero()
            if len(bad):
                raise TrainingError(f"{desc}, step {int(bad[0]) + 1}: non-finite loss; the last good checkpoint "
                                    "(if any) is kept: lower the learning rate, or resume with --resume")
            seen = min(n, (i + 1) * bs)
            bar.set_postfix(loss=f"{loss_sums[:i + 1].sum().item() / seen:.4f}",
                            acc=f"{correct[:i + 1].sum().item() / seen:.4f}")
    sizes = torch.full((steps,), float(bs), device=y.device)
    sizes[-1] = n - (steps - 1) * bs
    return loss_sums.sum().item() / n, correct.sum().item() / n, (loss_sums / sizes).tolist(), lrs


def _validate(forward, x: torch.Tensor | Views, y: torch.Tensor, recipe: Recipe,
              world: World = ALONE) -> tuple[float, float]:
    """Loss and accuracy on the validation images, each rank predicting its share."""
    if len(y) == 0:
        return math.nan, math.nan
    x = x[0] if isinstance(x, tuple) else x
    logits = gather(predict_logits(forward, x[world.rows(len(x))], recipe.eval_batch_size, recipe.precision), world)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def cache_activations(model: TransferNet, x: torch.Tensor | Views, start: str, stop: str, recipe: Recipe,
                      views: int = 1, desc: str | None = None, world: World = ALONE) -> Views:
    """What the frozen steps from `start` up to `stop` make of `x`, computed once (each rank its share, then
    gathered: every rank holds all of it).

    `x` is uint8 images (with views=2 their mirror images are cached too) or the views a previous call made.
    Activations keep the precision they are computed in (bf16 under bf16 autocast: half the memory).
    """
    if isinstance(x, torch.Tensor):
        x = (x, x.flip(-1))[:views]
    part = Part(model, start, stop)
    return tuple(gather(predict_logits(part, v[world.rows(len(v))], recipe.eval_batch_size, recipe.precision, desc,
                                       keep_dtype=True), world) if len(v) else v for v in x)


def fit(
    model: TransferNet, recipe: Recipe, train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor], *, checkpoint: Path | None = None, resume: dict | None = None,
    progress: bool = True, on_epoch: Callable[[list[dict], list[float], list[float]], None] | None = None,
    on_saved: Callable[[list[dict]], None] | None = None, meta: dict | None = None, world: World = ALONE,
) -> list[dict]:
    """Train `model` in place through both phases; return the per-epoch history.

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
    device = train[0].device
    if recipe.batch_size % world.size:
        raise DistributedError(f"recipe field batch_size={recipe.batch_size} is the global batch: it must divide "
                               f"among the {world.size} processes (give a multiple of {world.size})")
    gen = torch.Generator(device=device).manual_seed(recipe.seed)  # the order (and, in one process, augmentation)
    aug = gen if world.size == 1 else torch.Generator(device=device).manual_seed(recipe.seed + 7919 * world.rank)
    torch.manual_seed(recipe.seed)  # dropout
    if world.size > 1 and recipe.sync_bn and recipe.finetune_bn == "train" and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)  # statistics of the global batch
    history: list[dict] = []
    best: dict | None = None  # keep=best_val: the best epoch so far, its validation accuracy and weights
    start = (1, 0)  # (phase, epochs already done in it)
    if resume is not None:
        if Recipe.from_dict(resume["recipe"]) != recipe:  # as recipes: fields added since take their defaults
            raise TrainingError("checkpoint was written by a different recipe")
        model.load_state_dict(resume["model"])
        gen.set_state(resume["generator"])
        ranks = resume.get("rank_generators")
        if world.size > 1 and ranks is not None and len(ranks) == world.size:  # same world: the same streams
            aug.set_state(ranks[world.rank].clone())  # a row of a saved tensor: set_state reads from its start
        torch.set_rng_state(resume["torch_rng"])
        if device.type == "cuda" and resume.get("cuda_rng") is not None:  # dropout on CUDA draws from these
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
        history = list(resume["history"])
        best = resume.get("best")
        start = (resume["phase"], resume["epoch"])
    views = 2 if recipe.augment == "flip" else 1
    frozen: tuple[Views, Views] | None = None  # activations entering `finetune_from`, for train and val
    writer = atomic.Background()  # checkpoints are written while the next epoch trains
    try:
        for phase, epochs in ((1, recipe.head_epochs), (2, recipe.finetune_epochs)):
            first = start[1] if phase == start[0] else 0
            if phase < start[0] or first >= epochs:
                continue
            t_phase = time.perf_counter()  # the first epoch's time includes any caching
            params = set_phase(model, phase, recipe)
            if recipe.cache and recipe.finetune_from != "stem" and frozen is None:
                desc = f"caching activations entering {recipe.finetune_from}" if progress else None
                frozen = (cache_activations(model, train[0], "stem", recipe.finetune_from, recipe, views, desc, world),
                          cache_activations(model, val[0], "stem", recipe.finetune_from, recipe, world=world))
            xs, at = (frozen, recipe.finetune_from) if frozen else ((train[0], val[0]), "stem")
            begin = "head" if phase == 1 else recipe.finetune_from
            if not recipe.cache or (phase == 1 and recipe.augment == "crop+flip"):  # the full forward pass
                begin = "stem"
            elif begin != at:  # phase 1: the head trains on base features computed once
                desc = "phase 1: caching base features" if progress else None
                xs = (cache_activations(model, xs[0], at, begin, recipe, views, desc, world),
                      cache_activations(model, xs[1], at, begin, recipe, world=world))
            forward = compiled(Part(model, begin), recipe.compile)  # evaluation: no gradients to average
            learn = forward if world.size == 1 else compiled(
                DistributedDataParallel(Part(model, begin), device_ids=[device] if device.type == "cuda" else None,
                                        broadcast_buffers=False), recipe.compile)
            steps = math.ceil(len(train[1]) / recipe.batch_size)
            opt = make_optimizer(params, phase, recipe)
            sched = make_schedule(opt, phase, recipe, steps)
            if resume is not None and phase == start[0] and first > 0:
                opt.load_state_dict(resume["optimizer"])
                sched.load_state_dict(resume["scheduler"])
            for epoch in range(first, epochs):
                t0 = t_phase if epoch == first else time.perf_counter()
                lr = opt.param_groups[0]["lr"]
                desc = f"phase {phase} epoch {epoch + 1}/{epochs}"
                set_phase(model, phase, recipe)
                train_loss, train_acc, step_losses, step_lrs = _run_epoch(learn, xs[0], train[1], opt, sched, gen,
                                                                          aug, recipe, desc, progress, world)
                model.eval()
                val_loss, val_acc = _validate(forward, xs[1], val[1], recipe, world)
                row = {"phase": phase, "epoch": len(history) + 1, "phase_epoch": epoch + 1, "lr": lr,
                       "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
                       "seconds": time.perf_counter() - t0}
                history.append(row)
                if recipe.keep == "best_val" and (best is None or val_acc > best["val_acc"]):
                    best = {"epoch": row["epoch"], "val_acc": val_acc,
                            "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                if progress:
                    tqdm.write(f"{desc}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                               f"val loss {val_loss:.4f} acc {val_acc:.4f} | {row['seconds']:.1f}s")
                saved = None if on_saved is None else functools.partial(on_saved, list(history))
                # each rank's augmentation stream, for a resume with the same number of processes
                ranks = gather(aug.get_state().to(device)[None], world).cpu() if world.size > 1 else None
                if checkpoint is not None:
                    writer.wait()  # one checkpoint in flight: at most one host copy of the state at a time
                    state = {"recipe": recipe.to_dict(), "phase": phase, "epoch": epoch + 1, "history": list(history),
                             "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "generator": gen.get_state(),
                             "torch_rng": torch.get_rng_state(), "meta": meta or {},
                             "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                             "rank_generators": ranks}
                    # `best` is a clone that is replaced, never changed: saved as it is, not copied again
                    writer.submit(checkpoint, host_copy(state, unchanging={"best": best}), then=saved)
                elif saved is not None:
                    saved()
                if on_epoch is not None:
                    on_epoch(history, step_losses, step_lrs)
        writer.wait()  # the last checkpoint is in place (or its error raised) before fit returns
    finally:
        writer.close()
    if best is not None and history and best["epoch"] != history[-1]["epoch"]:
        model.load_state_dict(best["model"])
    shipped = best["epoch"] if best is not None else len(history)
    for row in history:
        row["shipped"] = row["epoch"] == shipped
    model.eval()
    return history


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


def host_copy(state: dict, unchanging: dict) -> Callable[[IO[bytes]], None]:
    """A copy of `state`'s tensors that training cannot change, and the function that saves it with the
    `unchanging` entries (which training no longer touches) to a file.

    On CUDA the copies go to pinned memory without blocking; the write waits for them (an event)."""
    cuda = any(t.is_cuda for t in tree_leaves(state) if isinstance(t, torch.Tensor))
    copy = tree_map(lambda t: t.detach().to("cpu", copy=True, non_blocking=cuda) if isinstance(t, torch.Tensor)
                    else t, state)
    copied = torch.cuda.Event() if cuda else None
    if copied is not None:
        copied.record()

    def write(f: IO[bytes]) -> None:
        if copied is not None:
            copied.synchronize()
        torch.save({**copy, **unchanging}, f)

    return write


def checkpoint_bytes(model: TransferNet, recipe: Recipe) -> int:
    """About how large `fit`'s checkpoint grows: the model, the optimizer's state for what trains in phase 2
    (Adam keeps two moments, SGD with momentum one) and, with keep=best_val, the best epoch's weights."""
    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    trainable = [p for m in [*trainable_stages(model, 2, recipe), model.head] for p in m.parameters()]
    moments = {"adam": 2, "sgd": 1 if recipe.momentum else 0}
    optimizer = max(moments[recipe.head_optimizer] * size(model.head.parameters()),
                    moments[recipe.finetune_optimizer] * size(trainable))
    model_size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return model_size * (2 if recipe.keep == "best_val" else 1) + optimizer


def check_same_network(recorded: dict, given: dict, path: Path) -> None:
    """Refuse to resume with weights that make a different network than the run was started with."""
    differ = [k for k in ("sha256", "stride_in_1x1", "mean", "std") if recorded.get(k) != given.get(k)]
    if differ:
        names = ", ".join("the tensors" if k == "sha256" else k for k in differ)
        raise TrainingError(f"{path}: the run was started from weights {recorded.get('weights')}; the weights given "
                            f"({given.get('weights')}) differ in {names}: resume with --weights "
                            f"{recorded.get('weights')} (or without --weights)")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `fit`, loaded with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise TrainingError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    missing = {"recipe", "phase", "epoch", "model"} - set(state) if isinstance(state, dict) else {"recipe"}
    if missing:
        raise TrainingError(f"{path}: not a checkpoint written by cifar-transfer (no {', '.join(sorted(missing))})")
    return state
