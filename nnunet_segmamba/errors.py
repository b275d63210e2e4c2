"""Errors a person can act on: bad input, missing files, a setup step not done.

Library functions raise `ValueError` for bad input (`UserError` is one) and `FileNotFoundError` & co. for missing
paths, with a message that names the input and, where known, the fix. `nnunet_segmamba.cli.main` turns exactly
these types (`USER_ERRORS`) into the one line `nnunet-segmamba <command>: error: <message>` and exit code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input or setup that the user can fix; the message says what, which input, and how to fix it."""


class SetupError(UserError, RuntimeError):
    """A setup step not done (an environment variable, a device, a trainer path). Also a RuntimeError, which
    these errors were before `UserError` existed, so callers catching RuntimeError still catch them."""


# what the command line reports as one line; OSError subclasses that name a path the user gave
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
)
