"""Batches as tensor ops on the training device: uint8 -> float input, random crop + flip.

No per-image Python and no DataLoader: CIFAR-sized data lives on the device and a whole batch is
augmented by a few indexing ops (after airbench).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PAD = 4


def to_nchw(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """N x S x S x 3 uint8 images as stored (numpy, channels last) -> N x 3 x S x S uint8 tensor on
    `device`, as the model takes them.

    The one layout conversion.
    """
    return (
        torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
    )


def as_tensors(
    images: np.ndarray, labels: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as `to_nchw` makes them, and int64 labels, on `device`."""
    return to_nchw(images, device), torch.from_numpy(labels).long().to(device)


def to_input(x: torch.Tensor) -> torch.Tensor:
    """Uint8 images -> float RGB in [0, 1], the model's input."""
    return x.float().div_(255)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """Random 32x32 crop from the image reflect-padded by `pad` pixels, and a horizontal flip with p
    = 0.5.

    pad=0: flips only."""
    n, _, h, w = x.shape
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device).to(
        x.device
    )
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # n x h x 1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # n x 1 x w
    flip = torch.rand(n, generator=generator, device=generator.device).to(x.device) < 0.5
    cols = torch.where(flip[:, None, None], 2 * dx[:, None, None] + w - 1 - cols, cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


# CIFAR-10-C's Gaussian-noise sigmas and contrast factors, severities 1-5: the shifts `lean` is
# weakest under
NOISE_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)


def shifted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 images under Gaussian noise or reduced contrast (half each), at a severity from 1 to
    5 drawn per image: the shift the `flip+noise` augmentation trains on."""
    n, device = len(x), generator.device
    severity = torch.randint(0, 5, (n,), generator=generator, device=device).to(x.device)
    sigma = torch.tensor(NOISE_SIGMA, device=x.device)[severity].view(-1, 1, 1, 1)
    factor = torch.tensor(CONTRAST, device=x.device)[severity].view(-1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=generator, device=device).to(x.device)
    is_noise = (
        (torch.rand(n, generator=generator, device=device) < 0.5).to(x.device).view(-1, 1, 1, 1)
    )
    image = x.float() / 255
    means = image.mean((2, 3), keepdim=True)
    out = torch.where(is_noise, image + noise * sigma, (image - means) * factor + means)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def augmixed(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uint8 images, each under its own AugMix (Hendrycks et al., 2020; torchvision's), drawn from
    `generator`.

    Without the operations that overlap CIFAR-10-C's corruptions (contrast, colour, brightness,
    sharpness: `all_ops=False`), as the paper trains for that benchmark. One image at a time:
    torchvision gives a batch one chain of operations.
    """
    from torchvision.transforms.v2 import AugMix

    if not len(x):
        return x
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    mix = AugMix(all_ops=False)
    # torchvision draws from the global generator: seed it from ours
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([mix(image) for image in x.cpu()]).to(x.device)


SHIFTS = {"flip+noise": shifted, "flip+augmix": augmixed}
# The CIFAR-10-C benchmark corruptions each augmentation trains on, at the benchmark's own strength:
# a model is not to be scored on those as if it had never seen them (Hendrycks & Dietterich 2019);
# AugMix leaves out every operation that overlaps them.
TRAINS_ON_CORRUPTIONS = {
    "flip+noise": ("gaussian_noise", "contrast")
}  # augmentations that replace a third of the images


def augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A recipe's `augment` applied to uint8 images: "none", "flip", "crop+flip", or a flip and then
    a third of the images replaced by their `shifted` copy ("flip+noise") or an AugMix of them
    ("flip+augmix")."""
    if kind == "none":
        return x
    x = random_crop_flip(x, generator, pad=PAD if kind == "crop+flip" else 0)
    if kind not in SHIFTS:
        return x
    pick = (torch.rand(len(x), generator=generator, device=generator.device) < 1 / 3).to(x.device)
    x[pick] = SHIFTS[kind](x[pick], generator)
    return x
