"""Does the label audit find labels known to be wrong? `lean`'s split of CIFAR-10 (10,000 training
and 5,000 validation images, seed 0), 5% of the training labels moved to another class (seeded; only
this script knows which).

    python bench/design/audit_flips.py [--flip 0.05] [--resolution 128] [--head-c C ...]
                                       [--folder OUT] [--flags-csv CSV]
    python bench/design/audit_flips.py --score RUN/audit/label_issues.csv

The first audits the training and validation images as `cifar-transfer audit` ranks them: K-fold
heads on the pretrained base's features at the run's resolution, cleanlab on their out-of-sample
probabilities. It prints the share of the flips among the 500 most suspect images, the precision
and recall of cleanlab's flags before the run's own model confirms them (there is no run here), the
time it took, and (with --folder) writes the noisy split as PNG files (train/ val/ test/ by class)
for `run --data OUT --set image_size=32`. With --flags-csv it writes cleanlab's own flags (before
any confirmation) as a list for `run --data OUT --exclude CSV`, naming the files --folder writes:
what excluding by recall rather than precision wins back.

The second scores what `audit` flagged on a run trained on that folder: the precision and recall of
its label_issues.csv's training rows against the flips, and how many validation images it flagged.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from cifar_folder import image_path, write_splits  # the parity bench's: the same file names

from cifar_transfer.analysis.audit import (
    HEAD_C,
    label_issues,
    out_of_sample_probabilities,
    ranking_quality,
)
from cifar_transfer.data.augment import to_nchw
from cifar_transfer.data.cifar import Splits, load_cifar10, split
from cifar_transfer.machine import cpu_model
from cifar_transfer.model.network import build_model
from cifar_transfer.model.weights import load_pretrained
from cifar_transfer.recipe import preset
from cifar_transfer.training.inputs import cache_activations


def noisy_split(fraction: float) -> tuple[Splits, np.ndarray, np.ndarray]:
    """`lean`'s split, the training labels with `fraction` of them moved to another class, and the
    indices of those moved."""
    recipe = preset("lean")
    train, test = load_cifar10(os.environ.get("CIFAR_TRANSFER_DATA"), allow_download=False)
    splits = split(train, test, recipe.train_size, recipe.val_size, recipe.seed)
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(splits.train), round(fraction * len(splits.train)), replace=False)
    given = splits.train.labels.copy()
    given[flipped] = (given[flipped] + rng.integers(1, 10, len(flipped))) % 10
    return splits, given, flipped


def rank(
    splits: Splits, given: np.ndarray, flipped: np.ndarray, resolution: int, cs: list[float]
) -> tuple[dict, np.ndarray]:
    """The out-of-sample ranking of the training and validation labels, scored against the flips,
    for heads of each inverse regularisation strength in `cs`; and the last C's flags."""
    recipe = dataclasses.replace(preset("lean"), resolution=resolution)
    labels = np.concatenate([given, splits.val.labels])
    wrong = np.concatenate([given != splits.train.labels, np.zeros(len(splits.val), bool)])
    images = np.concatenate([splits.train.images, splits.val.images])
    t0 = time.perf_counter()
    base = build_model(recipe, load_pretrained(os.environ["CIFAR_TRANSFER_WEIGHTS"])).eval()
    (features,) = cache_activations(base, to_nchw(images), "stem", "head", recipe)
    true = np.concatenate([splits.train.labels, splits.val.labels])
    found = {"images": len(labels), "features_s": round(time.perf_counter() - t0, 1)}
    for c in cs:
        t0 = time.perf_counter()
        probs = out_of_sample_probabilities(features.float().numpy(), labels, 10, recipe.seed, c)
        verdict = label_issues(labels, probs)
        ranked = ranking_quality(verdict["quality"], verdict["flagged"], wrong, top=500)
        curve = ranked.pop("curve")
        ranked["curve"] = {  # precision and recall down the ranking, at a few depths
            top: (round(precision, 3), round(recall, 3))
            for top, precision, recall in zip(curve["top"], curve["precision"], curve["recall"])
            if top <= 3000
        }
        suggested = verdict["suggested"][flipped] == splits.train.labels[flipped]
        found[f"C={c:g}"] = ranked | {
            "heads_accuracy": float((probs.argmax(1) == true).mean()),
            "suggested_is_true": float(suggested.mean()),
            "heads_s": round(time.perf_counter() - t0, 1),
        }
    return found, verdict["flagged"]


def write_flags(path: Path, folder: Path, splits: Splits, given: np.ndarray, flagged) -> None:
    """The flagged training and validation images as an `--exclude` list, named as --folder writes
    them (FOLDER/split/class/NNNNN.png, the training images under their given class)."""
    labels = {"train": given, "val": splits.val.labels}
    split_of = ["train"] * len(given) + ["val"] * len(splits.val)
    index = [*range(len(given)), *range(len(splits.val))]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "split"])
        for row in np.flatnonzero(flagged):
            name, i = split_of[row], index[row]
            label = splits.train.classes[labels[name][i]]
            out.writerow([str(image_path(folder.resolve(), name, label, i)), name])


def score(issues: Path, flipped: np.ndarray) -> dict:
    """Precision and recall of an audit's flags against the flips: on the training images (where the
    flips are; a row names a file split/class/NNNNN.png as --folder writes them), and with the
    validation images' flags counted in too (their labels are CIFAR-10's own)."""
    with issues.open() as f:
        rows = [r for r in csv.DictReader(f) if r["split"] in ("train", "val")]
    train = {int(Path(r["image"]).stem) for r in rows if r["split"] == "train"}
    hits = len(train & set(flipped.tolist()))
    return {
        "flipped": len(flipped),
        "flagged_train": len(train),
        "precision_train": hits / max(len(train), 1),
        "recall": hits / len(flipped),
        "flagged_val": len(rows) - len(train),
        "precision_train_and_val": hits / max(len(rows), 1),
    }


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
    p.add_argument(
        "--head-c",
        type=float,
        nargs="+",
        default=[HEAD_C],
        help=f"the heads' inverse regularisation strengths to compare (default {HEAD_C}: audit's)",
    )
    p.add_argument("--folder", type=Path, help="write the noisy split here as PNG files")
    p.add_argument(
        "--flags-csv",
        type=Path,
        help="write cleanlab's flags (the last --head-c's): an --exclude list of --folder's files",
    )
    p.add_argument("--score", type=Path, help="score an audit's label_issues.csv instead")
    a = p.parse_args()
    splits, given, flipped = noisy_split(a.flip)
    if a.score:
        print(json.dumps({"audit": str(a.score), **score(a.score, flipped)}, indent=1))
        return
    if a.flags_csv and not a.folder:
        p.error("--flags-csv names the files --folder writes: give --folder too")
    found, flagged = rank(splits, given, flipped, a.resolution, a.head_c)
    print(
        json.dumps(
            {"cpu": cpu_model()["model"], "threads": torch.get_num_threads(), **found}, indent=1
        )
    )
    if a.folder:
        write_splits(a.folder, splits, given)
    if a.flags_csv:
        write_flags(a.flags_csv, a.folder, splits, given, flagged)


if __name__ == "__main__":
    main()
