"""Calibration: expected calibration error, reliability-diagram bins, and temperature scaling.

The temperature is fitted on the validation set, never on the test set.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Per-bin confidence, accuracy and count (equal-width confidence bins), and the ECE they give."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    mean_conf = np.bincount(index, weights=conf, minlength=bins) / np.maximum(count, 1)
    accuracy = np.bincount(index, weights=correct, minlength=bins) / np.maximum(count, 1)
    ece = float(np.sum(count / len(labels) * np.abs(accuracy - mean_conf)))
    return {"ece": ece, "edges": edges.tolist(), "confidence": mean_conf.tolist(), "accuracy": accuracy.tolist(),
            "count": count.tolist()}


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    return F.cross_entropy(torch.from_numpy(logits).double() / temperature, torch.from_numpy(labels).long()).item()


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


def confidence(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """What a temperature changes: mean top-class probability beside accuracy, before and after it."""
    return {"accuracy": float((logits.argmax(1) == labels).mean()),
            "mean_confidence_before": float(softmax(logits).max(1).mean()),
            "mean_confidence_after": float(softmax(logits, temperature).max(1).mean())}


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
              test_labels: np.ndarray) -> dict:
    """ECE and NLL on the test set before and after a temperature fitted on the validation set."""
    t = fit_temperature(val_logits, val_labels)
    before = reliability(softmax(test_logits), test_labels)
    after = reliability(softmax(test_logits, t), test_labels)
    return {"temperature": t, "ece_before": before["ece"], "ece_after": after["ece"],
            "nll_before": nll(test_logits, test_labels), "nll_after": nll(test_logits, test_labels, t),
            "bins_before": before, "bins_after": after}
