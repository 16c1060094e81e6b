"""`ufgir compare`: top-1 against cost of several evaluated runs, with the paper's number beside ours.

The library call `ufgir_cli.engine.analyze.write_comparison` finds the rows and writes the figure and
its JSON table; this module parses the options and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ._common import DpiOpt, FormatOpt, SplitOpt, console, figure_formats, fmt


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders or checkpoint files.", show_default=False)],
    split: SplitOpt = "test",
    out: Annotated[Path | None, typer.Option("--out", help="The accuracy-vs-MACs PNG (default: runs/compare_<split>.png); a .json table is written beside it.")] = None,
    paper: Annotated[bool, typer.Option("--paper/--no-paper", help="Also draw the paper's Table 1 numbers for the runs' datasets (hollow markers, ViT-B/16 at 448 px).")] = False,
    dpi: DpiOpt = 200,
    vector: FormatOpt = None,
) -> None:
    """Top-1 on --split (each run's eval/<split>/metrics.json) against multiply-adds and trainable
    parameters, with the paper's number beside ours."""
    formats = figure_formats(vector)
    from ..analysis.paper import PAPER_IMAGE_SIZE
    from ..engine.analyze import write_comparison

    c = write_comparison(runs, split=split, out=out, paper=paper, dpi=dpi, formats=formats)
    for line in c.missing:
        console.print(f"[yellow]left out[/] {escape(line)}", soft_wrap=True)
    if not c.rows:
        console.print(f"nothing to compare: no run above has eval/{split}/metrics.json yet", soft_wrap=True)
        return
    t = Table(title=f"comparison · {split} (paper: ViT-B/16 at {PAPER_IMAGE_SIZE} px)", title_justify="left")
    for col in ("run", "method", "dataset", "px", "top-1 %", "paper %", "GMACs", "trainable"):
        t.add_column(col, justify="left" if col in ("run", "method", "dataset") else "right", overflow="fold")
    for r in c.rows:
        t.add_row(r["label"], r["method"], r["dataset"], str(r["image_size"]), f"{r['top1']:.2f}",
                  fmt(r["paper_top1_448px"], ".2f"), f"{r['gmacs']:.2f}", f"{r['trainable']:,}")
    console.print(t)
    also = "".join(f" (+ .{f})" for f in formats)
    console.print(f"figure: {c.figure}{also}\ntable: {c.table}", soft_wrap=True, markup=False)
