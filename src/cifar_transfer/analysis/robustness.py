"""Robustness to distribution shift: accuracy under CIFAR-10-C's corruptions at CIFAR-10-C's
strength.

The benchmark number is the mean accuracy over the 15 benchmark corruptions x 5 severities (its
complement, the mean corruption error, is what CIFAR-10-C papers report unnormalised); the 4
held-out corruptions are reported beside it, never in it. On a class-balanced subset of n test
images the mean's sampling error is at most sqrt(p (1 - p) / n) (the cells share their images, so
they are not independent draws): the report gives the 95% margin 1.96 times that.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable

import numpy as np

from ..data import corruptions

ORIGIN = (
    "drawn by this tool with the constants of the CIFAR-10-C generator (Hendrycks & Dietterich, "
    "2019), seeded; not the released files (evaluate --data CIFAR-10-C/ reads those)"
)


def missing_dependency() -> str | None:
    """Why the corruptions cannot be computed here, or None (they need OpenCV from the analysis
    group)."""
    if importlib.util.find_spec("cv2") is None:
        return "OpenCV is not installed: pip install 'cifar-transfer[analysis]'"
    return None


def corruption_accuracy(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    names: Iterable[str] = corruptions.BENCHMARK,
    seed: int = 0,
    clean_predictions: np.ndarray | None = None,
    seen: tuple[str, ...] = (),
) -> dict:
    """Accuracy on the clean images and on each available corruption at severities 1-5, and the
    summary (`seen`:

    the corruptions the model's augmentation trained on).
    """
    clean = predict(images) if clean_predictions is None else clean_predictions
    available = corruptions.available()
    table = {
        name: [
            float((predict(corruptions.corrupt(images, name, s, seed)) == labels).mean())
            for s in corruptions.SEVERITIES
        ]
        for name in names
        if name in available
    }
    return summarise(table, float((clean == labels).mean()), len(labels), ORIGIN, seen)


def summarise(
    table: dict[str, list[float]],
    clean: float,
    images: int,
    origin: str,
    seen: tuple[str, ...] = (),
) -> dict:
    """The table with the benchmark mean (over the 15 when all are present), its error and margin,
    and the mean over the benchmark corruptions the model never trained on (`seen`: those its
    augmentation makes)."""
    benchmark = [a for name, accs in table.items() if name in corruptions.BENCHMARK for a in accs]
    unseen = [
        a
        for name, accs in table.items()
        if name in corruptions.BENCHMARK and name not in seen
        for a in accs
    ]
    held_out = [a for name, accs in table.items() if name in corruptions.HELD_OUT for a in accs]
    mean = float(np.mean(benchmark)) if benchmark else None
    return {
        "images": images,
        "origin": origin,
        "clean": clean,
        "severities": list(corruptions.SEVERITIES),
        "accuracy": table,
        "benchmark_corruptions": sum(name in corruptions.BENCHMARK for name in table),
        "mean_corrupted": mean,
        "mean_corruption_error": None if mean is None else 1 - mean,
        "margin_95": None if mean is None else float(1.96 * np.sqrt(mean * (1 - mean) / images)),
        "mean_held_out": float(np.mean(held_out)) if held_out else None,
        "trained_on": [name for name in seen if name in table],
        "mean_unseen": float(np.mean(unseen)) if unseen else None,
    }
