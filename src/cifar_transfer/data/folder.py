"""A folder of the user's own labelled pictures, as train / validation / test sets.

Two layouts, as torchvision's `ImageFolder` and the Hugging Face `imagefolder` read them: one
subfolder per class (split here by a seeded, class-stratified split), or `train/` with optional
`val/` and `test/`, each with class subfolders (a missing `val/` or `test/` is split from `train/`).
Class names and their order come from the folders, sorted. Each picture is prepared as `predict`
prepares one (EXIF orientation, transparency on white, centre-cropped, resized to the recipe's
`image_size`); anything that is not a readable image is one `skipped:` line. Decoded arrays are
cached beside nothing of the user's: in a cache folder, keyed by each file's path, size and
modification time, so a second run over the same folder decodes nothing again.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import atomic
from .cifar import DataError, Dataset, Splits, check_readable_folder
from .duplicates import Duplicate, find_duplicates, perceptual_hash
from .images import ImageError, read_image_file

SPLIT_FOLDERS = ("train", "val", "test")
MAX_CLASSES = 1000


@dataclass(frozen=True)
class Picture:
    file: Path
    split: str | None  # "train", "val" or "test" where the layout says; None: the split decides
    label: int


@dataclass(frozen=True)
class FolderData:
    """A folder read and split: the sets, what was skipped, and the copies across sets
    (data.duplicates)."""

    splits: Splits
    skipped: list[str]
    duplicates: list[dict]  # earlier/later file and set, bits apart, exact, dropped

    @property
    def dropped(self) -> list[str]:
        """The later copies removed from their set (recipe field duplicates)."""
        return [d["later"] for d in self.duplicates if d["dropped"]]

    def rows(self, used: Splits | None = None) -> list[tuple[str, str, str]]:
        """splits.csv: (file, split, class) for every picture read, as `used` (default: as read)
        holds them; a dropped copy's split says `dropped`, a picture left out of `used` (run
        --exclude) `excluded`."""
        used = used or self.splits
        sets = (("train", used.train), ("val", used.val), ("test", used.test))
        rows = [
            (f, name, ds.classes[y])
            for name, ds in sets
            for f, y in zip(ds.files, ds.labels.tolist())
        ]
        listed = {f for f, _, _ in rows}
        read = (self.splits.train, self.splits.val)
        left_out = [
            (f, "excluded", ds.classes[y])
            for ds in read
            for f, y in zip(ds.files, ds.labels.tolist())
        ]
        classes = {d["later"]: d["class"] for d in self.duplicates}
        dropped = [(f, "dropped", classes[f]) for f in self.dropped]
        return rows + [r for r in left_out if r[0] not in listed] + dropped


def read_labelled_folder(
    root: Path,
    size: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    progress: bool = True,
    duplicates: str = "keep",
) -> FolderData:
    """The pictures under `root`, decoded (or read from the cache) and split; see the module
    docstring.

    `duplicates`: "keep", or "drop-exact" / "drop-near" to remove those copies from their later set.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"--data {root}: not a folder (one subfolder per class, or train/ [val/] [test/])"
        )
    check_readable_folder(root)
    pictures, classes, skipped = scan(root)
    images, hashes, kept = decode_all(pictures, size, skipped, progress)
    data = [p for p, ok in zip(pictures, kept) if ok]
    assignment = assign_splits(data, classes, val_fraction, test_fraction, seed)
    copies = find_duplicates(images, assignment, hashes)
    listed = [_described(c, data, assignment, classes, duplicates) for c in copies]
    assignment[[c.later for c, d in zip(copies, listed) if d["dropped"]]] = "dropped"
    sets = {}
    for name in SPLIT_FOLDERS:
        rows = np.flatnonzero(assignment == name)
        labels = np.array([data[i].label for i in rows], dtype=np.int64)
        files = tuple(str(data[i].file) for i in rows)
        sets[name] = Dataset(images[rows], labels, f"{root} ({name})", classes, files)
    splits = Splits(
        sets["train"],
        sets["val"],
        sets["test"],
        np.arange(len(sets["train"])),
        np.arange(len(sets["val"])),
    )
    return FolderData(splits, skipped, listed)


def _described(
    copy: Duplicate,
    data: list[Picture],
    assignment: np.ndarray,
    classes: tuple[str, ...],
    policy: str,
) -> dict:
    """A copy as metrics.json lists it; whether the recipe's policy drops it."""
    drop = policy == "drop-near" or (policy == "drop-exact" and copy.exact)
    return {
        "earlier": str(data[copy.earlier].file),
        "earlier_set": str(assignment[copy.earlier]),
        "later": str(data[copy.later].file),
        "later_set": str(assignment[copy.later]),
        "class": classes[data[copy.later].label],
        "same_class": data[copy.earlier].label == data[copy.later].label,
        "bits_apart": copy.distance,
        "exact": copy.exact,
        "dropped": drop,
    }


def scan(root: Path) -> tuple[list[Picture], tuple[str, ...], list[str]]:
    """Every candidate picture with its class (and split, where the layout gives one), the sorted
    class names, and the `skipped` lines for what is not a class folder's file."""
    layout = [d for d in SPLIT_FOLDERS if (root / d).is_dir()]
    if layout and "train" not in layout:
        raise DataError(
            f"{root}: has {'/, '.join(layout)}/ but no train/ (its classes come from train/)"
        )
    tops = {name: root / name for name in layout} if layout else {None: root}
    skipped: list[str] = []
    for entry in sorted(root.iterdir()) if layout else []:
        if entry.name not in SPLIT_FOLDERS and not entry.name.startswith("."):
            skipped.append(f"{entry}: beside train/, val/ and test/, so in no set; skipped")
    found = {split: _class_folders(folder, skipped) for split, folder in tops.items()}
    classes = tuple(sorted(found["train" if layout else None]))
    if len(classes) < 2:
        where = root / "train" if layout else root
        count = f"{len(classes)} class folder{'' if len(classes) == 1 else 's'}"
        raise DataError(
            f"{where}: {count}; a classifier needs at least 2 (one subfolder per class)"
        )
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{root}: {len(classes):,} class folders; at most {MAX_CLASSES:,}")
    pictures = []
    for split, folders in found.items():
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise DataError(
                f"{tops[split] / unknown[0]}: a class that train/ does not have "
                f"({', '.join(classes)})"
            )
        for name, folder in sorted(folders.items()):
            pictures += [Picture(f, split, classes.index(name)) for f in _files(folder, skipped)]
    return pictures, classes, skipped


def _class_folders(folder: Path, skipped: list[str]) -> dict[str, Path]:
    """The class subfolders of `folder` by name; a file beside them is a `skipped` line."""
    check_readable_folder(folder)
    out = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and entry.is_dir():
            skipped.append(f"{entry}: a symbolic link to a folder, not followed; skipped")
        elif entry.is_dir():
            check_readable_folder(entry)
            out[entry.name] = entry
        else:
            skipped.append(f"{entry}: not inside a class folder; skipped")
    return out


def _files(folder: Path, skipped: list[str]) -> list[Path]:
    """The files directly in a class folder; a folder inside it is one `skipped` line (classes are
    one level)."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            n = sum(1 for _ in entry.rglob("*"))
            skipped.append(
                f"{entry}: a folder inside a class folder (classes are one level deep); its {n} "
                "entries skipped"
            )
        else:
            files.append(entry)
    return files


def decode_all(
    pictures: list[Picture], size: int, skipped: list[str], progress: bool
) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """Every picture at `size` and its perceptual hash (from the cache where its file is unchanged),
    on all cores; which ones decoded."""
    cache = DecodeCache(size)
    keys = [cache.key(p.file) for p in pictures]
    # no key: the read names the problem
    todo = [i for i, k in enumerate(keys) if k is None or k not in cache]

    def one(i: int) -> tuple[np.ndarray, np.uint64] | str:
        try:
            image = read_image_file(pictures[i].file, size)
        except ImageError as e:
            return str(e)
        return image, perceptual_hash(image)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        done = list(
            tqdm(
                pool.map(one, todo),
                total=len(todo),
                desc="decode",
                unit="image",
                disable=not progress,
            )
        )
    for i, result in zip(todo, done):
        if isinstance(result, str):
            skipped.append(f"{result}; skipped")
        elif keys[i] is not None:
            cache[keys[i]] = result
    kept = [k is not None and k in cache for k in keys]
    if todo:
        cache.save()
    if not any(kept):
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.uint64), kept
    found = [cache[k] for k, ok in zip(keys, kept) if ok]
    return (
        np.stack([image for image, _ in found]),
        np.array([h for _, h in found], dtype=np.uint64),
        kept,
    )


class DecodeCache:
    """Decoded pictures at one size and their perceptual hashes, keyed by file path, size in
    bytes and modification time: a changed file is decoded again. One .npz file per stored size
    under $CIFAR_TRANSFER_CACHE (default ~/.cache/cifar-transfer)."""

    def __init__(self, size: int):
        folder = Path(
            os.environ.get("CIFAR_TRANSFER_CACHE", Path.home() / ".cache" / "cifar-transfer")
        )
        self.path = folder / f"pictures-{size}px.npz"
        self.entries: dict[str, tuple[np.ndarray, np.uint64]] = {}
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    self.entries = dict(zip(z["keys"].tolist(), zip(z["images"], z["hashes"])))
            # a damaged (or older) cache is rebuilt, never trusted
            except (
                OSError,
                ValueError,
                KeyError,
            ):
                self.entries = {}

    @staticmethod
    def key(file: Path) -> str | None:
        try:
            st = os.stat(file)
        except OSError:
            return None
        return f"{Path(file).resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> tuple[np.ndarray, np.uint64]:
        return self.entries[key]

    def __setitem__(self, key: str, decoded: tuple[np.ndarray, np.uint64]) -> None:
        self.entries[key] = decoded

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            keys = np.array(list(self.entries), dtype=str)
            images = np.stack([image for image, _ in self.entries.values()])
            hashes = np.array([h for _, h in self.entries.values()], dtype=np.uint64)
            atomic.write_with(
                self.path, lambda f: np.savez(f, keys=keys, images=images, hashes=hashes)
            )
        except OSError:  # a cache that cannot be written costs a decode next time, nothing more
            pass


def assign_splits(
    pictures: list[Picture],
    classes: tuple[str, ...],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """Each picture's set: the layout's where it gives one; else a seeded split of each class, so
    every class is in every set in proportion.

    A class too small to split is named with its count.
    """
    out = np.array([p.split or "" for p in pictures], dtype=object)
    rng = np.random.default_rng(seed)
    given = set(out.tolist())
    need = {
        "val": val_fraction if "val" not in given else 0.0,
        "test": test_fraction if "test" not in given else 0.0,
    }
    pool = "train" if given - {""} else ""
    for c, name in enumerate(classes):
        rows = np.array(
            [i for i, p in enumerate(pictures) if p.label == c and out[i] == pool], dtype=np.int64
        )
        rows = rows[rng.permutation(len(rows))]
        counts = {s: max(1, round(f * len(rows))) if f > 0 else 0 for s, f in need.items()}
        if len(rows) - sum(counts.values()) < 1:
            least = 1 + sum(1 for f in need.values() if f > 0)
            raise DataError(
                f"class {name}: {len(rows)} images, too few to split into train / validation / "
                f"test (at least {least} needed)"
            )
        out[rows[: counts["val"]]] = "val"
        out[rows[counts["val"] : counts["val"] + counts["test"]]] = "test"
        out[rows[counts["val"] + counts["test"] :]] = "train"
    return out
