"""Atomic file output: write to a temporary file beside the target, fsync, then rename.

A reader (or a crash) never sees a half-written report, model or checkpoint: the old file or the new
one. A full disk is reported as such, naming the file, however deep in a library the failed write
happened.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

from .errors import CifarTransferError

MiB = 2**20


class OutputError(CifarTransferError, OSError):
    """An output cannot be written (permission, a file where a folder should be); the message names
    it."""


class DiskFullError(OutputError):
    """The file system has no room for an output; the message names the file and the free space."""


def check_writable(folder: Path) -> None:
    """Fail before any work if `folder` cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(folder / ".write-test", b"ok")
        (folder / ".write-test").unlink()
    except OSError as e:
        raise OutputError(f"{folder}: output folder is not writable ({e.strerror or e})") from None


def child(parent: Path, name: str) -> Path:
    """`parent / name` for a derived output folder or file, refused unless `name` is one plain path
    component: a name taken from user input (a data folder's, a recipe's) never leads out of its
    parent."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise OutputError(
            f"{name!r}: not a plain file or folder name, so no output is written under {parent}"
        )
    return parent / name


def write_with(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(f)` on a temporary file in the target's folder and atomically move it into
    place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports what interrupted it as "[enforce fail ...] unexpected pos": look inside
        if _in_chain(e, lambda x: isinstance(x, KeyboardInterrupt)):
            raise KeyboardInterrupt from None
        if _in_chain(
            e, lambda x: isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT)
        ):
            raise DiskFullError(
                f"{path}: no space left on device ({free_mib(path.parent):,.0f} MiB free)"
            ) from None
        if isinstance(e, PermissionError):
            raise OutputError(f"{path}: cannot be written ({e.strerror})") from None
        raise
    return path


def _in_chain(e: BaseException | None, match: Callable[[BaseException], bool]) -> bool:
    """Whether `e` or an exception it was raised from or while handling matches."""
    while e is not None:
        if match(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def free_mib(folder: Path) -> float:
    return shutil.disk_usage(folder).free / MiB


def ensure_free(folder: Path, needed: int, what: str) -> None:
    """Refuse to start work whose outputs cannot fit: better now than after an hour of training."""
    free = free_mib(folder)
    if free * MiB < needed:
        raise DiskFullError(
            f"{folder}: no space left on device for {what}: about {needed / MiB:,.0f} MiB needed, "
            f"{free:,.0f} MiB free"
        )


def remove_stale(folder: Path) -> None:
    """Delete the temporary files interrupted atomic writes left in `folder` (a killed run's half
    checkpoint)."""
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: object) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


class Background:
    """Atomic writes in a background thread, one at a time: training goes on while a checkpoint is
    written.

    `submit` first waits for the previous write; an error of a write surfaces in the caller at the
    next `submit` or `wait`. `then` runs once the file is in place (e.g. the history row that says
    the checkpoint exists).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atomic-write")
        self._pending: Future | None = None

    def submit(
        self,
        path: Path,
        write: Callable[[IO[bytes]], object],
        then: Callable[[], None] | None = None,
    ) -> None:
        self.wait()

        def job() -> None:
            write_with(path, write)
            if then is not None:
                then()

        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Let the last write finish (its error, if any, is dropped: call `wait` first to see
        it)."""
        self._pool.shutdown(wait=True)
