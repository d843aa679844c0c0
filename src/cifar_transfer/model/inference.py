"""Inference in batches: logits for uint8 images or cached activations, under the recipe's
precision."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data.augment import to_input, to_nchw
from ..recipe import Recipe


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=computes_in_bf16(device, precision)
    )


def computes_in_bf16(device: torch.device, precision: str) -> bool:
    """The recipe's precision on `device`: "auto" is bf16 where the hardware computes it, fp32
    elsewhere."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device.type))


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA GPU with bf16 units, a CPU with AMX or
    AVX-512 BF16.

    Elsewhere it is emulated, slower than fp32 (docs/performance.md has the measurement).
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


@torch.inference_mode()
def predict_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_size: int,
    precision: str = "fp32",
    desc: str | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Logits (on x's device) for uint8 images or cached activations `x`, in batches.

    `dtype` is the outputs' (None: the precision they were computed in), converted batch by batch so
    that activations cached in bf16 never sit in memory in fp32 all at once. Each batch is copied
    into one tensor allocated for all of them (a list joined at the end would hold everything twice
    at its peak), which also keeps a CUDA-graph replay's reused output buffer.
    """
    out = None
    for i in tqdm(
        range(0, len(x), batch_size), desc=desc, disable=desc is None, unit="batch", leave=False
    ):
        xb = x[i : i + batch_size]
        with autocast(x.device, precision):
            y = forward(to_input(xb) if xb.dtype == torch.uint8 else xb)
        if out is None:
            out = torch.empty(
                (len(x), *y.shape[1:]),
                dtype=dtype or y.dtype,
                device=y.device,
                memory_format=_layout(y),
            )
        out[i : i + len(y)] = y
    if out is None:
        raise ValueError("predict_logits: no images to predict")
    return out


def _layout(y: torch.Tensor) -> torch.memory_format:
    """Channels-last where `y` is (activations of a channels-last model), so that what is cached
    keeps it."""
    nhwc = (
        y.ndim == 4 and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
    )
    return torch.channels_last if nhwc else torch.contiguous_format


def logits_for(
    model: nn.Module,
    images: np.ndarray,
    recipe: Recipe,
    flip: bool = False,
    desc: str | None = None,
) -> np.ndarray:
    """Logits (float32 numpy) for N x S x S x 3 uint8 images, on the model's device; `flip` mirrors
    them."""
    x = to_nchw(images, next(model.parameters()).device)
    return (
        predict_logits(
            model.eval(), x.flip(-1) if flip else x, recipe.eval_batch_size, recipe.precision, desc
        )
        .cpu()
        .numpy()
    )


def flip_tta(
    logits: np.ndarray, mirrored_logits: np.ndarray, temperature: float = 1.0
) -> np.ndarray:
    """Flip test-time augmentation: the mean of the probabilities (softmax(logits / T)) of each
    image and of its mirror.

    The one implementation: `evaluate --tta`, the error analysis, `predict` and `serve` use it.
    """
    both = (
        torch.from_numpy(np.stack([logits, mirrored_logits])).double().div(temperature).softmax(-1)
    )
    return both.mean(0).numpy()


def tta_logits(model: nn.Module, images: np.ndarray, recipe: Recipe) -> np.ndarray:
    """Flip test-time augmentation as logits: the log of `flip_tta`'s mean probability."""
    both = [logits_for(model, images, recipe, flip=f) for f in (False, True)]
    return np.log(flip_tta(*both)).astype(np.float32)
