"""Batches as tensor ops on the training device: uint8 -> float input, random crop + flip.

No per-image Python and no DataLoader: CIFAR-sized data lives on the device and a whole batch is
augmented by a few indexing ops (after airbench).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PAD = 4


def as_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """N x 32 x 32 x 3 uint8 (numpy) -> N x 3 x 32 x 32 uint8 tensor on `device`, and int64 labels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
    return x, torch.from_numpy(labels).long().to(device)


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float RGB in [0, 1], the model's input."""
    return x.float().div_(255)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """Random 32x32 crop from the image reflect-padded by `pad` pixels, and a horizontal flip with p = 0.5.

    pad=0: flips only."""
    n, _, h, w = x.shape
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # n x h x 1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # n x 1 x w
    flip = torch.rand(n, generator=generator, device=generator.device).to(x.device) < 0.5
    cols = torch.where(flip[:, None, None], 2 * dx[:, None, None] + w - 1 - cols, cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A recipe's `augment` applied to uint8 images: "none", "flip" or "crop+flip"."""
    if kind == "none":
        return x
    return random_crop_flip(x, generator, pad=PAD if kind == "crop+flip" else 0)
