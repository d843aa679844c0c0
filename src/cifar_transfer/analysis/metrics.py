"""The test-set numbers: accuracy, loss, per-class scores, confusion, class leakage and the worst
errors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from ..data.cifar import CLASSES

# Look-alike classes the original report blames for its errors; leakage is measured both ways.
LEAKAGE_PAIRS = (("cat", "dog"), ("automobile", "truck"), ("bird", "airplane"), ("deer", "horse"))


def score_predictions(
    logits: np.ndarray, labels: np.ndarray, classes: tuple[str, ...] = CLASSES, top_k: int = 24
) -> dict:
    """Every test-set number the report shows, JSON-ready."""
    logits_t = torch.from_numpy(logits).float()
    labels_t = torch.from_numpy(labels).long()
    losses = F.cross_entropy(logits_t, labels_t, reduction="none").numpy()
    probs = logits_t.softmax(1).numpy()
    pred = probs.argmax(1)
    ks = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=ks, zero_division=0
    )
    cm = confusion_matrix(labels, pred, labels=ks)
    cm_norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    wrong = np.flatnonzero(pred != labels)
    worst = wrong[np.argsort(-losses[wrong], kind="stable")][:top_k]
    return {
        "n": len(labels),
        "accuracy": float((pred == labels).mean()),
        "loss": float(losses.mean()),
        "errors": len(wrong),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        # over the classes present (a photo set may lack some)
        "macro_f1": float(f1[support > 0].mean()),
        "confusion": cm.tolist(),
        "confusion_normalised": cm_norm.round(6).tolist(),
        "leakage": leakage(cm, classes),
        "most_confused": most_confused(cm, classes),
        "misclassified": [
            {
                "index": int(i),
                "true": classes[labels[i]],
                "predicted": classes[pred[i]],
                "confidence": float(probs[i, pred[i]]),
                "true_probability": float(probs[i, labels[i]]),
                "loss": float(losses[i]),
            }
            for i in worst
        ],
        "classification_report": classification_report(
            labels, pred, labels=ks, target_names=list(classes), digits=4, zero_division=0
        ),
    }


def leakage(cm: np.ndarray, classes: tuple[str, ...] = CLASSES) -> list[dict]:
    """For each look-alike pair (a, b): the share of a predicted as b and of b predicted as a.

    The pairs are the original report's four for CIFAR-10, and this data's four most-confused pairs
    for any other classes.
    """
    rows = cm.sum(1)
    out = []
    if classes == CLASSES:
        pairs = [(CLASSES.index(a), CLASSES.index(b)) for a, b in LEAKAGE_PAIRS]
    else:
        pairs = [(i, j) for _, i, j in _confused_pairs(cm)[:4]]
    for i, j in pairs:
        a, b = classes[i], classes[j]
        out.append(
            {
                "a": a,
                "b": b,
                "a_as_b": float(cm[i, j] / max(rows[i], 1)),
                "a_as_b_count": int(cm[i, j]),
                "b_as_a": float(cm[j, i] / max(rows[j], 1)),
                "b_as_a_count": int(cm[j, i]),
            }
        )
    return out


def most_confused(cm: np.ndarray, classes: tuple[str, ...] = CLASSES, k: int = 5) -> list[dict]:
    """The k unordered class pairs with the most errors between them (both directions counted)."""
    pairs = _confused_pairs(cm)
    return [
        {
            "a": classes[i],
            "b": classes[j],
            "errors": total,
            "a_as_b": int(cm[i, j]),
            "b_as_a": int(cm[j, i]),
        }
        for total, i, j in pairs[:k]
    ]


def _confused_pairs(cm: np.ndarray) -> list[tuple[int, int, int]]:
    """(errors both ways, i, j) for every unordered class pair, most errors first (ties by class
    order)."""
    n = len(cm)
    pairs = [(int(cm[i, j] + cm[j, i]), i, j) for i in range(n) for j in range(i + 1, n)]
    return sorted(pairs, key=lambda t: (-t[0], t[1], t[2]))
