"""One run folder, one run: a lock held while a run writes into its folder, and no run started silently over
another's results.

The lock is an `fcntl` lock on `RUN/.lock`: the kernel releases it when the process ends in any way (an
exception, Ctrl-C, SIGKILL), so a crashed run leaves no stale lock behind, and a second run into the same folder
is refused while the first is alive. A folder that already holds a run (finished, or interrupted with its
checkpoint) is refused unless the caller resumes it or asks to overwrite it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .atomic import OutputError, check_writable

LOCK = ".lock"
# what a run writes first (recipe.json, history.csv, checkpoint.pt) or last (metrics.json, model.safetensors)
RUN_FILES = ("recipe.json", "history.csv", "checkpoint.pt", "metrics.json", "model.safetensors")


class FolderInUse(OutputError):
    """Another live process is writing a run into this folder, or the folder holds another run's results."""


@contextlib.contextmanager
def run_folder(folder: Path, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Hold `folder` for one run; refuse a folder in use or one holding a run that is neither resumed nor
    overwritten. With `overwrite`, the old run's files are removed once the lock is held."""
    check_writable(folder)
    with open(folder / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise FolderInUse(f"{folder}: in use by another run ({holder}); give this run its own --out") from None
        if not resume:
            _check_fresh(folder, overwrite)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        yield folder


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def _check_fresh(folder: Path, overwrite: bool) -> None:
    if not holds_run(folder):
        return
    if overwrite:
        for entry in folder.iterdir():
            if entry.name != LOCK:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return
    if (folder / "checkpoint.pt").exists():
        what = f"an interrupted run: --resume {folder} continues it"
    elif (folder / "metrics.json").exists():
        what = "a finished run"
    else:
        what = "part of a run that never checkpointed"
    raise FolderInUse(f"{folder}: holds {what}; give this run another --out, or --overwrite to replace it")
