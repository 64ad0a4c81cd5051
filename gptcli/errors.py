"""Errors that are the user's to fix: the CLI prints them as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a flag, a file, a checkpoint). The message is shown as-is, without a traceback."""

    exit_code = 2
