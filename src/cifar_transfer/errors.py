"""The project's own error type. Every failure the tool foresees (bad data, weights, recipe, checkpoint, image,
output folder, device, port) is a subclass whose message names the file or field and what is wrong: the CLI
prints it as one line. Anything else is a bug, and gets a traceback."""


class CifarTransferError(Exception):
    """A foreseen failure with a complete message for the user."""
