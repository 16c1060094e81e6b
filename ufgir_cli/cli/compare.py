"""`ufgir compare`: top-1 against cost of several evaluated runs, with the paper's number beside ours.

The rows come from ``ufgir_cli.analysis.report`` and the figure from ``ufgir_cli.viz``; this module
prints the table and writes the figure and its JSON table.
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
    from ..analysis.report import compare_rows, paper_points
    from ..io import atomic_write_json
    from ..paths import runs_dir
    from ..viz.figures import draw_compare, save

    rows, missing = compare_rows(runs, split)
    for line in missing:
        console.print(f"[yellow]left out[/] {escape(line)}", soft_wrap=True)
    if not rows:
        console.print(f"nothing to compare: no run above has eval/{split}/metrics.json yet", soft_wrap=True)
        return
    t = Table(title=f"comparison · {split} (paper: ViT-B/16 at {PAPER_IMAGE_SIZE} px)", title_justify="left")
    for col in ("run", "method", "dataset", "px", "top-1 %", "paper %", "GMACs", "trainable"):
        t.add_column(col, justify="left" if col in ("run", "method", "dataset") else "right", overflow="fold")
    for r in rows:
        t.add_row(r["label"], r["method"], r["dataset"], str(r["image_size"]), f"{r['top1']:.2f}",
                  fmt(r["paper_top1_448px"], ".2f"), f"{r['gmacs']:.2f}", f"{r['trainable']:,}")
    console.print(t)
    out = (out or runs_dir() / f"compare_{split}").with_suffix(".png")
    cited = paper_points([r["dataset"] for r in rows]) if paper else []
    datasets = list(dict.fromkeys(r["dataset_title"] for r in rows + cited))

    def label(r: dict) -> str:
        return r["method_title"] if len(datasets) == 1 else f"{r['method_title']} · {r['dataset_title']}"

    points = [{"label": label(r), "gmacs": r["gmacs"], "top1": r["top1"], "trainable": r["trainable"],
               "family": r["family"], "paper": False} for r in rows]
    points += [{"label": label(r), "gmacs": r["gmacs"], "top1": r["top1"], "trainable": r["trainable"],
                "family": r["family"], "paper": True} for r in cited]
    seen = f"{datasets[0]} · " if len(datasets) == 1 else ""
    fig = draw_compare(points, title=f"Top-1 against cost · {seen}{split}")
    save(fig, out, dpi, formats)
    atomic_write_json(out.with_suffix(".json"), {"split": split, "runs": rows, "paper": cited, "skipped": missing})
    also = "".join(f" (+ .{f})" for f in formats)
    console.print(f"figure: {out}{also}\ntable: {out.with_suffix('.json')}", soft_wrap=True, markup=False)
