"""Calibration: expected calibration error, reliability-diagram bins, and temperature scaling.

The temperature is fitted once, on the validation set (never the test set), when a run ships its
model; the report and `analyze` measure that same temperature on the test set.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Per-bin confidence, accuracy and count (equal-width confidence bins), and the ECE they
    give."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    mean_conf = np.bincount(index, weights=conf, minlength=bins) / np.maximum(count, 1)
    accuracy = np.bincount(index, weights=correct, minlength=bins) / np.maximum(count, 1)
    ece = float(np.sum(count / len(labels) * np.abs(accuracy - mean_conf)))
    return {
        "ece": ece,
        "edges": edges.tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": accuracy.tolist(),
        "count": count.tolist(),
    }


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    return F.cross_entropy(
        torch.from_numpy(logits).double() / temperature, torch.from_numpy(labels).long()
    ).item()


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (LBFGS on log T)."""
    x = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.from_numpy(logits).double().div(temperature).softmax(1).numpy()


def calibration(
    temperature: float | None,
    validation_images: int,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
) -> dict:
    """What the temperature a model ships with (fitted on `validation_images` validation images by
    `fit_temperature`, or None: there were none) does on the test set: expected calibration error,
    cross-entropy and mean top-class probability, before and after, with the reliability bins; the
    accuracy beside them."""
    if temperature is None:
        return {
            "temperature": None,
            "skipped": "no validation split (val_size=0) to fit a temperature on: predict and "
            "serve return uncalibrated probabilities",
        }
    before = reliability(softmax(test_logits), test_labels)
    after = reliability(softmax(test_logits, temperature), test_labels)
    return {
        "temperature": temperature,
        "validation_images": validation_images,
        "test": {
            "accuracy": float((test_logits.argmax(1) == test_labels).mean()),
            "mean_confidence_before": float(softmax(test_logits).max(1).mean()),
            "mean_confidence_after": float(softmax(test_logits, temperature).max(1).mean()),
        },
        "ece_before": before["ece"],
        "ece_after": after["ece"],
        "nll_before": nll(test_logits, test_labels),
        "nll_after": nll(test_logits, test_labels, temperature),
        "bins_before": before,
        "bins_after": after,
    }
