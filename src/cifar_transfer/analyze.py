"""Error analysis that tests the original report's explanations: human ambiguity (CIFAR-10H), where the model
looks (Grad-CAM, centre vs border), calibration (ECE, temperature scaling on the validation set), flip
test-time augmentation, and robustness to common corruptions. Figures are written next to the results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix

from . import attribution, figures, robustness
from .calibration import calibrate
from .data import CLASSES, DataError, Dataset, balanced_indices
from .evaluate import logits_for
from .human import human_analysis, load_human
from .model import TransferNet
from .recipe import Recipe


def analyze(model: TransferNet, recipe: Recipe, val: Dataset, test: Dataset, out: Path,
            human_dir: Path | None = None, test_logits: np.ndarray | None = None,
            val_logits: np.ndarray | None = None) -> dict:
    """Every analysis on `test` (the temperature is fitted on `val`); figures go to `out`.

    `test_logits` and `val_logits`, when the caller has them already, save a pass over those sets.
    """
    if test_logits is None:
        test_logits = logits_for(model, test.images, recipe)
    losses = F.cross_entropy(torch.from_numpy(test_logits), torch.from_numpy(test.labels), reduction="none").numpy()
    pred = test_logits.argmax(1)
    result: dict = {}

    if len(val):
        if val_logits is None:
            val_logits = logits_for(model, val.images, recipe)
        cal = result["calibration"] = calibrate(val_logits, val.labels, test_logits, test.labels)
        figures.reliability(cal["bins_before"], cal["bins_after"], cal["temperature"], out / "reliability.png")
    else:
        result["calibration"] = {"skipped": "no validation split (val_size=0) to fit a temperature on"}

    tta = _balanced(test.labels, recipe.tta_images, recipe.seed, test.source)
    flipped = logits_for(model, test.images[tta], recipe, flip=True)
    tta_pred = (torch.from_numpy(test_logits[tta]).softmax(1) + torch.from_numpy(flipped).softmax(1)).argmax(1)
    plain, both = float((pred[tta] == test.labels[tta]).mean()), float((tta_pred.numpy() == test.labels[tta]).mean())
    result["tta"] = {"images": len(tta), "sampled": len(tta) < len(test), "accuracy": plain,
                     "accuracy_flip_tta": both, "change": both - plain}

    result["human"] = _human(human_dir, test, pred, losses, out)
    result["attribution"] = _attribution(model, recipe, test, pred, losses, out)

    index = _balanced(test.labels, recipe.corruption_images, recipe.seed, test.source)
    result["robustness"] = robustness.corruption_accuracy(
        lambda images: logits_for(model, images, recipe).argmax(1), test.images[index], test.labels[index],
        seed=recipe.seed)
    figures.robustness(result["robustness"], out / "robustness.png")
    return result


def _balanced(labels: np.ndarray, n: int, seed: int, name: str) -> np.ndarray:
    """Sorted indices of about `n` class-balanced images (all of them when `n` covers the set)."""
    if n >= len(labels):
        return np.arange(len(labels))
    per_class = min(max(n // len(CLASSES), 1), int(np.bincount(labels).min()))
    return np.sort(balanced_indices(labels, per_class, np.random.default_rng(seed), name))


def _human(human_dir: Path | None, test: Dataset, pred: np.ndarray, losses: np.ndarray, out: Path) -> dict:
    if human_dir is None:
        return {"skipped": "no CIFAR-10H folder given (--human-labels DIR or $CIFAR_TRANSFER_HUMAN_LABELS)"}
    try:
        human = load_human(human_dir, test.labels)
    except DataError as e:
        return {"skipped": str(e)}
    result = human_analysis(human, test.labels, pred, losses)
    model_cm = confusion_matrix(test.labels, pred, labels=range(len(CLASSES)), normalize="true")
    figures.human_vs_model(result["human_confusion"], model_cm.tolist(), out / "human_vs_model.png")
    figures.gallery(test.images, result["clear_errors"], out / "clear_errors.png",
                    title="Model errors on images people found clear (≥ 99% chose the true class)")
    return result


def _attribution(model: TransferNet, recipe: Recipe, test: Dataset, pred: np.ndarray, losses: np.ndarray,
                 out: Path) -> dict:
    """Grad-CAM on the worst errors (figure) and centre share for a sample of errors vs correct predictions."""
    rng = np.random.default_rng(recipe.seed)
    wrong, right = np.flatnonzero(pred != test.labels), np.flatnonzero(pred == test.labels)
    k = recipe.gradcam_images
    errors = rng.choice(wrong, min(k, len(wrong)), replace=False)
    correct = rng.choice(right, min(k, len(right)), replace=False)
    share = {name: attribution.centre_share(attribution.grad_cam(model, test.images[idx], pred[idx]))
             for name, idx in (("errors", errors), ("correct", correct))}
    worst = wrong[np.argsort(-losses[wrong], kind="stable")][:16]
    maps = attribution.grad_cam(model, test.images[worst], pred[worst])
    rows = [{"index": i, "true": CLASSES[test.labels[w]], "predicted": CLASSES[pred[w]]} for i, w in enumerate(worst)]
    figures.gallery(attribution.overlays(test.images[worst], maps), rows, out / "gradcam.png",
                    title="Grad-CAM for the predicted class on the worst errors (true → predicted)")
    return {"layer": attribution.target_layer(model)[0], "images_per_group": k,
            "centre_share_errors": float(share["errors"].mean()) if len(errors) else None,
            "centre_share_correct": float(share["correct"].mean()) if len(correct) else None,
            "uniform_centre_share": 0.25}
