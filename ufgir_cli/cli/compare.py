"""`ufgir compare`: top-1 against cost of evaluated runs (or sweeps, or reproductions), with the paper's
number beside ours; seeds of one setting as one point with an error bar.

The library call `ufgir_cli.engine.analyze.write_comparison` finds the rows and writes the figure and
its JSON table; this module parses the options and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ._common import DpiOpt, FormatOpt, SplitOpt, console, err_console, figure_formats, fmt


def compare(
    runs: Annotated[list[Path], typer.Argument(
        help="Run folders, checkpoint files, sweep folders (sweeps/NAME: their runs) or reproduction folders "
        "(reproduce/NAME: every sweep's runs).", show_default=False)],
    split: SplitOpt = "test",
    out: Annotated[Path | None, typer.Option("--out", help="The accuracy-vs-MACs PNG (default: runs/compare_<split>.png); a .json table is written beside it.")] = None,
    paper: Annotated[bool, typer.Option("--paper/--no-paper", help="Also draw the paper's Table 1 numbers for the runs' datasets (hollow markers, ViT-B/16 at 448 px).")] = False,
    dpi: DpiOpt = 200,
    vector: FormatOpt = None,
) -> None:
    """Top-1 on --split (each run's eval/<split>/metrics.json) against multiply-adds and trainable
    parameters, with the paper's number beside ours; runs that differ only in their seed are one point
    (mean ± sample std). Exits 1 when no run has been evaluated on --split."""
    formats = figure_formats(vector)
    from ..analysis.paper import PAPER_IMAGE_SIZE
    from ..engine.analyze import write_comparison

    c = write_comparison(runs, split=split, out=out, paper=paper, dpi=dpi, formats=formats)
    for line in c.missing:
        err_console.print(f"[yellow]left out[/] {escape(line)}", soft_wrap=True)
    if not c.rows:
        err_console.print(f"[bold red]error:[/] nothing to compare: no run above has eval/{split}/metrics.json",
                          soft_wrap=True)
        raise typer.Exit(1)
    t = Table(title=f"comparison · {split} (paper: ViT-B/16 at {PAPER_IMAGE_SIZE} px)", title_justify="left")
    for col in ("point", "runs", "px", "top-1 %", "paper %", "GMACs", "trainable"):
        t.add_column(col, justify="left" if col in ("point", "runs") else "right", overflow="fold")
    for p in c.points:
        top1 = f"{p['top1']:.2f}" + (f" ± {p['std']:.2f}" if p["std"] is not None else "")
        t.add_row(escape(p["label"]), escape(", ".join(Path(r).name for r in p["runs"])), str(p["image_size"]),
                  top1 if p["n"] > 1 else f"{top1} (n=1)", fmt(p["paper_top1_448px"], ".2f"), f"{p['gmacs']:.2f}",
                  f"{p['trainable']:,}")
    console.print(t)
    for source in dict.fromkeys(p["source"] for p in c.paper):
        console.print(f"paper points: {source}", soft_wrap=True, markup=False)
    also = "".join(f" (+ .{f})" for f in formats)
    console.print(f"figure: {c.figure}{also}\ntable: {c.table}", soft_wrap=True, markup=False)
