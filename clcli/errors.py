"""Errors a user can cause.

Every exception derived from :class:`ClcliError` is shown by the command-line tool as one
clear message with exit code 2 and no traceback.  Anything else is a bug.
"""

from __future__ import annotations


class ClcliError(Exception):
    """A problem with the user's input (recipe, data, checkpoint, run folder)."""


class RecipeError(ClcliError):
    """The recipe or an override is invalid."""


class DataError(ClcliError):
    """The data source is missing, empty or unreadable."""


class BadImageError(DataError):
    """One image could not be decoded; ``where`` names the file or row."""

    def __init__(self, where: str, reason: str = "") -> None:
        self.where = where
        self.reason = reason
        msg = f"cannot read image {where}"
        if reason:
            msg += f": {reason}"
        super().__init__(msg)


class CheckpointError(ClcliError):
    """A checkpoint or run folder is missing, incomplete or from another recipe."""


class TrainingError(ClcliError):
    """Training cannot go on (for example a non-finite loss)."""


class DistributedError(ClcliError):
    """The multi-process set-up is inconsistent (a half-set torchrun environment, a batch that does not split)."""


class FileSystemError(ClcliError):
    """A file or folder cannot be read or written: missing, of the wrong kind, not permitted, or the disk is full."""


class CodeNotAllowedError(ClcliError):
    """A recipe names Python code to load (a ``python:`` hook) and the user has not allowed loading code."""
