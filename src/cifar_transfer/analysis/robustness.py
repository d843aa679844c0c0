"""Robustness to distribution shift: accuracy under common corruptions (the `imagecorruptions` package)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

# Corruptions of ImageNet-C / CIFAR-10-C that run on 32 x 32 images with current numpy and scikit-image.
CORRUPTIONS = (
    "gaussian_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "snow",
    "contrast",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """imagecorruptions' salt-and-pepper noise, drawn from `rng`: the package's own call to scikit-image draws
    from a fresh unseeded generator, so two identical runs would differ."""
    from skimage.util import random_noise

    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    return np.uint8(np.clip(random_noise(image / 255.0, mode="s&p", amount=amount, rng=rng), 0, 1) * 255)


def corrupt_all(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`images` under corruption `name`; the same seed gives the same array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package imports pkg_resources, which warns
        from imagecorruptions import corrupt

    if name == "impulse_noise":
        rng = np.random.default_rng(seed)
        return np.stack([impulse_noise(im, severity, rng) for im in images])
    np.random.seed(seed)  # the other corruptions draw from numpy's global generator
    return np.stack([np.asarray(corrupt(im, corruption_name=name, severity=severity), dtype=np.uint8) for im in images])


def corruption_accuracy(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    names: tuple[str, ...] = CORRUPTIONS,
    seed: int = 0,
) -> dict:
    """Accuracy on clean images and on each corruption at severities 1-5."""
    clean = float((predict(images) == labels).mean())
    table = {
        name: [float((predict(corrupt_all(images, name, s, seed)) == labels).mean()) for s in SEVERITIES]
        for name in names
    }
    every = [a for accs in table.values() for a in accs]
    return {
        "images": len(labels),
        "clean": clean,
        "severities": list(SEVERITIES),
        "accuracy": table,
        "mean_corrupted": float(np.mean(every)) if every else clean,
    }
