"""What every command shares: the console, option aliases, and the one error boundary.

Nothing here imports torch: ``ufgir --help`` must stay instant.
"""

from __future__ import annotations

import os
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
SplitOpt = Annotated[str, typer.Option("--split", help="Dataset split: train, val, train_val or test.")]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", "-b", help="Batch size (default: the recipe's).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Plain log lines instead of live progress.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]


def debug_enabled() -> bool:
    return os.environ.get("UFGIR_DEBUG", "") not in ("", "0", "false")


def parse_sets(sets: list[str] | None) -> dict:
    """Build the nested override dict from ``--set a.b=v`` strings (values parsed as TOML)."""
    from ..recipe import parse_overrides

    return parse_overrides(sets or [])
