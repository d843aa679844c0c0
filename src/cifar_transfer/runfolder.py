"""One run folder, one run: a lock held while a run writes into its folder, and no run started
silently over another's results or over a user's files.

The lock is an `fcntl` lock on `RUN/.lock`: the kernel releases it when the process ends in any way
(an exception, Ctrl-C, SIGKILL), so a crashed run leaves no stale lock behind, and a second run into
the same folder is refused while the first is alive. The lock file is opened without following a
link and never truncated before it is known to be a plain file of its own, so a `.lock` planted as a
link cannot clobber what it points at.

A folder that already holds a run (finished, or interrupted with its checkpoint), or any file a run
would replace, is refused unless the caller resumes it or asks to overwrite it. Overwriting removes
only what a run writes, by name, and refuses a folder that holds anything else, naming it: a user's
project or home folder is never emptied.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .atomic import OutputError, check_writable

LOCK = ".lock"
# the shipped model's logits on the run's test images, in their order: `audit` and `analyze` read
# them instead of predicting the test set again
TEST_LOGITS = "test_logits.npy"
# what a run writes first (recipe.json, history.csv, checkpoint.pt) or last (metrics.json,
# model.safetensors)
RUN_FILES = ("recipe.json", "history.csv", "checkpoint.pt", "metrics.json", "model.safetensors")
# every other file a run or a later command on it (evaluate, analyze, robustness) writes, and their
# folders
OUTPUT_FILES = frozenset(
    {
        *RUN_FILES,
        *(
            "report.md",
            "report.html",
            "error.txt",
            "classification_report.txt",
            "analysis.json",
            "splits.csv",
            TEST_LOGITS,
        ),
        *(
            "samples.png",
            "class_counts.png",
            "learning_curves.png",
            "confusion_matrix.png",
            "misclassified.png",
        ),
        *(
            "reliability.png",
            "human_vs_model.png",
            "clear_errors.png",
            "gradcam.png",
            "robustness.png",
        ),
    }
)
OUTPUT_FOLDERS = ("tensorboard", "evaluations", "analysis", "robustness", "audit")


class FolderRefused(OutputError):
    """A folder that cannot take this run: in use, holding another run's results, or files no run
    writes."""


class FolderInUse(FolderRefused):
    """Another live process is writing a run into this folder, or the folder holds another run's
    results."""


@contextlib.contextmanager
def run_folder(folder: Path, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Hold `folder` for one run; refuse a folder in use, or one holding a run (or files a run would
    replace) that is neither resumed nor overwritten.

    With `overwrite`, a folder holding anything a run does not write is refused; the old run's files
    stay until the caller's checks pass and it calls `clear_run`.
    """
    check_writable(folder)
    created = not os.path.lexists(folder / LOCK)
    fd = _open_lock(folder / LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise FolderInUse(
                f"{folder}: in use by another run ({holder}); give this run its own --out"
            ) from None
        if not resume:
            try:
                _check_fresh(folder, overwrite)
            except FolderRefused:
                if created:  # a refused run leaves nothing behind in a folder that is not its own
                    (folder / LOCK).unlink(missing_ok=True)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield folder
    finally:
        os.close(fd)


def _open_lock(path: Path) -> int:
    """The lock file's descriptor: created if absent, never through a link, never anything but a
    plain file with one name (a hard link to another file would be written through as surely as a
    symbolic one)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        why = {
            errno.ELOOP: "a symbolic link, not a lock file (never followed)",
            errno.EISDIR: "a folder, not a lock file",
            errno.ENXIO: "a socket or device, not a lock file",
        }.get(e.errno, f"cannot be opened for writing ({e.strerror})")
        raise FolderRefused(f"{path}: {why}; remove it, or give this run another --out") from None
    info = os.fstat(fd)
    mode, links = info.st_mode, info.st_nlink
    if stat.S_ISREG(mode) and links == 1:
        return fd
    os.close(fd)
    why = "a FIFO" if stat.S_ISFIFO(mode) else "not a plain file"
    if stat.S_ISREG(mode):
        why = f"a hard link ({links} names for one file)"
    raise FolderRefused(
        f"{path}: {why}, not a lock file; remove it, or give this run another --out"
    )


def recorded(folder: Path) -> dict:
    """What a finished run's metrics.json says of how it was made ({} before it has one): the folder
    of pictures it trained on (`data`, None for CIFAR-10), where it read its pictures
    (`data_source`) and the weights it started from (`weights`)."""
    path = folder / "metrics.json"
    facts = json.loads(path.read_text()) if path.is_file() else {}
    if not facts:
        return {}
    folder_run = facts.get("data", {}).get("kind") == "folder"
    source = facts["run"]["data_source"]
    return {
        "data": source if folder_run else None,
        "data_source": source,
        "weights": facts["run"].get("weights"),
    }


def saved_test_logits(
    folder: Path, data: str | Path | None, images: int, classes: int
) -> np.ndarray | None:
    """The test logits the run saved, if it saved them for `images` test images of `classes`
    classes read from `data` (None for a run older than the file, or a test set other than the run's
    own: `data` not the folder its metrics.json names)."""
    path = folder / TEST_LOGITS
    if not path.is_file() or data != recorded(folder).get("data"):
        return None
    try:
        logits = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: not the test logits a run saves ({e}); delete it") from e
    if logits.shape != (images, classes) or not np.isfinite(logits).all():
        return None
    return logits


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def _check_fresh(folder: Path, overwrite: bool) -> None:
    outputs = sorted(
        e.name for e in folder.iterdir() if e.name in OUTPUT_FILES or e.name in OUTPUT_FOLDERS
    )
    if not outputs:
        return
    if overwrite:
        foreign = not_written_by_a_run(folder)
        if foreign:
            shown = ", ".join(str(p.relative_to(folder)) for p in foreign[:5])
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise FolderRefused(
                f"{folder}: holds files no run writes ({shown}{more}); --overwrite removes only a "
                "run's own files and never a folder with anything else: "
                "give this run its own --out"
            )
        return
    if (folder / "checkpoint.pt").exists():
        what = f"an interrupted run: --resume {folder} continues it"
    elif (folder / "metrics.json").exists():
        what = "a finished run"
    elif holds_run(folder):
        what = "part of a run that never checkpointed"
    else:
        what = f"{', '.join(outputs)}, which a run would replace"
    raise FolderInUse(
        f"{folder}: holds {what}; give this run another --out, or --overwrite to replace it"
    )


def not_written_by_a_run(folder: Path) -> list[Path]:
    """Every entry of `folder` that is not a file a run (or a command on it) writes, by name,
    looking into a run's own subfolders; links are never followed and count as foreign."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name == LOCK or _is_temporary(entry.name):
            continue
        if entry.name in OUTPUT_FOLDERS and entry.is_dir() and not entry.is_symlink():
            foreign += _foreign_inside(entry, entry.name == "tensorboard")
        elif entry.name not in OUTPUT_FILES or entry.is_symlink() or not entry.is_file():
            foreign.append(entry)
    return foreign


def _foreign_inside(folder: Path, tensorboard: bool) -> list[Path]:
    """Entries of a run's subfolder (evaluations/NAME/..., analysis/, robustness/, tensorboard/)
    that it does not write."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(entry)
        elif entry.is_dir():
            foreign += _foreign_inside(entry, tensorboard)
        elif not (
            entry.is_file() and (_is_temporary(entry.name) or _is_output(entry.name, tensorboard))
        ):
            foreign.append(entry)
    return foreign


def _is_output(name: str, tensorboard: bool) -> bool:
    return name.startswith("events.out.tfevents.") if tensorboard else name in OUTPUT_FILES


def _is_temporary(name: str) -> bool:
    """An interrupted atomic write's leftover, or the writability probe."""
    return name == ".write-test" or (name.startswith(".") and name.endswith(".tmp"))


def clear_run(folder: Path) -> None:
    """Remove the old run's files (an `--overwrite` once the new run's data and weights have
    loaded); only names a run writes, and only if nothing else has appeared since the folder was
    claimed."""
    foreign = not_written_by_a_run(folder)
    if foreign:
        raise FolderRefused(
            f"{folder}: {foreign[0]} appeared while the run started; nothing was removed"
        )
    for entry in folder.iterdir():
        if entry.name in OUTPUT_FOLDERS and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name != LOCK:
            entry.unlink()
