"""The errors that say a command cannot run as given, found before it does any work: an input
that is not there, a destination this user may not write. ``bigopt`` exits 2 for them, as for a
bad setting (:func:`jobs.spark_step.exit_status`; README, "Exit status"); an error met while the
work runs exits 1. Each subclasses the builtin error it was raised as before, so code that
catches ``FileNotFoundError`` or ``PermissionError`` still does."""
from __future__ import annotations


class MissingInputError(FileNotFoundError):
    """An input a command reads is not there: raw files (a path, a glob that matches nothing, a
    folder without data files), a table (no bronze for featurize, no Delta table at
    ``bigopt lake --table``, no gold for train)."""


class UnwritableError(PermissionError):
    """A folder or bucket the command is to write cannot be written (read-only, a file where a
    folder should be, a path that cannot be made): checked before any work starts."""
