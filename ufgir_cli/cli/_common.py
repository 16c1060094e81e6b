"""What the command modules share: the consoles, the option aliases (each flag declared once, with one
help text), number formatting for tables and a progress bar of images.

The error boundary is not here but in ``cli/__init__.py``, around every command. Nothing here imports
torch: ``ufgir --help`` must stay instant.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, ConsoleDimensions
from typer.core import TyperCommand, TyperGroup

#: The width of a console whose file is not a terminal: lines as long as they need, for programs.
UNWRAPPED_WIDTH = 10_000


class _NeverCut:
    """A rich render hook: every table column, and every text inside a table, folds what does not fit
    onto the next line instead of cutting it with "…" (rich's default), so a path or a default is never cut."""

    def process_renderables(self, renderables: list) -> list:
        for r in renderables:
            fold(r)
        return renderables


def fold(renderable) -> None:
    """Make ``renderable`` (a table, a panel, columns or text, nested) fold instead of cutting with "…"."""
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    if isinstance(renderable, Panel):
        fold(renderable.renderable)
    elif isinstance(renderable, Table):
        for col in renderable.columns:
            if col.overflow == "ellipsis":
                col.overflow = "fold"
            for c in col._cells:
                fold(c)
    elif isinstance(renderable, Columns):
        for c in renderable.renderables:
            fold(c)
    elif isinstance(renderable, Text) and renderable.overflow in (None, "ellipsis"):
        renderable.overflow = "fold"


class UfgirConsole(Console):
    """rich's Console for ufgir's output: never wraps when its file is not a terminal (a pipe, a log
    file, a test: one ``key=value`` record stays one line whatever ``COLUMNS`` says) and never cuts
    a table cell with "…" (see :class:`_NeverCut`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._asked_width = kwargs.get("width")  # rich also sets a width from COLUMNS, which a pipe ignores
        self.push_render_hook(_NeverCut())

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._asked_width is None and not self.is_terminal:
            return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = UfgirConsole(highlight=False)
err_console = UfgirConsole(stderr=True, highlight=False)

# Typer's rich help labels every option with its Python type (`<str>`, `<bool>` even on flags); click
# and most CLIs show TEXT, INTEGER, ... and nothing after a flag. Values are named once, here.
_METAVARS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "bool": "BOOLEAN",
             "int range": "INTEGER RANGE", "float range": "FLOAT RANGE"}


def _plain_metavars(params: list, ctx) -> list:
    for p in params:
        if p.param_type_name != "option" or p.metavar is not None:
            continue
        if p.is_flag or p.count:
            p.metavar = ""
        else:
            label = p.display_type(ctx).strip("<>").removeprefix("list[").removesuffix("]")
            p.metavar = _METAVARS.get(label, label.upper())
    return params


@contextmanager
def _help_never_cut() -> Iterator[None]:
    """Typer's rich help, with every option's help, default and name folded onto more lines where a
    column is too narrow (at 80 columns it cuts paths and defaults with "…")."""
    from typer import rich_utils

    make = getattr(rich_utils, "_get_rich_console", None)
    if make is None:  # another Typer: its help as it is
        yield
        return

    def folding_console(*args, **kwargs):
        c = make(*args, **kwargs)
        c.push_render_hook(_NeverCut())
        return c

    rich_utils._get_rich_console = folding_console
    try:
        yield
    finally:
        rich_utils._get_rich_console = make


class PlainCommand(TyperCommand):
    """A command whose help names values as click does (see ``_METAVARS``) and never cuts a default."""

    def get_params(self, ctx):  # type: ignore[override]
        return _plain_metavars(super().get_params(ctx), ctx)

    def format_help(self, ctx, formatter):  # type: ignore[override]
        with _help_never_cut():
            return super().format_help(ctx, formatter)


class PlainGroup(TyperGroup):
    """A group whose own help names values as click does (register its commands with ``cls=PlainCommand``)
    and never cuts a default."""

    def get_params(self, ctx):  # type: ignore[override]
        return _plain_metavars(super().get_params(ctx), ctx)

    def format_help(self, ctx, formatter):  # type: ignore[override]
        with _help_never_cut():
            return super().format_help(ctx, formatter)

RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Packaged recipe name (see `ufgir recipes list`) or a TOML path.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set train.epochs=5 (repeatable)."),
]
RunArg = Annotated[Path | None, typer.Argument(
    help="A run folder, a checkpoint file, or hf://OWNER/NAME[@REVISION] (a model `ufgir push` put on the Hub) "
    "(default: the most recent run under ./runs).", show_default=False)]
CheckpointOpt = Annotated[
    str, typer.Option("--checkpoint", help="Which checkpoint of a run folder: best, last or auto (best if present).")
]


def one_of(value: str | None, choices: Sequence[str]) -> str | None:
    """``value`` when it is one of ``choices`` (or unset), else the option's one-line refusal naming them."""
    if value is not None and value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
    return value


def check_split(value: str | None) -> str | None:
    """``--split``: a split of the dataset folder format, refused at parse time (before torch is imported)."""
    from ..data.folder import SPLITS  # no torch there

    return one_of(value, SPLITS)


SplitOpt = Annotated[str | None, typer.Option("--split", callback=check_split,
                                              help="Dataset split: train, val, train_val or test.")]
TopkOpt = Annotated[int, typer.Option("--topk", "-k", min=1, help="Classes to show per image.")]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Batch size (default: the recipe's).")]
DEVICE_HELP = "cpu, cuda, cuda:N, or auto (cuda when available)."
_DEVICE = r"auto|cpu|mps|cuda(:\d+)?"


def check_device(value: str | None) -> str | None:
    """``--device``: auto, cpu, mps, cuda or cuda:N, refused at parse time (before torch is imported)."""
    import re

    if value is not None and not re.fullmatch(_DEVICE, value):
        raise typer.BadParameter(f"{value!r} is not a device; use {DEVICE_HELP}")
    return value


DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP, callback=check_device)]


def check_precision(value: str | None) -> str | None:
    """``--precision``: one of the recipe's ``train.precision`` values (pydantic only, no torch)."""
    from ..recipe_sections import PRECISIONS

    return one_of(value, PRECISIONS)


def check_export_format(value: str) -> str | None:
    """``ufgir export --format``: one of the formats a run folder has a place for (no torch there)."""
    from ..paths import EXPORT_FORMATS

    return one_of(value, EXPORT_FORMATS)


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


def latest_run(runs: Path) -> Path | None:
    """The run folder under ``runs`` that changed last (its newest checkpoint, metrics or recipe)."""
    from ..paths import RunDir

    found = [RunDir(d) for d in runs.iterdir()] if runs.is_dir() else []
    latest = max((r for r in found if r.is_run()), key=RunDir.changed_at, default=None)
    return latest.root if latest is not None else None


def resolve_run(run: Path | None) -> Path:
    """``run`` itself, or with none given the most recent run under ./runs, named in one line on stderr."""
    if run is not None:
        return run
    from ..errors import OptionError
    from ..paths import runs_dir

    latest = latest_run(runs_dir())
    if latest is None:
        raise OptionError(f"RUN not given and {runs_dir()} holds no run; make one with `make demo` or "
                          "`ufgir train --recipe quickstart`, or give a run folder or checkpoint")
    err_console.print(f"run: {latest} (the most recent under {runs_dir()}; give RUN to pick another)",
                      soft_wrap=True, markup=False)
    return latest


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


def print_eval_modes(cost: dict) -> None:
    """The cost of each evaluation mode, for a method with several (CAL: 8 passes or a single crop's 2)."""
    modes = cost.get("macs_by_eval_mode")
    if modes:
        console.print("evaluation modes: " + " · ".join(f"{name} {macs / 1e9:.2f} GMACs" for name, macs in modes.items()),
                      soft_wrap=True)


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
