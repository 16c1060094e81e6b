"""Where ufgir keeps datasets and runs.

``UFGIR_DATA_DIR`` wins over the platform's user data folder and ``UFGIR_RUNS_DIR`` over ``./runs``,
so that a cluster job can point every rank at shared storage without touching recipes.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

APP = "ufgir"

#: Environment variables that configure the program but are not recipe keys.
NON_RECIPE_ENV = frozenset(
    {"UFGIR_DATA_DIR", "UFGIR_DEBUG", "UFGIR_RUNS_DIR", "UFGIR_DIST_TIMEOUT", "UFGIR_FIXTURES"}
)


def data_dir() -> Path:
    return Path(os.environ.get("UFGIR_DATA_DIR") or user_data_dir(APP)).expanduser()


def runs_dir() -> Path:
    return Path(os.environ.get("UFGIR_RUNS_DIR") or "runs")


def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of dataset ``name``: ``root`` itself when it holds the dataset, else ``<root>/<name>``."""
    base = Path(root).expanduser() if root else data_dir()
    if (base / "splits").is_dir() and not (base / name).is_dir():
        return base
    return base / name


def run_dir_of(source: str | os.PathLike) -> Path:
    """The run folder a source belongs to: a run folder, ``checkpoints/x.pt`` or ``export/x.*`` inside
    one; for a loose file, the folder holding it (results of that file are written there)."""
    source = Path(source)
    if source.is_dir():
        return source
    if source.parent.name in ("checkpoints", "export"):
        return source.parent.parent
    return source.parent
