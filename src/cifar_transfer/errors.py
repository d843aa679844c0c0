"""The project's own error type. Every failure the tool foresees (bad data, weights, recipe, checkpoint, image,
output folder, device, port) is a subclass whose message names the file or field and what is wrong: the CLI
prints it as one line. Anything else is a bug, and gets a traceback."""


class CifarTransferError(Exception):
    """A foreseen failure with a complete message for the user."""


class MissingExtra(CifarTransferError, ImportError):
    """A command needs an optional dependency group that is not installed."""


def require(group: str, *modules: str) -> None:
    """Refuse, naming the pip command, when an optional group's modules are missing (`pip install cifar-transfer`
    alone trains and reports; serving, export, tuning and parts of the analysis are extras)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{', '.join(missing)} not installed: pip install 'cifar-transfer[{group}]'")
