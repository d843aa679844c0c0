"""CIFAR-10 in: find it, read it safely, check it, and split it into train / validation / test.

Sources, in the order they are looked for: `--data-dir`, `$CIFAR_TRANSFER_DATA`, `./data`; in each,
the official `cifar-10-batches-py/` folder, the official `cifar-10-python.tar.gz` archive, or `.npz`
files (`train.npz` or `train_subset.npz`, and `test.npz`) holding `images` (N x 32 x 32 x 3 uint8
RGB) and `labels`. If none holds it, the official archive is downloaded (md5-checked) into `./data`.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar

import numpy as np

from ..errors import CifarTransferError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


class DataError(CifarTransferError):
    """The data could not be found or is not valid CIFAR-10; the message names the file and the
    problem."""


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # N x S x S x 3, uint8, RGB (S = 32 for CIFAR-10)
    labels: np.ndarray  # N, int64 indices into `classes`
    source: str
    classes: tuple[str, ...] = CLASSES
    files: tuple[str, ...] | None = None  # each image's file, for data read from a folder

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Dataset:
        files = (
            None if self.files is None else tuple(self.files[i] for i in np.asarray(index).tolist())
        )
        return Dataset(self.images[index], self.labels[index], self.source, self.classes, files)

    @property
    def is_cifar10(self) -> bool:
        """CIFAR-10 itself, or a set in its classes and size: what CIFAR-10H and CIFAR-10-C are made
        for."""
        return self.classes == CLASSES and self.images.shape[1:] == (32, 32, 3)

    def name_of(self, i: int) -> str:
        """How a report names image `i`: its file where it has one, else its index."""
        return self.files[i] if self.files is not None else str(i)


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset | None  # None where the test set must not be read (tuning, the LR finder)
    train_index: np.ndarray  # rows of the full training set used for training
    val_index: np.ndarray  # rows used for validation (disjoint from train_index)


def validate(images: np.ndarray, labels: np.ndarray, name: str) -> Dataset:
    """Check shape, dtype and label range; return a Dataset or raise DataError naming `name`."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataError(
            f"{name}: images must be a uint8 array, got "
            f"{getattr(images, 'dtype', type(images).__name__)}"
        )
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{name}: images must have shape N x 32 x 32 x 3, got {images.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{name}: labels must be a 1-D integer array, got shape {labels.shape} dtype "
            f"{labels.dtype}"
        )
    if len(labels) != len(images):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{name}: holds no images")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(f"{name}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return Dataset(images, labels.astype(np.int64), name)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain dicts, lists and numpy arrays only: a batch file cannot run code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles the bytes inside an array at protocol 2
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(f: IO[bytes], name: str) -> dict:
    try:
        d = _ArrayUnpickler(f, encoding="bytes").load()
    except (
        Exception
    ) as e:  # any failure of a corrupt pickle: EOFError, UnpicklingError, ValueError, ...
        raise DataError(
            f"{name}: truncated or corrupt batch file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(d, dict):
        raise DataError(f"{name}: expected a dict, found {type(d).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def read_batch(f: IO[bytes], name: str) -> Dataset:
    """One official batch file: `data` (N x 3072, channel-planar) and `labels`."""
    d = _unpickle(f, name)
    for key in ("data", "labels"):
        if key not in d:
            raise DataError(f"{name}: missing key {key!r}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{name}: 'data' must be an N x 3072 array, got "
            f"{getattr(data, 'shape', type(data).__name__)}"
        )
    if data.dtype != np.uint8:
        raise DataError(f"{name}: 'data' must be uint8, got {data.dtype}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return validate(np.ascontiguousarray(images), np.asarray(d["labels"]), name)


def _read_official(open_member, where: str, test: bool = True) -> tuple[Dataset, Dataset | None]:
    """Read the five training batches (and the test batch, unless `test` is false) through
    `open_member(name) -> binary file`, and check counts against the meta."""

    def read(name: str) -> Dataset:
        with open_member(name) as f:
            return read_batch(f, f"{where}/{name}")

    with open_member("batches.meta") as f:
        meta = _unpickle(f, f"{where}/batches.meta")
    names = [n.decode() if isinstance(n, bytes) else n for n in meta.get("label_names", CLASSES)]
    if tuple(names) != CLASSES:
        raise DataError(f"{where}/batches.meta: label_names {names} are not CIFAR-10's")
    per_batch = meta.get("num_cases_per_batch", 10_000)
    names = (*TRAIN_BATCHES, TEST_BATCH) if test else TRAIN_BATCHES
    parts = [read(n) for n in names]
    for n, p in zip(names, parts):
        if len(p) != per_batch:
            raise DataError(f"{where}/{n}: {len(p)} images, batches.meta says {per_batch}")
    train = Dataset(
        np.concatenate([p.images for p in parts[:5]]),
        np.concatenate([p.labels for p in parts[:5]]),
        where,
    )
    return train, Dataset(
        parts[5].images, parts[5].labels, f"{where}/{TEST_BATCH}"
    ) if test else None


def read_folder(folder: Path, test: bool = True) -> tuple[Dataset, Dataset | None]:
    def open_member(name: str) -> IO[bytes]:
        path = folder / name
        if not path.is_file():
            raise DataError(
                f"{path}: missing (the official {FOLDER} layout has {', '.join(TRAIN_BATCHES)}, "
                f"{TEST_BATCH} and batches.meta)"
            )
        try:
            return open(path, "rb")
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror})") from None

    return _read_official(open_member, str(folder), test)


def read_archive(path: Path, test: bool = True) -> tuple[Dataset, Dataset | None]:
    try:
        tar = tarfile.open(path, "r:gz")  # noqa: SIM115 - closed by the `with tar` below
        members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .tar.gz archive ({e})") from None

    def open_member(name: str) -> IO[bytes]:
        if name not in members:
            raise DataError(f"{path}: no {FOLDER}/{name} inside the archive")
        try:
            return io.BytesIO(tar.extractfile(members[name]).read())
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: {name} is truncated or corrupt ({e})") from None

    with tar:
        return _read_official(open_member, str(path), test)


def read_npz(path: Path) -> Dataset:
    """An .npz holding `images` (N x 32 x 32 x 3 uint8 RGB) and `labels`; no pickles are loaded."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise DataError(
                    f"{path}: no {' or '.join(repr(m) for m in missing)} array (found: {z.files})"
                )
            images, labels = z["images"], z["labels"]
    except DataError:
        raise
    except (
        Exception
    ) as e:  # corrupt archives fail in many ways: BadZipFile, zlib.error, header parse errors, ...
        detail = " ".join(str(e).split())
        raise DataError(
            f"{path}: not a readable .npz file ({type(e).__name__}: {detail})"
        ) from None
    return validate(images, labels, str(path))


def _npz_pair(folder: Path) -> tuple[Path, Path] | None:
    test = folder / "test.npz"
    for name in ("train.npz", "train_subset.npz"):
        if (folder / name).is_file() and test.is_file():
            return folder / name, test
    return None


def candidate_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs = [data_dir, os.environ.get("CIFAR_TRANSFER_DATA"), "data"]
    return [Path(d) for d in dirs if d]


def check_readable_folder(folder: Path) -> None:
    """A folder this process may list and enter, or one line naming it (not a file inside it)."""
    if not os.access(folder, os.R_OK | os.X_OK):
        raise DataError(f"{folder}: a folder that cannot be read (permission denied)")


def find_source(folder: Path) -> Path | tuple[Path, Path] | None:
    """What in `folder` holds CIFAR-10: the batches folder (or `folder` itself), the archive, or an
    npz pair."""
    if folder.is_dir():
        check_readable_folder(folder)
    for f in (folder / FOLDER, folder):
        if (f / TEST_BATCH).is_file() or (f / "data_batch_1").is_file():
            return f
    if (folder / ARCHIVE).is_file():
        return folder / ARCHIVE
    return _npz_pair(folder)


def read_source(
    source: Path | tuple[Path, Path], test: bool = True
) -> tuple[Dataset, Dataset | None]:
    if isinstance(source, tuple):
        return read_npz(source[0]), read_npz(source[1]) if test else None
    if source.is_dir():
        return read_folder(source, test)
    return read_archive(source, test)


def download(root: Path, url: str = CIFAR_URL, md5: str = CIFAR_MD5) -> Path:
    """Fetch the official archive with torchvision's downloader, which checks the md5."""
    from torchvision.datasets.utils import download_url

    root.mkdir(parents=True, exist_ok=True)
    download_url(url, str(root), filename=ARCHIVE, md5=md5)
    path = root / ARCHIVE
    if not path.is_file():
        raise DataError(f"{path}: download from {url} did not produce the archive (md5 mismatch?)")
    return path


def load_cifar10(
    data_dir: str | Path | None = None,
    *,
    allow_download: bool = True,
    url: str = CIFAR_URL,
    md5: str = CIFAR_MD5,
    test: bool = True,
) -> tuple[Dataset, Dataset | None]:
    """Return (train, test) from the first place that holds CIFAR-10, downloading into ./data if
    none does.

    With `test=False` the test images are never read (test is None): tuning and the LR finder must
    not see them. A `data_dir` given is the only place looked: a folder named on purpose that holds
    no CIFAR-10 is an error, never a silent fall-back to $CIFAR_TRANSFER_DATA, ./data or a download.
    """
    if data_dir is not None:
        source = find_source(Path(data_dir)) if Path(data_dir).is_dir() else None
        if source is None:
            raise DataError(
                f"--data-dir {data_dir}: holds no CIFAR-10 ({FOLDER}/, {ARCHIVE} or train.npz + "
                "test.npz)"
            )
        return read_source(source, test)
    looked = candidate_dirs(None)
    for folder in looked:
        source = find_source(folder)
        if source is not None:
            return read_source(source, test)
    where = ", ".join(str(p.resolve()) for p in looked)
    hint = (
        f"point --data-dir or $CIFAR_TRANSFER_DATA at a folder holding {FOLDER}/, {ARCHIVE} or "
        "test.npz"
    )
    if not allow_download:
        raise DataError(f"CIFAR-10 not found in: {where}; {hint}")
    try:
        return read_source(download(Path("data"), url, md5), test)
    except DataError:
        raise
    except (
        Exception
    ) as e:  # network failures come in many types (URLError, OSError, RuntimeError, ...)
        raise DataError(
            f"CIFAR-10 not found in: {where}; downloading {url} failed ({type(e).__name__}: {e}); "
            f"{hint}"
        ) from None


def load_test_set(path: str | Path) -> Dataset:
    """A test set for `evaluate --data`: an .npz file, or a folder holding CIFAR-10 in any layout
    above."""
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        return read_npz(path)
    source = find_source(path) if path.is_dir() else None
    if source is None:
        raise DataError(f"{path}: holds no CIFAR-10 ({FOLDER}/, {ARCHIVE} or test.npz)")
    return read_source(source)[1]


def balanced_indices(
    labels: np.ndarray,
    per_class: int,
    rng: np.random.Generator,
    name: str,
    classes: tuple[str, ...] = CLASSES,
) -> np.ndarray:
    picks = []
    for c in range(len(classes)):
        rows = np.flatnonzero(labels == c)
        if len(rows) < per_class:
            raise DataError(
                f"{name}: class {classes[c]} has {len(rows)} images, {per_class} needed"
            )
        picks.append(rng.choice(rows, per_class, replace=False))
    index = np.concatenate(picks)
    rng.shuffle(index)
    return index


def split(
    train: Dataset, test: Dataset | None, train_size: int, val_size: int, seed: int
) -> Splits:
    """Class-balanced seeded training subsample, and a validation set from the training images NOT
    in it."""
    rng = np.random.default_rng(seed)
    train_index = balanced_indices(train.labels, train_size // 10, rng, train.source)
    rest = np.setdiff1d(np.arange(len(train)), train_index)
    val_index = rest[balanced_indices(train.labels[rest], val_size // 10, rng, train.source)]
    return Splits(train.take(train_index), train.take(val_index), test, train_index, val_index)
