"""Human ambiguity from CIFAR-10H: how much of the model's confusion falls on images people found
ambiguous.

CIFAR-10H holds about 51 human labels per test image, in the original test order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.cifar import CLASSES, DataError
from .metrics import LEAKAGE_PAIRS

PROBS = "cifar10h-probs.npy"
AMBIGUOUS_BELOW = 0.9  # an image is ambiguous when people gave its true class less than this share
CLEAR_FROM = 0.99  # ... and clear when at least this share


def load_human(folder: Path, labels: np.ndarray) -> np.ndarray:
    """The 10000 x 10 human label distributions, checked against the test labels they describe."""
    path = Path(folder) / PROBS
    if not path.is_file():
        raise DataError(f"{path}: no such file (CIFAR-10H: {PROBS} from the cifar-10h release)")
    probs = np.load(path, allow_pickle=False)
    if probs.shape != (len(labels), len(CLASSES)):
        raise DataError(
            f"{path}: shape {probs.shape} does not match {len(labels)} test images x 10 classes"
        )
    agreement = float((probs.argmax(1) == labels).mean())
    if agreement < 0.95:
        raise DataError(
            f"{path}: agrees with only {agreement:.1%} of the test labels: not the same test order"
        )
    return probs


def human_analysis(
    human: np.ndarray, labels: np.ndarray, pred: np.ndarray, losses: np.ndarray, top_k: int = 16
) -> dict:
    """Human vs model confusion, the leakage split by human ambiguity, and errors on human-clear
    images."""
    n = len(CLASSES)
    human_cm = np.zeros((n, n))
    # each image adds its human label distribution to its true row
    np.add.at(human_cm, labels, human)
    human_cm /= np.maximum(human_cm.sum(1, keepdims=True), 1e-12)
    p_true = human[np.arange(len(labels)), labels]
    ambiguous = p_true < AMBIGUOUS_BELOW
    pairs = []
    for a, b in LEAKAGE_PAIRS:
        for src, dst in ((a, b), (b, a)):
            i, j = CLASSES.index(src), CLASSES.index(dst)
            errors = (labels == i) & (pred == j)
            amb = int((errors & ambiguous).sum())
            pairs.append(
                {
                    "true": src,
                    "predicted": dst,
                    "errors": int(errors.sum()),
                    "on_ambiguous": amb,
                    "on_clear": int(errors.sum()) - amb,
                    "share_ambiguous": amb / max(int(errors.sum()), 1),
                    "ambiguous_rate_in_class": float(ambiguous[labels == i].mean())
                    if (labels == i).any()
                    else 0.0,
                }
            )
    wrong = pred != labels
    clear_errors = np.flatnonzero(wrong & (p_true >= CLEAR_FROM))
    clear_errors = clear_errors[np.argsort(-losses[clear_errors], kind="stable")][:top_k]
    return {
        "ambiguous_below": AMBIGUOUS_BELOW,
        "clear_from": CLEAR_FROM,
        "human_confusion": human_cm.round(6).tolist(),
        "ambiguous_images": int(ambiguous.sum()),
        "errors": int(wrong.sum()),
        "errors_on_ambiguous": int((wrong & ambiguous).sum()),
        "errors_on_clear": int((wrong & (p_true >= CLEAR_FROM)).sum()),
        "leakage": pairs,
        "clear_errors": [
            {
                "index": int(i),
                "true": CLASSES[labels[i]],
                "predicted": CLASSES[pred[i]],
                "human_true": float(p_true[i]),
            }
            for i in clear_errors
        ],
    }
