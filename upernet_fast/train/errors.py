"""Errors that a user's input causes (a bad option, a missing folder, a corrupt checkpoint, a diverged run).

The library raises them like any exception; the command line (``upernet-fast train | eval | predict``) prints
their message as one line and exits with status 2, as argparse does for a bad option, instead of a traceback
that would bury the one sentence that matters. Anything else is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """A bad option value or bad data: the message names the option or file and what was expected."""


class InputNotFound(UsageError, FileNotFoundError):
    """A file or folder named on the command line (or inside a dataset) does not exist or is empty."""
