"""The project's own error type.

Every failure the tool foresees (bad data, weights, recipe, checkpoint, image, output folder,
device, port) is a subclass whose message names the file or field and what is wrong: the CLI prints
it as one line. Anything else is a bug, and gets a traceback.
"""

import os


class CifarTransferError(Exception):
    """A foreseen failure with a complete message for the user."""


class MissingExtra(CifarTransferError, ImportError):
    """A command needs an optional dependency group that is not installed."""


def require(group: str, *modules: str) -> None:
    """Refuse, naming the pip command, when an optional group's modules are missing (`pip install
    cifar-transfer` alone trains and reports; serving, export, tuning and parts of the analysis are
    extras)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"{', '.join(missing)} not installed: pip install 'cifar-transfer[{group}]'"
        )


class ResourceError(CifarTransferError):
    """The machine lacks what any run needs: memory, or a folder for temporary files."""


# how an allocation that failed shows itself, from Python, PyTorch's CPU allocator, oneDNN and the
# dynamic loader
OUT_OF_MEMORY = (
    "can't allocate memory",
    "could not create a primitive",
    "bad_alloc",
    "Cannot allocate memory",
    "failed to map segment",
    "out of memory",
)


def out_of_memory(e: BaseException) -> ResourceError | None:
    """A one-line error for an exception that says memory ran out (under `ulimit -v`, say); None
    otherwise."""
    if not (isinstance(e, MemoryError) or any(s in str(e) for s in OUT_OF_MEMORY)):
        return None
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    where = (
        f"an address-space limit of {limit / 2**30:.1f} GiB (ulimit -v)"
        if limit > 0
        else "the memory there is"
    )
    return ResourceError(
        f"out of memory ({type(e).__name__}) within {where}: raise the limit, or ask for less with "
        "--set batch_size=..., eval_batch_size=... or a smaller train_size; "
        "docs/performance.md gives measured peaks"
    )


def check_temporary_folder() -> None:
    """Refuse at once, naming TMPDIR, where no folder takes temporary files (libraries fail deep in
    their imports)."""
    import tempfile

    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        shown = os.environ.get("TMPDIR", "unset")
        raise ResourceError(
            f"no usable folder for temporary files (TMPDIR={shown}, /tmp, /var/tmp and the current "
            "folder are missing or not writable): set TMPDIR to a writable folder"
        ) from None
