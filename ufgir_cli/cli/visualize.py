"""`ufgir visualize rollout|attention|crops`: attention (or what a method selects) drawn over images, written under
``<run>/analysis/visualize/<name>/`` (a grid and one figure per image; one image per class by default).

The library calls in ``ufgir_cli.engine.analyze`` compute, draw and write; these commands parse options
and print the grid's path. The options every command shares are declared once, as ``Annotated``
aliases, and checked once (`_shown`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    CheckpointOpt,
    DeviceOpt,
    DpiOpt,
    FormatOpt,
    PlainCommand,
    PlainGroup,
    RunArg,
    SplitOpt,
    console,
    figure_formats,
    resolve_run,
)

app = typer.Typer(cls=PlainGroup, no_args_is_help=True, add_completion=False, rich_markup_mode="rich")


def _check_fusion(value: str) -> str:
    from ..analysis.rollout import FUSIONS

    if value not in FUSIONS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(FUSIONS)}")
    return value


ImagesOpt = Annotated[list[Path] | None, typer.Option(
    "--images", help="Image files to show instead of a split (repeatable).", show_default=False)]
PerClassOpt = Annotated[int, typer.Option("--per-class", min=1, help="Images of each class to show.")]
ShowCountOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Show at most this many images (classes spread over the split's).")]
ColsOpt = Annotated[int | None, typer.Option("--cols", min=1, help="Panels per row of the grid (default: a shape near 16:9).", show_default=False)]
FusionOpt = Annotated[str, typer.Option("--fusion", callback=_check_fusion, help="Head fusion: mean, max or min.")]


def _shown(run: Path | None, split: str, images: list[Path] | None, per_class: int, batch_size: int, cols: int | None,
           checkpoint: str, device: str, dpi: int, vector: list[str] | None) -> dict:
    """The options every `visualize` command shares, checked, as the keyword arguments of the
    `ufgir_cli.engine.analyze` writers."""
    formats = figure_formats(vector)
    run = resolve_run(run)
    if images:
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise typer.BadParameter(f"no such file: {', '.join(missing)}", param_hint="--images")
        from ..data.datasets import find_unreadable

        bad = find_unreadable([str(p) for p in images])
        if bad:
            raise typer.BadParameter("; ".join(f"{p} cannot be decoded ({why})" for p, why in bad)
                                     + "; give image files that open", param_hint="--images")
    return dict(run=run, split=split, images=images, per_class=per_class, count=batch_size, cols=cols,
                checkpoint=checkpoint, device=device, dpi=dpi, formats=formats)


def _printed(path: Path) -> None:
    console.print(str(path), soft_wrap=True, markup=False)


@app.command("rollout", cls=PlainCommand)
def rollout(
    run: RunArg = None,
    group: Annotated[str | None, typer.Option("--group", help="Blocks a-b (inclusive) inside one encoder group, e.g. 0-3 (default: every group).")] = None,
    discard: Annotated[float, typer.Option("--discard", min=0.0, max=0.99, help="Drop this fraction of the weakest attention entries per block.")] = 0.0,
    across: Annotated[bool, typer.Option("--across", help="One map through all blocks, carried over each down-sampling ILA.")] = False,
    split: SplitOpt = "test", images: ImagesOpt = None, per_class: PerClassOpt = 1, batch_size: ShowCountOpt = 8,
    cols: ColsOpt = None, fusion: FusionOpt = "mean", checkpoint: CheckpointOpt = "auto", device: DeviceOpt = "auto",
    dpi: DpiOpt = 200, vector: FormatOpt = None,
) -> None:
    """Attention rollout per encoder group (or --across the whole network) over the images; prints the grid path."""
    if across and group is not None:
        raise typer.BadParameter("--group and --across exclude each other", param_hint="--group")
    from ..engine.analyze import write_rollout

    shown = _shown(run, split, images, per_class, batch_size, cols, checkpoint, device, dpi, vector)
    _printed(write_rollout(shown.pop("run"), group=group, across=across, fusion=fusion, discard=discard, **shown))


@app.command("attention", cls=PlainCommand)
def attention(
    run: RunArg = None,
    layer: Annotated[int | None, typer.Option("--layer", min=0, help="Block whose CLS attention is shown (default: the last).")] = None,
    split: SplitOpt = "test", images: ImagesOpt = None, per_class: PerClassOpt = 1, batch_size: ShowCountOpt = 8,
    cols: ColsOpt = None, fusion: FusionOpt = "mean", checkpoint: CheckpointOpt = "auto", device: DeviceOpt = "auto",
    dpi: DpiOpt = 200, vector: FormatOpt = None,
) -> None:
    """The head-fused CLS attention of one block over the images; prints the grid path."""
    from ..engine.analyze import write_attention

    shown = _shown(run, split, images, per_class, batch_size, cols, checkpoint, device, dpi, vector)
    _printed(write_attention(shown.pop("run"), layer=layer, fusion=fusion, **shown))


@app.command("crops", cls=PlainCommand)
def crops(
    run: RunArg = None,
    split: SplitOpt = "test", images: ImagesOpt = None, per_class: PerClassOpt = 1, batch_size: ShowCountOpt = 8,
    cols: ColsOpt = None, checkpoint: CheckpointOpt = "auto", device: DeviceOpt = "auto",
    dpi: DpiOpt = 200, vector: FormatOpt = None,
) -> None:
    """What the method selects or crops (GLSim's and RAMS's box and crop, CAL's crops, the patches TransFG
    and FFVT pick) over the images; prints the grid path."""
    from ..engine.analyze import write_crops

    shown = _shown(run, split, images, per_class, batch_size, cols, checkpoint, device, dpi, vector)
    _printed(write_crops(shown.pop("run"), **shown))
