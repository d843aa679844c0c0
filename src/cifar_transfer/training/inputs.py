"""What each phase trains and validates on, and one step's batch of it.

Frozen steps see the same input every epoch, so their activations are computed once and the
trainable steps train on them: the same mathematics (frozen BatchNorm is in inference mode), a
fraction of the cost. Phase 1 trains the head on cached base features; phase 2 with `finetune_from`
past the stem trains on cached activations of the stages before it. Flip augmentation survives
caching: each image is cached with its mirror (and, for `flip+noise`, a shifted copy) and every step
draws one per image. Random crops cannot be cached; they run the full forward pass (as does
everything with `cache=false`). AugMix mixes a third of each batch anew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.augment import augment, augmixed, shifted, to_input
from ..model.inference import autocast, predict_logits
from ..model.network import Part, TransferNet, folded
from ..recipe import Recipe
from .distributed import ALONE, World, gather
from .phases import Phase
from .seeds import shifted_copies

# one tensor per cached view of every image: as stored, mirrored, shifted
Activations = tuple[torch.Tensor, ...]
# augmentations whose cache holds each image's mirror
MIRRORED = (
    "flip",
    "flip+noise",
    "flip+augmix",
)


@dataclass
class Batch:
    """One step's inputs: a row per image, then (for the consistency loss) two AugMix views of each
    image in `mixed` (all first mixes, then all second)."""

    inputs: torch.Tensor
    mixed: torch.Tensor | None = None  # rows of the images whose mixes follow


@dataclass
class FreshAugMix:
    """Cached training inputs of which a third of each batch is made anew every step: AugMix of the
    images, run through the frozen steps (a new mix every step cannot be cached; forwards only, a
    third of the images).

    With the recipe's `consistency`, the third keeps its clean views and two mixes of each of its
    images follow the batch instead, for AugMix's Jensen-Shannon consistency loss (the mixes are of
    the image as stored, the clean view its mirror half the time: the loss asks for flip invariance
    too).
    """

    cached: Activations  # each image's cached activations and its mirror's
    images: torch.Tensor  # the uint8 training images
    frozen_steps: Part  # the frozen steps the activations came through, BatchNorm folded

    @torch.no_grad()
    def batch(self, idx: torch.Tensor, gen: torch.Generator, recipe: Recipe) -> Batch:
        xb = draw_batch(self.cached, idx, gen, recipe).inputs
        pick = (torch.rand(len(idx), generator=gen, device=gen.device) < 1 / 3).to(idx.device)
        if not pick.any():
            return Batch(xb)
        mixes = 2 if recipe.consistency else 1
        with autocast(idx.device, recipe.precision):
            fresh = self.frozen_steps(
                to_input(augmixed(self.images[idx[pick]].repeat(mixes, 1, 1, 1), gen))
            )
        if recipe.consistency:
            return Batch(torch.cat([xb, fresh.to(xb.dtype)]), pick.nonzero().squeeze(1))
        xb[pick] = fresh.to(xb.dtype)  # draw_batch's tensor is a new one, never the cache
        return Batch(xb)


TrainingInputs = torch.Tensor | Activations | FreshAugMix


def draw_batch(x: TrainingInputs, idx: torch.Tensor, gen: torch.Generator, recipe: Recipe) -> Batch:
    """The inputs of one step: uint8 images augmented now, or one cached view per image drawn at
    random."""
    if isinstance(x, FreshAugMix):
        return x.batch(idx, gen, recipe)
    if isinstance(x, torch.Tensor):
        return Batch(to_input(augment(x[idx], recipe.augment, gen)))
    if len(x) == 1:
        return Batch(x[0][idx])
    if len(x) == 3:  # image, mirror, shifted copy: one each step, a third each
        view = torch.randint(0, 3, (len(idx),), generator=gen, device=gen.device).to(idx.device)
        return Batch(
            torch.stack([v[idx] for v in x])[view, torch.arange(len(idx), device=idx.device)]
        )
    mirror = torch.rand(len(idx), generator=gen, device=gen.device).to(idx.device) < 0.5
    return Batch(torch.where(mirror.view(-1, *[1] * (x[0].ndim - 1)), x[1][idx], x[0][idx]))


class PhaseInputs:
    """What each phase trains and validates on: the uint8 images, or what the frozen steps make of
    them, computed once (the activations entering `finetune_from`, and phase 1's base features from
    those)."""

    def __init__(
        self,
        model: TransferNet,
        recipe: Recipe,
        train: torch.Tensor,
        val: torch.Tensor,
        world: World,
        progress: bool,
    ):
        self.model, self.recipe, self.images, self.world, self.progress = (
            model,
            recipe,
            (train, val),
            world,
            progress,
        )
        self.entering_finetune: tuple[Activations, Activations] | None = (
            None  # for train and val, once computed
        )

    def for_phase(
        self, phase: Phase
    ) -> tuple[tuple[TrainingInputs, torch.Tensor | Activations], str]:
        """(training inputs, validation inputs) and the step they enter the model at."""
        r = self.recipe
        if r.cache and r.finetune_from != "stem" and self.entering_finetune is None:
            desc = f"caching activations entering {r.finetune_from}"
            self.entering_finetune = self.cache(self.images, "stem", r.finetune_from, desc)
        xs, entering = (
            (self.entering_finetune, r.finetune_from)
            if self.entering_finetune
            else (self.images, "stem")
        )
        # the full forward pass
        if not r.cache or (phase == Phase.HEAD and r.augment == "crop+flip"):
            return xs, "stem"
        begin = "head" if phase == Phase.HEAD else r.finetune_from
        if begin != entering:  # phase 1: the head trains on base features computed once
            xs = self.cache(xs, entering, begin, "phase 1: caching base features")
        # AugMix needs the base
        if phase == Phase.FINETUNE and r.augment == "flip+augmix" and begin != "stem":
            frozen_steps = Part(folded(self.model), "stem", begin)
            xs = (FreshAugMix(xs[0], self.images[0], frozen_steps), xs[1])
        return xs, begin

    def cache(self, xs: tuple, start: str, stop: str, desc: str) -> tuple[Activations, Activations]:
        images = xs[0]
        if isinstance(images, torch.Tensor) and self.recipe.augment == "flip+noise":
            # the shifted copy is drawn once (the same on every rank) and cached as a third view
            images = (
                images,
                images.flip(-1),
                shifted(images, shifted_copies(self.recipe.seed, images.device)),
            )
        mirrored = self.recipe.augment in MIRRORED
        train = cache_activations(
            self.model,
            images,
            start,
            stop,
            self.recipe,
            mirrored,
            desc if self.progress else None,
            self.world,
        )
        return train, cache_activations(
            self.model, xs[1], start, stop, self.recipe, world=self.world
        )


def cache_activations(
    model: TransferNet,
    x: torch.Tensor | Activations,
    start: str,
    stop: str,
    recipe: Recipe,
    mirrored: bool = False,
    desc: str | None = None,
    world: World = ALONE,
) -> Activations:
    """What the frozen steps from `start` up to `stop` make of `x`, computed once (each rank its
    share, then gathered: every rank holds all of it), with their BatchNorm folded into the
    convolutions.

    `x` is uint8 images (with `mirrored`, their mirror images are cached too) or activations a
    previous call made. The blocks' activations are kept in bf16 unless the recipe's precision is
    fp32: half the memory; where "auto" computes in fp32 they are rounded once, as bf16 autocast
    rounds every block's output. The base features entering the head keep the precision they were
    computed in.
    """
    if isinstance(x, torch.Tensor):
        x = (x, x.flip(-1)) if mirrored else (x,)
    # the steps are frozen when cached: BatchNorm in inference mode
    part = Part(folded(model), start, stop)
    # None: as computed
    kept = torch.bfloat16 if stop != "head" and recipe.precision != "fp32" else None
    return tuple(
        gather(
            predict_logits(
                part, v[world.rows(len(v))], recipe.eval_batch_size, recipe.precision, desc, kept
            ),
            world,
        )
        if len(v)
        else v
        for v in x
    )
