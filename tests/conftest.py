"""Shared fixtures: the real CIFAR-10 and ResNet-50 weights from ../shared, one smoke run that many
tests read, a small .npz copy of the data for tests that train, and a loopback HTTP server."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

# pytest-xdist runs two workers on the two cores: each computes on one thread (two threads each
# would oversubscribe the cores); set before torch is imported, and inherited by the processes the
# tests start
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import pytest
from filelock import FileLock

from cifar_transfer import cli as command

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CIFAR_TRANSFER_SHARED", ROOT.parent / "shared"))
CIFAR_DIR = SHARED / "data" / "cifar-10-batches-py"
WEIGHTS = SHARED / "weights" / "resnet50_imagenet_v1_fp16.safetensors"
HUMAN = SHARED / "data" / "cifar-10h"


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not CIFAR_DIR.is_dir():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR_DIR}")
    return CIFAR_DIR


@pytest.fixture(scope="session")
def weights_path() -> Path:
    if not WEIGHTS.is_file():
        pytest.skip(f"ResNet-50 weights not found at {WEIGHTS}")
    return WEIGHTS


@pytest.fixture(scope="session")
def cifar(cifar_dir: Path):
    from cifar_transfer.data.cifar import read_folder

    return read_folder(cifar_dir)


@pytest.fixture(scope="session")
def pretrained(weights_path: Path):
    from cifar_transfer.model.weights import load_pretrained

    return load_pretrained(weights_path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One test that reads the smoke run first, so one pytest-xdist worker starts it at once; the
    other tests that read it last, so the other worker has tests of its own to run in the
    meantime."""
    reads = [item for item in items if "smoke_run" in getattr(item, "fixturenames", ())]
    rest = [item for item in items if item not in reads]
    items[:] = reads[:1] + rest + reads[1:]


def once(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, FileLock]:
    """A folder made once per test session, shared by pytest-xdist's workers (the first to take the
    lock makes it), and that lock."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common temporary folder
    return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture(scope="session")
def smoke_run(
    cifar_dir: Path, weights_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One real run of the `smoke` preset through the command line, shared by the tests that read
    it.

    Tests that change a run folder work on a copy (`smoke_copy`).
    """
    out, lock = once(tmp_path_factory, "smoke")
    with lock:
        if not (out / "metrics.json").is_file():
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "cifar_transfer.cli",
                    "run",
                    "--preset",
                    "smoke",
                    "--data-dir",
                    str(cifar_dir.parent),
                    "--weights",
                    str(weights_path),
                    "--out",
                    str(out),
                    "--no-progress",
                    "--human-labels",
                    str(HUMAN),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr
            assert "test accuracy" in done.stdout
    return out


def write_digits(root: Path, rows: np.ndarray | None = None) -> Path:
    """Scikit-learn's real scans of handwritten digits (8 x 8, 16 grey levels) as 8-bit greyscale
    PNGs, root/<digit>/<index>.png: a folder of a user's own labelled pictures."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(len(digits.target)) if rows is None else rows:
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        picture = (digits.images[i] * 255 / 16).round().astype(np.uint8)
        Image.fromarray(picture, "L").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 1,797 digit scans as a class-folder tree, written once for every worker."""
    out, lock = once(tmp_path_factory, "digits")
    with lock:
        if not (out / "9").is_dir():
            write_digits(out.with_name("digits-partial"))
            out.with_name("digits-partial").rename(out)
    return out


@pytest.fixture(scope="session")
def digits_run(digits: Path, weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`run --preset smoke --data digits/` through the command line, once for every worker."""
    out, lock = once(tmp_path_factory, "digits-run")
    with lock:
        if not (out / "metrics.json").is_file():
            env = {**os.environ, "CIFAR_TRANSFER_CACHE": str(out.with_name("digits-cache"))}
            args = [
                "run",
                "--preset",
                "smoke",
                "--data",
                str(digits),
                "--weights",
                str(weights_path),
            ]
            done = subprocess.run(
                [sys.executable, "-m", "cifar_transfer", *args, "--out", str(out), "--no-progress"],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def smoke_copy(smoke_run: Path, tmp_path: Path) -> Path:
    """A copy of the smoke run for a test that adds to the folder (evaluations/, analysis/): tests
    running at the same time must not write into one folder.

    Files are hard links (outputs are replaced by renames, never rewritten in place, so the original
    stays as it was).
    """
    return Path(
        shutil.copytree(
            smoke_run,
            tmp_path / "smoke",
            copy_function=os.link,
            # a copy is not locked by the original
            ignore=shutil.ignore_patterns("evaluations", "analysis", ".lock"),
        )
    )


@pytest.fixture(scope="session")
def small_data(cifar, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 as an .npz pair, for tests that train: the first 1,000 training images (enough for
    their splits) and 200 test images, so a run's test evaluation takes a second instead of the
    whole test set's twenty."""
    folder = tmp_path_factory.mktemp("small")
    train, test = cifar
    np.savez(folder / "train.npz", images=train.images[:1000], labels=train.labels[:1000])
    np.savez(folder / "test.npz", images=test.images[:200], labels=test.labels[:200])
    return folder


@pytest.fixture
def cifar_copy(cifar_dir: Path, tmp_path: Path):
    """Make a CIFAR-10 folder whose file `name` holds `content` (the other files link to the real
    ones)."""

    def make(name: str, content: bytes | None) -> Path:
        dest = tmp_path / "copy" / "cifar-10-batches-py"
        dest.mkdir(parents=True)
        for f in cifar_dir.iterdir():
            (dest / f.name).symlink_to(f)
        (dest / name).unlink()
        if content is not None:
            (dest / name).write_bytes(content)
        return dest

    return make


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """The command line's `main`, called in this process (no interpreter start per call) with the
    $CIFAR_TRANSFER_* defaults removed; returns exit status, stdout and stderr like a finished
    process."""
    for key in [k for k in os.environ if k.startswith("CIFAR_TRANSFER_")]:
        monkeypatch.delenv(key)

    def call(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            status = command.main(list(args))
        except SystemExit as e:  # argparse's usage errors and --help
            status = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), status, out, err)

    return call


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on 127.0.0.1 serving a temporary folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
