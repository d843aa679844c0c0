"""Checkpoints: what training writes after every epoch, and how a run resumes from one with
identical results.

A checkpoint holds the model, the optimizer and scheduler, every random generator, the history and
(with keep=best_val) the best epoch's weights. It is written from a copy of the state in a
background thread while the next epoch trains (`Checkpointer`), atomically, and read back with
weights_only=True.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
from torch.utils._pytree import tree_leaves, tree_map

from .. import atomic
from ..model.network import TransferNet
from ..model.weights import first_line
from ..recipe import Recipe
from .distributed import World, gather
from .phases import TrainingError, trainable_stages


@dataclass
class Progress:
    """Where training stands: the history so far, the best epoch (keep=best_val: its number,
    validation accuracy and weights) and the last epoch done (`epoch` epochs of `phase`)."""

    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    phase: int = 1
    epoch: int = 0
    # the validation logits of the epoch that will ship (not checkpointed: after a resume they may
    # be unknown), so the temperature is fitted without another pass over the validation images
    shipped_val_logits: torch.Tensor | None = None

    def first_epoch(self, phase: int, epochs: int) -> int | None:
        """The epoch of `phase` to start at; None when the phase is done."""
        first = self.epoch if phase == self.phase else 0
        return None if phase < self.phase or first >= epochs else first

    def record(
        self, row: dict, model: TransferNet, keep_best: bool, val_logits: torch.Tensor | None = None
    ) -> None:
        self.history.append(row)
        self.phase, self.epoch = row["phase"], row["phase_epoch"]
        if not keep_best:
            self.shipped_val_logits = val_logits
        elif self.best is None or row["val_acc"] > self.best["val_acc"]:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.best = {"epoch": row["epoch"], "val_acc": row["val_acc"], "model": weights}
            self.shipped_val_logits = val_logits


def restore(
    state: dict,
    model: TransferNet,
    recipe: Recipe,
    order: torch.Generator,
    augmentation: torch.Generator,
    world: World,
) -> Progress:
    """Put the model and every random generator back as `state` (a checkpoint) had them; where
    training stood."""
    # as recipes: fields added since take their defaults
    if Recipe.from_dict(state["recipe"]) != recipe:
        raise TrainingError("checkpoint was written by a different recipe")
    model.load_state_dict(state["model"])
    order.set_state(state["generator"])
    ranks = state.get("rank_generators")
    # same world: the same streams
    if world.size > 1 and ranks is not None and len(ranks) == world.size:
        # a row of a saved tensor: set_state reads from its start
        augmentation.set_state(ranks[world.rank].clone())
    torch.set_rng_state(state["torch_rng"])
    # dropout on CUDA draws from these
    if order.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(list(state["history"]), state.get("best"), state["phase"], state["epoch"])


class Checkpointer:
    """Writes a checkpoint after every epoch in a background thread, one at a time;
    `on_saved(history)` runs once it is in place.

    Without a path (ranks other than 0) nothing is written. On leaving the `with` block the last
    write is waited for, and its error raised.
    """

    def __init__(
        self,
        path: Path | None,
        meta: dict | None,
        on_saved: Callable[[list[dict]], None] | None,
        world: World,
    ):
        self.path, self.meta, self.on_saved, self.world = path, meta or {}, on_saved, world
        self.writer = atomic.Background()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        try:
            if kind is None:
                # the last checkpoint is in place (or its error raised) before fit returns
                self.writer.wait()
        finally:
            self.writer.close()

    def save(
        self,
        done: Progress,
        recipe: Recipe,
        model: TransferNet,
        opt: torch.optim.Optimizer,
        sched,
        order: torch.Generator,
        augmentation: torch.Generator,
    ) -> None:
        saved = (
            None if self.on_saved is None else functools.partial(self.on_saved, list(done.history))
        )
        ranks = (
            None  # each rank's augmentation stream, for a resume with the same number of processes
        )
        if self.world.size > 1:  # a collective: every rank takes part
            ranks = gather(augmentation.get_state().to(order.device)[None], self.world).cpu()
        if self.path is None:
            if saved is not None:
                saved()
            return
        self.writer.wait()  # one checkpoint in flight: at most one host copy of the state at a time
        cuda = order.device.type == "cuda"
        state = {
            "recipe": recipe.to_dict(),
            "phase": done.phase,
            "epoch": done.epoch,
            "history": list(done.history),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "generator": order.get_state(),
            "torch_rng": torch.get_rng_state(),
            "meta": self.meta,
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
            "rank_generators": ranks,
        }
        # `best` is a clone that is replaced, never changed: saved as it is, not copied again
        self.writer.submit(self.path, host_copy(state, unchanging={"best": done.best}), then=saved)


def host_copy(state: dict, unchanging: dict) -> Callable[[IO[bytes]], None]:
    """A copy of `state`'s tensors that training cannot change, and the function that saves it with
    the `unchanging` entries (which training no longer touches) to a file.

    On CUDA the copies go to pinned memory without blocking; the write waits for them (an event).
    """
    cuda = any(t.is_cuda for t in tree_leaves(state) if isinstance(t, torch.Tensor))
    copy = tree_map(
        lambda t: (
            t.detach().to("cpu", copy=True, non_blocking=cuda) if isinstance(t, torch.Tensor) else t
        ),
        state,
    )
    copied = torch.cuda.Event() if cuda else None
    if copied is not None:
        copied.record()

    def write(f: IO[bytes]) -> None:
        if copied is not None:
            copied.synchronize()
        torch.save({**copy, **unchanging}, f)

    return write


def checkpoint_bytes(model: TransferNet, recipe: Recipe) -> int:
    """About how large `fit`'s checkpoint grows: the model, the optimizer's state for what trains in
    phase 2 (Adam keeps two moments, SGD with momentum one) and, with keep=best_val, the best
    epoch's weights."""

    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    trainable = [
        p for m in [*trainable_stages(model, 2, recipe), model.head] for p in m.parameters()
    ]
    moments = {"adam": 2, "sgd": 1 if recipe.momentum else 0}
    optimizer = max(
        moments[recipe.head_optimizer] * size(model.head.parameters()),
        moments[recipe.finetune_optimizer] * size(trainable),
    )
    model_size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return model_size * (2 if recipe.keep == "best_val" else 1) + optimizer


def check_same_network(recorded: dict, given: dict, path: Path) -> None:
    """Refuse to resume with weights that make a different network than the run was started with."""
    differ = [
        k for k in ("sha256", "stride_in_1x1", "mean", "std") if recorded.get(k) != given.get(k)
    ]
    if differ:
        names = ", ".join("the tensors" if k == "sha256" else k for k in differ)
        raise TrainingError(
            f"{path}: the run was started from weights {recorded.get('weights')}; the weights "
            f"given ({given.get('weights')}) differ in {names}: resume with --weights "
            f"{recorded.get('weights')} (or without --weights)"
        )


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `fit`, loaded with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise TrainingError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    missing = (
        {"recipe", "phase", "epoch", "model"} - set(state)
        if isinstance(state, dict)
        else {"recipe"}
    )
    if missing:
        raise TrainingError(
            f"{path}: not a checkpoint written by cifar-transfer (no {', '.join(sorted(missing))})"
        )
    return state
