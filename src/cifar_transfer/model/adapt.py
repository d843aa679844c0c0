"""Test-time adaptation: every BatchNorm's statistics re-estimated on unlabelled images of a new
domain, and mapped onto the statistics the training images had there.

Plain re-estimation (Schneider et al., NeurIPS 2020) replaces each layer's running mean and variance
with the target images'. Here that breaks the frozen stages: their running statistics are
ImageNet's, and the trained top learnt on what those stages make of the *training* images, not on a
normalised output. So each BatchNorm's input x is instead moved, per channel, from the target
images' moments to the training images' moments,

    x' = (x - mean_target) * sqrt((var_source + eps) / (var_target + eps)) + mean_source,

and the layer then normalises as it was trained. When the target is the training domain the map is
the identity; a handful of target images is steadied by a prior: the target moments are blended with
the source ones as if `prior` source images had been seen too (Schneider et al.'s N). The map is
affine, so it folds into the layer's running statistics and an adapted model runs exactly as fast as
the saved one.

The adaptation pass is one forward pass over the target images: each layer's moments are measured on
inputs that the layers before it have already mapped.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..data.augment import to_nchw
from ..errors import CifarTransferError
from ..recipe import Recipe
from .inference import predict_logits

# Source pseudo-images blended into the target's moments (Schneider et al.'s N): measured against 0
# and 16 on 8 to 128 images (docs/robustness.md, bench/design/adapt.py prior)
PRIOR = 64
# Training images whose moments are saved with a model: enough that the moments' sampling error is
# far below the shift between domains, few enough to cost a small part of a run's test pass
SOURCE_IMAGES = 500

TRANSDUCTIVE = (
    "adapted on the unlabelled test images themselves (transductive: BatchNorm statistics "
    "re-estimated on each set of images before classifying it); not comparable with "
    "standard, image-by-image results"
)

# BatchNorm name -> per-channel (mean, variance) of its input
Moments = dict[str, tuple[torch.Tensor, torch.Tensor]]


class AdaptError(CifarTransferError):
    """The model cannot be adapted (no training-image statistics saved with it, no images to adapt
    on)."""


def batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


class _Accumulator:
    """Per-channel sums of x and x^2 over every position of every image seen, in float64."""

    def __init__(self):
        self.images, self.positions, self.sum, self.squares = 0, 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.images += len(x)
        self.positions += x.numel() // x.shape[1]
        self.sum = self.sum + x.sum((0, 2, 3)).double()
        self.squares = self.squares + x.square().sum((0, 2, 3)).double()

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / self.positions
        return mean.float(), (self.squares / self.positions - mean.square()).clamp_min(0).float()


@contextmanager
def _hooks(model: nn.Module, make_hook) -> Iterator[dict[str, _Accumulator]]:
    """A forward pre-hook on every BatchNorm (`make_hook(name, accumulator)`), removed on exit."""
    sums = {name: _Accumulator() for name in batchnorms(model)}
    handles = [
        bn.register_forward_pre_hook(make_hook(name, sums[name]))
        for name, bn in batchnorms(model).items()
    ]
    try:
        yield sums
    finally:
        for h in handles:
            h.remove()


def source_moments(model: nn.Module, images: np.ndarray, recipe: Recipe) -> Moments:
    """Each BatchNorm's input moments over `images` (N x S x S x 3 uint8, the training images,
    unaugmented), through the model as trained (BatchNorm in inference mode, not folded)."""

    def record(name, acc):
        return lambda module, args: acc.add(args[0])

    model = model.eval()
    with _hooks(model, record) as sums:
        predict_logits(
            model, to_nchw(images, _device(model)), recipe.eval_batch_size, recipe.precision
        )
    return {name: acc.moments() for name, acc in sums.items()}


def training_moments(model: nn.Module, train_images: np.ndarray, recipe: Recipe) -> Moments:
    """`source_moments` over SOURCE_IMAGES training images drawn with the recipe's seed (all, if
    fewer)."""
    rng = np.random.default_rng(recipe.seed)
    pick = np.sort(rng.permutation(len(train_images))[:SOURCE_IMAGES])
    return source_moments(model, train_images[pick], recipe)


def adapted(
    model: nn.Module, images: np.ndarray, recipe: Recipe, source: Moments, prior: float = PRIOR
) -> nn.Module:
    """A copy of `model` (unfolded: its BatchNorm layers present) whose BatchNorm statistics map
    `images`' moments onto `source`'s; `model` itself is left as it was."""
    if len(images) == 0:
        raise AdaptError("adapt: no images to adapt on")
    layers = batchnorms(model)
    if set(source) != set(layers) or any(
        source[n][0].shape != (bn.num_features,) for n, bn in layers.items()
    ):
        raise AdaptError(
            "adapt: the training-image statistics do not match this model's BatchNorm layers"
        )
    model = copy.deepcopy(model).eval()
    target: Moments = {}

    def map_to_source(name, acc):
        def hook(module, args):
            acc.add(args[0])
            target[name] = _blend(acc.moments(), source[name], acc.images, prior)
            return (_mapped(args[0], target[name], source[name], module.eps),)

        return hook

    # the pass maps each batch with the moments seen so far: shuffled (seeded), the first batches
    # of a folder sorted by class are not mapped with one class's moments
    shuffled = images[np.random.default_rng(0).permutation(len(images))]
    with _hooks(model, map_to_source):
        predict_logits(
            model, to_nchw(shuffled, _device(model)), recipe.eval_batch_size, recipe.precision
        )
    for name, bn in batchnorms(model).items():
        _fold(bn, target[name], source[name])
    return model


def _blend(
    target: tuple, source: tuple, images: int, prior: float
) -> tuple[torch.Tensor, torch.Tensor]:
    w = images / (images + prior)
    return w * target[0] + (1 - w) * source[0], w * target[1] + (1 - w) * source[1]


def _mapped(x: torch.Tensor, target: tuple, source: tuple, eps: float) -> torch.Tensor:
    scale = ((source[1] + eps) / (target[1] + eps)).sqrt()
    shift = source[0] - target[0] * scale
    return (x * _channels(scale, x) + _channels(shift, x)).to(x.dtype)


def _channels(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.device).view(1, -1, 1, 1)


def _fold(bn: nn.modules.batchnorm._BatchNorm, target: tuple, source: tuple) -> None:
    """Running statistics with which the layer computes on x what it computed on the mapped x'
    before: BN(x') with (mean_r, var_r) equals BN(x) with mean = mean_t - (mean_s - mean_r) / r
    and var = (var_r + eps) / r^2 - eps, where r = sqrt((var_s + eps) / (var_t + eps))."""
    mean_r, var_r = bn.running_mean.double(), bn.running_var.double()
    mean_t, var_t = (t.double().to(mean_r.device) for t in target)
    mean_s, var_s = (s.double().to(mean_r.device) for s in source)
    r = ((var_s + bn.eps) / (var_t + bn.eps)).sqrt()
    bn.running_mean.copy_(mean_t - (mean_s - mean_r) / r)
    bn.running_var.copy_((var_r + bn.eps) / r.square() - bn.eps)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
