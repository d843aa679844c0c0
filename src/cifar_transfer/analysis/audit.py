"""Which labels are wrong: confident learning (cleanlab; Northcutt et al., JAIR 2021) on out-of-
sample predicted probabilities.

A label can only be judged by a model that did not learn it. The training and validation images are
scored by K-fold logistic-regression heads on the pretrained base's pooled features (the ImageNet
weights, which never saw these labels): each image's probabilities come from a head fitted on the
other folds. The test images are scored by the shipped model, which never trained on them, with its
temperature. cleanlab flags the issues (`prune by noise rate`) and ranks them by self-confidence
(the probability given to the given label).

A linear head on ImageNet features is wrong on about one image in eight, more often than a folder's
labels are, and confident learning cannot tell its confident mistakes from label errors. So a flag
on a training or validation image stands only if the run's own model, which was trained on the
given label, still predicts another class: a network learns what is consistent across images before
it memorises single exceptions (Arpit et al., ICML 2017), so it learns the correct labels the heads
get wrong and resists the wrong ones (for a validation image it is a second judge that never saw the
label). This only ever removes flags; the ranking and the suggested label stay out of sample.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

FOLDS = 5
# The heads' inverse regularisation strength: measured from 0.0005 to 0.5 on 5%-flipped CIFAR-10
# (docs/audit.md); 2,048 features from a few thousand images per class call for a strong one
HEAD_C = 0.002


def out_of_sample_probabilities(
    features: np.ndarray, labels: np.ndarray, classes: int, seed: int, c: float = HEAD_C
) -> np.ndarray:
    """Each row's class probabilities from a head fitted on the other folds (stratified, seeded): no
    row is scored by a head that trained on it. `c`: the heads' inverse regularisation strength."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels, minlength=classes)
    folds = int(max(2, min(FOLDS, counts[counts > 0].min())))  # a class of 3 images allows 3 folds
    probs = np.zeros((len(labels), classes))
    for fitted, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
        features, labels
    ):
        head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=c))
        head.fit(features[fitted], labels[fitted])
        probs[np.ix_(held_out, head.classes_)] = head.predict_proba(features[held_out])
    return probs


def label_issues(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """cleanlab's verdict for each image: flagged (a likely label error), its label-quality score
    (the probability of its given label: low is suspect) and the suggested label (the most
    probable)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    return {
        "flagged": find_label_issues(labels, probs, n_jobs=1),
        "quality": get_label_quality_scores(labels, probs, method="self_confidence"),
        "suggested": probs.argmax(1),
    }


def confirmed(
    verdict: dict[str, np.ndarray], labels: np.ndarray, asked: np.ndarray, predicted: np.ndarray
) -> dict[str, np.ndarray]:
    """`verdict` with its flags kept only where the model trained on these labels still predicts
    another class than the given one (`predicted`: its classes for the images `asked`, every
    flagged one); "flagged_out_of_sample" keeps cleanlab's own flags."""
    if not np.array_equal(np.sort(asked), np.flatnonzero(verdict["flagged"])):
        raise ValueError("confirmed: predictions are needed for exactly the flagged images")
    flagged = np.zeros_like(verdict["flagged"])
    flagged[asked[predicted != labels[asked]]] = True
    return verdict | {"flagged": flagged, "flagged_out_of_sample": verdict["flagged"]}


def ranking_quality(
    quality: np.ndarray, flagged: np.ndarray, wrong: np.ndarray, top: int = 500
) -> dict:
    """How well an audit finds labels known to be wrong (`wrong`): precision and recall of what it
    flags, the share of the wrong ones among its `top` most suspect, and the precision-recall curve
    down the ranking."""
    order = np.argsort(quality, kind="stable")
    hits = np.cumsum(wrong[order])
    ranks = np.arange(1, len(order) + 1)
    steps = np.unique(np.linspace(1, len(order), 50).astype(int))
    return {
        "wrong": int(wrong.sum()),
        "flagged": int(flagged.sum()),
        "precision": float((wrong & flagged).sum() / max(flagged.sum(), 1)),
        "recall": float((wrong & flagged).sum() / max(wrong.sum(), 1)),
        f"recall_top_{top}": float(hits[min(top, len(order)) - 1] / max(wrong.sum(), 1)),
        "curve": {
            "top": steps.tolist(),
            "precision": (hits[steps - 1] / ranks[steps - 1]).tolist(),
            "recall": (hits[steps - 1] / max(wrong.sum(), 1)).tolist(),
        },
    }


def against_people(human: np.ndarray, labels: np.ndarray, flagged: np.ndarray) -> dict:
    """CIFAR-10H's verdict on the test audit: people's mean agreement with the given label on the
    flagged images and on the rest, and the flagged images whose majority human label is another
    class."""
    agreement = human[np.arange(len(labels)), labels]
    majority = human.argmax(1)
    return {
        "flagged": int(flagged.sum()),
        "agreement_flagged": float(agreement[flagged].mean()) if flagged.any() else None,
        "agreement_rest": float(agreement[~flagged].mean()),
        "majority_disagrees": [int(i) for i in np.flatnonzero(flagged & (majority != labels))],
    }


def audit_test_labels(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: tuple[str, ...],
    names: tuple[str, ...] | None = None,
    human: np.ndarray | None = None,
) -> dict:
    """The shipped model's verdict on the test labels (`probs`: its calibrated probabilities; it
    never trained on these images): how many it flags, the given -> suggested pairs most often, the
    most suspect (named by file, else index), and with CIFAR-10H (`human`) people's verdict."""
    v = label_issues(labels, probs)
    flagged = np.flatnonzero(v["flagged"])
    order = flagged[np.argsort(v["quality"][flagged], kind="stable")]
    pairs = Counter(f"{classes[labels[i]]} → {classes[v['suggested'][i]]}" for i in flagged)
    result = {
        "images": len(labels),
        "flagged": len(flagged),
        "pairs": dict(pairs.most_common(10)),
        "top": [
            {
                "image": names[i] if names is not None else str(i),
                "given": classes[labels[i]],
                "suggested": classes[v["suggested"][i]],
                "quality": float(v["quality"][i]),
            }
            for i in order[:10]
        ],
    }
    if human is not None:
        result["human"] = against_people(human, labels, v["flagged"])
    return result
