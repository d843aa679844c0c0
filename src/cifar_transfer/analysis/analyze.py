"""Error analysis that tests the original report's explanations: human ambiguity (CIFAR-10H), where
the model looks (Grad-CAM, centre vs border), flip test-time augmentation, and robustness to
CIFAR-10-C's corruptions.

It computes; `reporting.figures.analysis_figures` draws. (Calibration belongs to the shipped model:
analysis.calibration.)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import corruptions
from ..data.augment import TRAINS_ON_CORRUPTIONS
from ..data.cifar import DataError, Dataset, balanced_indices
from ..model.inference import flip_tta, logits_for
from ..model.network import TransferNet
from ..recipe import Recipe
from . import attribution, robustness
from .human import human_analysis, load_human

NOT_CIFAR_SIZE = (
    "CIFAR-10-C's corruptions are defined for CIFAR-10's 32 x 32 images and classes; this data is "
    "neither, and no benchmark of corruptions at its size is built in"
)


@dataclass
class Analysis:
    """The analysis's numbers (JSON-ready `result`), and what its figures show beyond them."""

    result: dict
    predictions: np.ndarray  # the model's class for each test image
    # Grad-CAM overlays of the worst errors (uint8 RGB), described by `gradcam_rows`
    gradcam: np.ndarray
    gradcam_rows: list[dict]


def analyze(
    model: TransferNet,
    recipe: Recipe,
    test: Dataset,
    human_dir: Path | None = None,
    test_logits: np.ndarray | None = None,
) -> Analysis:
    """Every analysis on `test`; `test_logits`, when the caller has them already, save a pass over
    it."""
    if test_logits is None:
        test_logits = logits_for(model, test.images, recipe)
    losses = F.cross_entropy(
        torch.from_numpy(test_logits), torch.from_numpy(test.labels), reduction="none"
    ).numpy()
    pred = test_logits.argmax(1)
    result: dict = {}
    result["tta"] = _flip_tta(model, recipe, test, test_logits)
    result["human"] = _human(human_dir, test, pred, losses)
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        result["attribution"] = {
            "skipped": "grad-cam is not installed: pip install 'cifar-transfer[analysis]'"
        }
        overlays, rows = np.zeros((0, 32, 32, 3), np.uint8), []
    else:
        result["attribution"], overlays, rows = _attribution(model, recipe, test, pred, losses)

    def classify(batch: np.ndarray) -> np.ndarray:
        return logits_for(model, batch, recipe).argmax(1)

    result["robustness"] = corruption_robustness(
        classify, recipe, test, pred, recipe.corruption_images
    )
    return Analysis(result, pred, overlays, rows)


def corruption_robustness(
    classify: Callable[[np.ndarray], np.ndarray],
    recipe: Recipe,
    test: Dataset,
    pred: np.ndarray | None,
    images: int,
    names: tuple[str, ...] = corruptions.BENCHMARK,
) -> dict:
    """CIFAR-10-C's corruptions on `images` class-balanced test images; `classify` gives a batch's
    classes, `pred` the clean predictions, if known."""
    if (why := robustness.missing_dependency()) is not None:
        return {"skipped": why}
    if not test.is_cifar10:
        return {"skipped": NOT_CIFAR_SIZE}
    index = balanced_sample(test, images, recipe.seed)
    return robustness.corruption_accuracy(
        classify,
        test.images[index],
        test.labels[index],
        names=names,
        seed=recipe.seed,
        clean_predictions=None if pred is None else pred[index],
        seen=TRAINS_ON_CORRUPTIONS.get(recipe.augment, ()),
    )


def _flip_tta(model: TransferNet, recipe: Recipe, test: Dataset, test_logits: np.ndarray) -> dict:
    """Accuracy with and without flip test-time augmentation on `tta_images` class-balanced test
    images."""
    tta = balanced_sample(test, recipe.tta_images, recipe.seed)
    flipped = logits_for(model, test.images[tta], recipe, flip=True)
    plain = float((test_logits[tta].argmax(1) == test.labels[tta]).mean())
    with_tta = float((flip_tta(test_logits[tta], flipped).argmax(1) == test.labels[tta]).mean())
    return {
        "images": len(tta),
        "sampled": len(tta) < len(test),
        "accuracy": plain,
        "accuracy_flip_tta": with_tta,
        "change": with_tta - plain,
    }


def balanced_sample(data: Dataset, n: int, seed: int) -> np.ndarray:
    """Sorted indices of about `n` class-balanced images (all of them when `n` covers the set)."""
    if n >= len(data):
        return np.arange(len(data))
    counts = np.bincount(data.labels, minlength=len(data.classes))
    per_class = min(max(n // len(data.classes), 1), int(counts.min()))
    rng = np.random.default_rng(seed)
    return np.sort(balanced_indices(data.labels, per_class, rng, data.source, data.classes))


def _human(human_dir: Path | None, test: Dataset, pred: np.ndarray, losses: np.ndarray) -> dict:
    if not test.is_cifar10:
        return {"skipped": "CIFAR-10H labels CIFAR-10's test set; this test set is another"}
    if human_dir is None:
        return {
            "skipped": "no CIFAR-10H folder given "
            "(--human-labels DIR or $CIFAR_TRANSFER_HUMAN_LABELS)"
        }
    try:
        human = load_human(human_dir, test.labels)
    except DataError as e:
        return {"skipped": str(e)}
    return human_analysis(human, test.labels, pred, losses)


def _attribution(
    model: TransferNet, recipe: Recipe, test: Dataset, pred: np.ndarray, losses: np.ndarray
) -> tuple[dict, np.ndarray, list[dict]]:
    """Centre share of Grad-CAM for a sample of errors vs correct predictions, and the overlays of
    the worst errors."""
    rng = np.random.default_rng(recipe.seed)
    wrong, right = np.flatnonzero(pred != test.labels), np.flatnonzero(pred == test.labels)
    k = recipe.gradcam_images
    errors = rng.choice(wrong, min(k, len(wrong)), replace=False)
    correct = rng.choice(right, min(k, len(right)), replace=False)
    share = {
        name: attribution.centre_share(attribution.grad_cam(model, test.images[idx], pred[idx]))
        for name, idx in (("errors", errors), ("correct", correct))
    }
    worst = wrong[np.argsort(-losses[wrong], kind="stable")][:16]
    maps = attribution.grad_cam(model, test.images[worst], pred[worst])
    names = test.classes
    rows = [
        {"index": i, "true": names[test.labels[w]], "predicted": names[pred[w]]}
        for i, w in enumerate(worst)
    ]
    result = {
        "layer": attribution.target_layer(model)[0],
        "images_per_group": k,
        "centre_share_errors": float(share["errors"].mean()) if len(errors) else None,
        "centre_share_correct": float(share["correct"].mean()) if len(correct) else None,
        "uniform_centre_share": 0.25,
    }
    return result, attribution.overlays(test.images[worst], maps), rows
