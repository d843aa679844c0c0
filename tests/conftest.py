"""Shared fixtures: the real CIFAR-10 and ResNet-50 weights from ../shared, and a loopback HTTP server."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    from cifar_transfer.data import read_folder

    return read_folder(cifar_dir)


@pytest.fixture(scope="session")
def pretrained(weights_path: Path):
    from cifar_transfer.model import load_pretrained

    return load_pretrained(weights_path)


@pytest.fixture(scope="session")
def smoke_run(cifar_dir: Path, weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run of the `smoke` preset through the command line, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    done = subprocess.run(
        [sys.executable, "-m", "cifar_transfer.cli", "run", "--preset", "smoke", "--data-dir", str(cifar_dir.parent),
         "--weights", str(weights_path), "--out", str(out), "--no-progress", "--human-labels", str(HUMAN)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout
    return out


@pytest.fixture
def cifar_copy(cifar_dir: Path, tmp_path: Path):
    """Make a CIFAR-10 folder whose file `name` holds `content` (the other files link to the real ones)."""

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
    $CIFAR_TRANSFER_* defaults removed; returns exit status, stdout and stderr like a finished process."""
    for key in [k for k in os.environ if k.startswith("CIFAR_TRANSFER_")]:
        monkeypatch.delenv(key)

    def call(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        status = command.main(list(args))
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
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
