"""Errors the user can act on.

Every exception raised for bad input derives from :class:`UfgirError`. The CLI's error boundary
(``ufgir_cli/cli/__init__.py``) prints ``str(err)`` as one line and exits with ``err.exit_code``; with
``UFGIR_DEBUG`` set to anything but ``""``, ``0`` or ``false`` it re-raises instead, so the traceback shows.
Any other exception is a bug and always shows its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``known`` to a mistyped ``name`` (any case), else ``""``."""
    known = list(known)
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1, cutoff=0.6)
    return f" (did you mean {next(k for k in known if k.lower() == close[0])!r}?)" if close else ""


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


class OptionError(UfgirError):
    """An option's value does not fit what it is applied to (a block the model lacks, ...); the
    message starts with the option's flag, since it is often known only once the model is loaded."""


class TrainingError(UfgirError):
    """Training cannot go on (non-finite loss, a stop signal, ...)."""

    exit_code = 1


class RunFolderError(TrainingError):
    """A new run's folder is taken: bad input (exit 2), fixed by another --name, --overwrite or --resume."""

    exit_code = 2


class RecipeNotice(UserWarning):
    """Something a recipe's resolution changed that the user should hear of, in one line (e.g. ILA
    positions dropped for a method without ILA). Commands print it as ``notice: ...``."""


class HubError(UfgirError):
    """A Hugging Face Hub push or pull failed: refused, unreachable (or offline with nothing cached),
    not a repo written by `ufgir push`, or files that do not match its ``ufgir.json``."""


class LaunchError(UfgirError):
    """A scheduler refused the work (a submission Slurm rejects: the partition, GPUs, CPUs or time
    asked for do not exist there): bad input, exit 2."""
