"""The errors tfkd reports to users, each with its documented exit code.

The CLI prints ``tfkd: error: <message>`` on one line and exits with the error's code; no
traceback. Anything else that escapes is a bug and exits with code 1 and its traceback.
"""

from __future__ import annotations


class TfkdError(Exception):
    """Base of the user-facing errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(TfkdError):
    """An unknown option, a wrong type or an out-of-range value (exit code 2, like argparse)."""

    exit_code = 2


class DataError(TfkdError):
    """A dataset that is missing, empty, unreadable or malformed (exit code 3)."""

    exit_code = 3


class ModelError(TfkdError):
    """A model file that is missing, unreadable or incompatible with the run (exit code 4)."""

    exit_code = 4


class TrainingError(TfkdError):
    """Training that cannot go on, such as a NaN loss (exit code 5)."""

    exit_code = 5


class ExportError(TfkdError):
    """An export that failed verification: an fp32 format disagrees with Keras (exit code 6)."""

    exit_code = 6
