"""Errors the user can act on.

Every exception raised for bad input derives from :class:`UfgirError`. The CLI's error boundary
prints ``str(err)`` as one line and exits with ``err.exit_code``; anything else is a bug and shows a
traceback only with ``UFGIR_DEBUG=1``.
"""

from __future__ import annotations


class UfgirError(Exception):
    """Base class: a one-line message that names the thing and the fix."""

    exit_code = 2


class RecipeError(UfgirError):
    """A recipe file, key or value is wrong."""


class DatasetError(UfgirError):
    """A dataset folder, split file, archive or download is wrong."""


class CheckpointError(UfgirError):
    """A checkpoint is unreadable, unsafe, or does not match the model it is loaded into."""


class ModelError(UfgirError):
    """A model cannot be built as asked (unknown backbone, missing weights file, ...)."""


class ExportError(UfgirError):
    """An export failed or its parity check against eager PyTorch did not hold."""


class TrainingError(UfgirError):
    """Training cannot go on (non-finite loss, existing run folder, ...)."""

    exit_code = 1
