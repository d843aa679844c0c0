"""Where a job's pictures come from: CIFAR-10 (the default: the recipe's class-balanced subsample)
or a folder of the user's own labelled pictures (data.folder).

Every job that trains or analyses reads its data here, so a folder is split the same way by `run`,
`repeat`, `tune`, `lr-find`, `analyze` and `eda`.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..recipe import Recipe
from .cifar import DataError, Dataset, Splits, load_cifar10, split
from .folder import FolderData, read_labelled_folder


@dataclass(frozen=True)
class Loaded:
    splits: Splits
    source: str  # the folder (resolved) or the CIFAR-10 files read
    folder: FolderData | None  # what a folder's reading found: skipped files, copies across sets
    excluded: int = 0  # training and validation images left out, as `exclude` listed them


def load_splits(
    recipe: Recipe,
    data: str | Path | None = None,
    data_dir: str | None = None,
    download: bool = True,
    progress: bool = True,
    exclude: str | Path | None = None,
) -> Loaded:
    """The recipe's train / validation / test sets from the folder `data`, else from CIFAR-10
    (looked for in `data_dir`).

    A folder's skipped files are printed as `skipped:` lines; `progress` shows its decoding.
    `exclude`: a CSV whose `image` column names training or validation images to leave out
    (`audit`'s label_issues.csv or a reviewed copy); the test set is never changed.
    """
    loaded = _load(recipe, data, data_dir, download, progress)
    if exclude is None:
        return loaded
    names = read_exclusions(Path(exclude))
    s = loaded.splits
    train, val = _kept(s.train, s.train_index, names), _kept(s.val, s.val_index, names)
    splits = Splits(
        s.train.take(train), s.val.take(val), s.test, s.train_index[train], s.val_index[val]
    )
    left_out = len(s.train) + len(s.val) - len(splits.train) - len(splits.val)
    # another run's list, or a folder's list given to CIFAR-10: say so, drop nothing
    if names and not left_out:
        raise DataError(
            f"--exclude {exclude}: none of its {len(names):,} images is among this run's training "
            "and validation images (a list from another run or data set?)"
        )
    return dataclasses.replace(loaded, splits=splits, excluded=left_out)


def _load(
    recipe: Recipe, data: str | Path | None, data_dir: str | None, download: bool, progress: bool
) -> Loaded:
    if data is not None:
        folder = read_labelled_folder(
            Path(data),
            recipe.image_size,
            recipe.val_fraction,
            recipe.test_fraction,
            recipe.seed,
            progress,
            recipe.duplicates,
        )
        for line in folder.skipped:
            print(f"skipped: {line}", file=sys.stderr)
        return Loaded(folder.splits, str(Path(data).resolve()), folder)
    train_full, test = load_cifar10(data_dir, allow_download=download)
    splits = split(train_full, test, recipe.train_size, recipe.val_size, recipe.seed)
    return Loaded(splits, train_full.source, None)


def read_exclusions(path: Path) -> frozenset[str]:
    """The `image` column of a CSV (a file for a folder's pictures, an index among CIFAR-10's 50,000
    training images), rows of the test split left out: what `run --exclude` leaves out of training
    and validation."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(
            f"--exclude {path}: cannot be read ({getattr(e, 'strerror', None) or e})"
        ) from None
    if rows and "image" not in rows[0]:
        raise DataError(
            f"--exclude {path}: no `image` column (columns: {', '.join(rows[0])}); give "
            "label_issues.csv"
        )
    return frozenset(r["image"] for r in rows if r.get("split", "") != "test")


def _kept(ds: Dataset, index: np.ndarray, names: frozenset[str]) -> np.ndarray:
    """Rows of `ds` not named in `names` (by file, or by index among the full training set)."""
    shown = ds.files if ds.files is not None else [str(i) for i in index]
    return np.array([i for i, name in enumerate(shown) if name not in names], dtype=np.int64)


def scaled_epochs(recipe: Recipe, train_images: int) -> Recipe:
    """The recipe with its epochs multiplied for a folder whose training set is smaller than
    `epoch_images`, so that it takes the optimiser steps the preset was tuned with (the frozen steps
    are still computed once); recipe.json keeps the epochs actually run."""
    times = round(recipe.epoch_images / train_images) if recipe.epoch_images else 1
    if times <= 1:
        return recipe
    return dataclasses.replace(
        recipe,
        head_epochs=recipe.head_epochs * times,
        finetune_epochs=recipe.finetune_epochs * times,
        warmup_epochs=recipe.warmup_epochs * times,
    )
