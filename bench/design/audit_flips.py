"""Does the label audit find labels known to be wrong? `lean`'s split of CIFAR-10 (10,000 training
and 5,000 validation images, seed 0), 5% of the training labels moved to another class (seeded; only
this script knows which), audited as `cifar-transfer audit` audits a run's training and validation
images: K-fold heads on the pretrained base's features at the run's resolution, cleanlab on their
out-of-sample probabilities.

    python bench/design/audit_flips.py [--flip 0.05] [--resolution 128] [--folder OUT]

prints the audit's precision and recall at cleanlab's threshold, the share of the flips among its
500 most suspect images, the time it took, and (with --folder) writes the noisy split as PNG files
(train/ val/ test/ by class) for `run --data OUT` and `audit` / `run --exclude` on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cifar_transfer.analysis.audit import label_issues, out_of_sample_probabilities, ranking_quality
from cifar_transfer.data.augment import to_nchw
from cifar_transfer.data.cifar import load_cifar10, split
from cifar_transfer.machine import cpu_model
from cifar_transfer.model.network import build_model
from cifar_transfer.model.weights import load_pretrained
from cifar_transfer.recipe import preset
from cifar_transfer.training.inputs import cache_activations


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--flip", type=float, default=0.05)
    p.add_argument(
        "--resolution",
        type=int,
        default=128,
        help="default 128: lean's, what audit uses on its runs",
    )
    p.add_argument("--folder", type=Path, help="write the noisy split here as PNG files")
    a = p.parse_args()
    recipe = preset("lean")
    train, test = load_cifar10(os.environ.get("CIFAR_TRANSFER_DATA"), allow_download=False)
    splits = split(train, test, recipe.train_size, recipe.val_size, recipe.seed)
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(splits.train), round(a.flip * len(splits.train)), replace=False)
    given = splits.train.labels.copy()
    given[flipped] = (given[flipped] + rng.integers(1, 10, len(flipped))) % 10
    labels = np.concatenate([given, splits.val.labels])
    wrong = np.concatenate([given != splits.train.labels, np.zeros(len(splits.val), bool)])
    images = np.concatenate([splits.train.images, splits.val.images])
    t0 = time.perf_counter()
    scoring = dataclasses.replace(recipe, resolution=a.resolution)
    base = build_model(scoring, load_pretrained(os.environ["CIFAR_TRANSFER_WEIGHTS"])).eval()
    (features,) = cache_activations(base, to_nchw(images), "stem", "head", scoring)
    t_features = time.perf_counter() - t0
    probs = out_of_sample_probabilities(features.float().numpy(), labels, 10, recipe.seed)
    verdict = label_issues(labels, probs)
    seconds = time.perf_counter() - t0
    found = ranking_quality(verdict["quality"], verdict["flagged"], wrong, top=500)
    found.pop("curve")
    found |= {
        "features_s": round(t_features, 1),
        "audit_s": round(seconds, 1),
        "images": len(labels),
    }
    found["suggested_is_true"] = float(
        (verdict["suggested"][flipped] == splits.train.labels[flipped]).mean()
    )
    print(
        json.dumps(
            {"cpu": cpu_model()["model"], "threads": torch.get_num_threads(), **found}, indent=1
        )
    )
    if a.folder:
        write_folder(a.folder, splits, given)


def write_folder(folder: Path, splits, given: np.ndarray) -> None:
    from PIL import Image

    for name, ds, labels in (
        ("train", splits.train, given),
        ("val", splits.val, None),
        ("test", splits.test, None),
    ):
        for i, image in enumerate(ds.images):
            out = folder / name / ds.classes[(labels if labels is not None else ds.labels)[i]]
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / f"{i:05d}.png")


if __name__ == "__main__":
    main()
