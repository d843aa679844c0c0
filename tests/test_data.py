import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cifar_transfer.data.cifar import (
    ARCHIVE,
    CLASSES,
    DataError,
    load_cifar10,
    load_test_set,
    read_archive,
    read_folder,
    read_npz,
    split,
)


def test_reads_the_genuine_folder(cifar):
    train, test = cifar
    assert train.images.shape == (50_000, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (10_000, 32, 32, 3)
    # first labels as given for the official files
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(train.labels).tolist() == [5000] * 10
    # channel order: RGB, checked against the known CIFAR-10 channel means
    assert np.allclose(
        train.images.reshape(-1, 3).mean(0) / 255, [0.4914, 0.4822, 0.4465], atol=1e-3
    )


@pytest.fixture(scope="session")
def archive(cifar_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("archive") / ARCHIVE
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(cifar_dir, arcname="cifar-10-batches-py")
    return path


def test_reads_the_archive_like_the_folder(archive, cifar):
    train, test = read_archive(archive)
    assert np.array_equal(train.images, cifar[0].images) and np.array_equal(
        test.labels, cifar[1].labels
    )


def test_downloads_the_archive_from_a_loopback_server(archive, http_root, tmp_path, monkeypatch):
    root, url = http_root
    (root / ARCHIVE).write_bytes(archive.read_bytes())
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("CIFAR_TRANSFER_DATA", raising=False)
    train, test = load_cifar10(None, url=f"{url}/{ARCHIVE}", md5=md5)
    assert (work / "data" / ARCHIVE).is_file()
    assert len(train) == 50_000 and len(test) == 10_000
    # the second call finds the downloaded copy and does not download again
    (root / ARCHIVE).unlink()
    assert len(load_cifar10(None, url=f"{url}/{ARCHIVE}", md5=md5)[1]) == 10_000


def test_download_with_wrong_md5_is_refused(archive, http_root, tmp_path, monkeypatch):
    root, url = http_root
    (root / ARCHIVE).write_bytes(archive.read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR_TRANSFER_DATA", raising=False)
    with pytest.raises(DataError, match="downloading"):
        load_cifar10(None, url=f"{url}/{ARCHIVE}", md5="0" * 32)


def test_offline_error_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR_TRANSFER_DATA", str(tmp_path / "env-dir"))
    with pytest.raises(DataError) as e:
        load_cifar10(None, url="http://127.0.0.1:9/cifar-10-python.tar.gz")
    message = str(e.value)
    for fragment in ("env-dir", "data", "--data-dir", "CIFAR_TRANSFER_DATA"):
        assert fragment in message


def test_an_explicit_data_dir_without_cifar10_never_falls_back(cifar_dir, tmp_path, monkeypatch):
    # would be found, and must not be used
    monkeypatch.setenv("CIFAR_TRANSFER_DATA", str(cifar_dir.parent))
    (tmp_path / "digits").mkdir()
    for given in (tmp_path / "digits", tmp_path / "nowhere"):
        with pytest.raises(DataError, match=f"--data-dir {given}: holds no CIFAR-10"):
            load_cifar10(given, url="http://127.0.0.1:9/cifar-10-python.tar.gz")


def test_lookup_order_prefers_data_dir_then_environment(cifar_dir, tmp_path, monkeypatch):
    np.savez(
        tmp_path / "train.npz",
        images=np.zeros((20, 32, 32, 3), np.uint8),
        labels=np.arange(20) % 10,
    )
    np.savez(
        tmp_path / "test.npz", images=np.zeros((10, 32, 32, 3), np.uint8), labels=np.arange(10)
    )
    monkeypatch.setenv("CIFAR_TRANSFER_DATA", str(tmp_path))
    assert len(load_cifar10(None, allow_download=False)[1]) == 10
    assert len(load_cifar10(cifar_dir.parent, allow_download=False)[1]) == 10_000


def batch(data: object, labels: object) -> bytes:
    return pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels}, protocol=2)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("data_batch_3", None, "data_batch_3: truncated or corrupt"),
        ("test_batch", b"", "test_batch: truncated or corrupt"),
        ("data_batch_2", batch(np.zeros((10_000, 100), np.uint8), [0] * 10_000), "N x 3072"),
        (
            "data_batch_2",
            batch(np.zeros((10_000, 3072), np.float32), [0] * 10_000),
            "must be uint8",
        ),
        (
            "data_batch_4",
            batch(np.zeros((10_000, 3072), np.uint8), [12] * 10_000),
            "labels must be in 0..9",
        ),
        (
            "data_batch_5",
            batch(np.zeros((9_000, 3072), np.uint8), [0] * 9_000),
            "9000 images, batches.meta says",
        ),
        ("data_batch_1", pickle.dumps({b"labels": [1]}, protocol=2), "missing key 'data'"),
        ("data_batch_1", pickle.dumps(Path("/etc/passwd")), "refusing to load pathlib"),
    ],
)
def test_bad_batch_files_are_named(cifar_dir, cifar_copy, name, content, fragment):
    if content is None:  # truncated: the first half of the real file
        content = (cifar_dir / name).read_bytes()[: (cifar_dir / name).stat().st_size // 2]
    folder = cifar_copy(name, content)
    with pytest.raises(DataError, match=fragment) as e:
        read_folder(folder)
    assert name in str(e.value)


def test_missing_batch_file_is_named(cifar_copy):
    folder = cifar_copy("data_batch_2", None)
    with pytest.raises(DataError, match="data_batch_2: missing"):
        read_folder(folder)


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"pixels": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.zeros(2, int)}, "no 'images'"),
        ({"images": np.zeros((2, 32, 32, 3), np.uint8)}, "no 'labels'"),
        (
            {"images": np.zeros((2, 3, 32, 32), np.uint8), "labels": np.zeros(2, int)},
            "N x 32 x 32 x 3",
        ),
        ({"images": np.zeros((2, 32, 32, 3), np.float32), "labels": np.zeros(2, int)}, "uint8"),
        (
            {"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.zeros(3, int)},
            "2 images but 3 labels",
        ),
        ({"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.array([0, -1])}, "0..9"),
    ],
)
def test_bad_npz_is_named(tmp_path, arrays, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=fragment) as e:
        read_npz(path)
    assert str(path) in str(e.value)


def test_npz_that_is_not_a_zip(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        load_test_set(path)


def test_split_is_balanced_disjoint_and_seeded(cifar):
    train, test = cifar
    a = split(train, test, 1000, 500, seed=1)
    assert np.bincount(a.train.labels).tolist() == [100] * 10
    assert np.bincount(a.val.labels).tolist() == [50] * 10
    assert not set(a.train_index) & set(a.val_index)
    assert np.array_equal(a.train.images, train.images[a.train_index])
    b = split(train, test, 1000, 500, seed=1)
    c = split(train, test, 1000, 500, seed=2)
    assert np.array_equal(a.train_index, b.train_index)
    assert not np.array_equal(a.train_index, c.train_index)


def test_split_too_large_for_the_data_is_named(cifar):
    train, test = cifar
    small = train.take(np.arange(100))
    with pytest.raises(DataError, match=r"has \d+ images, \d+ needed"):
        split(small, test, 100, 0, seed=0)


def test_class_names_come_in_the_order_of_the_datas_own_meta_and_other_names_are_refused(
    cifar_dir, cifar_copy
):
    """Labels are indices into batches.meta's label_names: the names the tool prints must be those,
    in order."""
    with open(cifar_dir / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert tuple(meta["label_names"]) == CLASSES
    swapped = {**meta, "label_names": [CLASSES[1], CLASSES[0], *CLASSES[2:]]}
    folder = cifar_copy("batches.meta", pickle.dumps(swapped, protocol=2))
    with pytest.raises(DataError, match=r"batches\.meta: label_names .* are not CIFAR-10's"):
        read_folder(folder)
