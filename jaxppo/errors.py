"""The one base class for bad input that the user can fix.

A config field, a data or weights file, a checkpoint, a run directory: each error names the field,
the file and line, or the directory, in one line. ``experiments/run.py`` prints such an error as that
one line (its traceback with ``--debug``); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input the user can fix; the message names the config field, file (and line) or directory."""
