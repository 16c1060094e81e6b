"""What the command modules share: the consoles, the option aliases (each flag declared once, with one
help text), number formatting for tables and a progress bar of images.

The error boundary is not here but in ``cli/__init__.py``, around every command. Nothing here imports
torch: ``ufgir --help`` must stay instant.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Packaged recipe name (see `ufgir recipes list`) or a TOML path.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set train.epochs=5 (repeatable)."),
]
RunArg = Annotated[Path, typer.Argument(help="A run folder or a checkpoint file.", show_default=False)]
CheckpointOpt = Annotated[
    str, typer.Option("--checkpoint", help="Which checkpoint of a run folder: best, last or auto (best if present).")
]
SplitOpt = Annotated[str | None, typer.Option("--split", help="Dataset split: train, val, train_val or test.")]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Batch size (default: the recipe's).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
DpiOpt = Annotated[int, typer.Option("--dpi", min=50, max=1200, help="Resolution of the PNG figures (dots per inch).")]
FormatOpt = Annotated[
    list[str] | None,
    typer.Option("--format", help="Also write each figure as pdf or svg (vector, repeatable); PNG is always written.",
                 show_default=False),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Plain log lines instead of live progress.")]


def debug_enabled() -> bool:
    """``UFGIR_DEBUG`` set to anything but "", "0" or "false": the error boundary re-raises (traceback)."""
    return os.environ.get("UFGIR_DEBUG", "") not in ("", "0", "false")


def parse_sets(sets: list[str] | None) -> dict:
    """Build the nested override dict from ``--set a.b=v`` strings (values parsed as TOML)."""
    from ..recipe import parse_overrides

    return parse_overrides(sets or [])


def figure_formats(formats: list[str] | None) -> tuple[str, ...]:
    """The ``--format`` values, checked: vector formats written beside every PNG figure."""
    for f in formats or ():
        if f not in ("pdf", "svg"):
            raise typer.BadParameter(f"{f!r} is not one of pdf, svg (PNG is always written)", param_hint="--format")
    return tuple(dict.fromkeys(formats or ()))


def fmt(v: float | None, spec: str = ".3f") -> str:
    """A table cell: ``v`` formatted, or "-" where there is no number."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


@contextmanager
def image_progress() -> Iterator[Callable[[str, int, int], None]]:
    """Transient bars of images on a terminal (silent in logs and tests); yields the ``progress(description,
    n, total)`` callback of ``ufgir_cli.analysis.report``, which opens one bar per description."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    tasks: dict[str, TaskID] = {}

    def advance(description: str, n: int, total: int) -> None:
        if description not in tasks:
            tasks[description] = progress.add_task(description, total=total)
        progress.advance(tasks[description], n)

    with progress:
        yield advance
