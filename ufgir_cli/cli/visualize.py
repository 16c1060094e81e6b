"""`ufgir visualize rollout|attention|crops|tokens`: attention (or what a method selects) drawn over images, written under
``<run>/analysis/visualize/<name>/`` (a grid and one figure per image; one image per class by default).

The library calls in ``ufgir_cli.engine.analyze`` compute, draw and write; these commands parse options
and print every file written, one per line (notes, such as classes left out, go to stderr). The options
every command shares are declared once, as ``Annotated`` aliases, and checked once (`_shown`).
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
    err_console,
    figure_formats,
    one_of,
    resolve_run,
)

app = typer.Typer(cls=PlainGroup, no_args_is_help=True, add_completion=False, rich_markup_mode="rich")


def _check_fusion(value: str) -> str:
    from ..analysis.rollout import FUSIONS

    return one_of(value, FUSIONS)


ImagesOpt = Annotated[list[Path] | None, typer.Option(
    "--images", help="Image files or folders (searched for images) to show instead of a split; several may "
    "follow one --images (--images leaves/*.png), or repeat it.", show_default=False)]
MoreArg = Annotated[list[Path] | None, typer.Argument(
    metavar="IMAGE", help="More images for --images: what a shell glob after --images expands to.",
    show_default=False)]
CmapOpt = Annotated[str, typer.Option("--cmap", help="Colour map of the attention: any matplotlib name "
                                      "(default inferno: uniform and colour-blind safe; jet is neither).")]
PerClassOpt = Annotated[int, typer.Option("--per-class", min=1, help="Images of each class to show.")]
ShowCountOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Show at most this many images (classes spread over the split's).")]
ColsOpt = Annotated[int | None, typer.Option("--cols", min=1, help="Panels per row of the grid (default: a shape near 16:9).", show_default=False)]
FusionOpt = Annotated[str, typer.Option("--fusion", callback=_check_fusion, help="Head fusion: mean, max or min.")]


def _is_run(p: Path) -> bool:
    """Whether a positional argument names a model (a run folder, a checkpoint, a Hub model), not an image."""
    from ..paths import RunDir

    return str(p).startswith("hf:") or p.suffix.lower() in (".pt", ".pth") or (p.is_dir() and RunDir(p).is_run())


def _run_and_images(run: Path | None, images: list[Path] | None, more: list[Path] | None) -> tuple[Path | None, list[Path]]:
    """RUN and the --images files. Several files after one --images (a shell glob) reach the command as
    the first for --images and the rest as positional arguments, where RUN is too: a positional that is
    a run folder or a checkpoint is RUN, the others are images; folders are searched for images."""
    positional = [p for p in (run, *(more or ())) if p is not None]
    if not images:
        if len(positional) > 1:
            raise typer.BadParameter(f"one RUN, got {len(positional)}: {', '.join(map(str, positional))} (images go "
                                     "after --images)", param_hint="RUN")
        return run, []
    runs = [p for p in positional if _is_run(p)]
    if len(runs) > 1:
        raise typer.BadParameter(f"one RUN, got {', '.join(map(str, runs))}", param_hint="RUN")
    from ..ship.predict import collect_images

    def skipped(item: Path, why: str) -> None:
        raise typer.BadParameter(f"{item}: {why}", param_hint="--images")

    files = collect_images([*images, *(p for p in positional if not _is_run(p))], skipped)
    return (runs[0] if runs else None), files


def _shown(run: Path | None, more: list[Path] | None, split: str, images: list[Path] | None, per_class: int,
           batch_size: int, cols: int | None, checkpoint: str, device: str, dpi: int, vector: list[str] | None) -> dict:
    """The options every `visualize` command shares, checked, as the keyword arguments of the
    `ufgir_cli.engine.analyze` writers."""
    formats = figure_formats(vector)
    run, images = _run_and_images(run, images, more)
    run = resolve_run(run)
    if images:
        from ..data.datasets import find_unreadable

        bad = find_unreadable([str(p) for p in images])
        if bad:
            raise typer.BadParameter("; ".join(f"{p} cannot be decoded ({why})" for p, why in bad)
                                     + "; give image files that open", param_hint="--images")
    return dict(run=run, split=split, images=images, per_class=per_class, count=batch_size, cols=cols,
                checkpoint=checkpoint, device=device, dpi=dpi, formats=formats)


def _check_cmap(value: str) -> str:
    import matplotlib

    if value not in matplotlib.colormaps:
        raise typer.BadParameter(f"{value!r} is not a matplotlib colour map (e.g. inferno, viridis, cividis, magma)",
                                 param_hint="--cmap")
    return value


def _printed(drawn) -> None:
    """Every file written, one per line on stdout (the grid's first); notes on stderr."""
    for path in drawn.files:
        console.print(str(path), soft_wrap=True, markup=False)
    for note in drawn.notes:
        err_console.print(f"note: {note}", soft_wrap=True, markup=False)


@app.command("rollout", cls=PlainCommand)
def rollout(
    run: RunArg = None, more: MoreArg = None,
    group: Annotated[str | None, typer.Option("--group", help="Blocks a-b (inclusive) inside one encoder group, e.g. 0-3 (default: every group).")] = None,
    discard: Annotated[float, typer.Option("--discard", min=0.0, max=0.99, help="Drop this fraction of the weakest attention entries per block.")] = 0.0,
    across: Annotated[bool, typer.Option("--across", help="One map through all blocks, carried over each down-sampling ILA.")] = False,
    split: SplitOpt = "test", images: ImagesOpt = None, per_class: PerClassOpt = 1, batch_size: ShowCountOpt = 8,
    cols: ColsOpt = None, fusion: FusionOpt = "mean", cmap: CmapOpt = "inferno", checkpoint: CheckpointOpt = "auto",
    device: DeviceOpt = "auto", dpi: DpiOpt = 200, vector: FormatOpt = None,
) -> None:
    """Attention rollout per encoder group (or --across the whole network) over the images; prints every file written."""
    if across and group is not None:
        raise typer.BadParameter("--group and --across exclude each other", param_hint="--group")
    from ..engine.analyze import write_rollout

    shown = _shown(run, more, split, images, per_class, batch_size, cols, checkpoint, device, dpi, vector)
    _printed(write_rollout(shown.pop("run"), group=group, across=across, fusion=fusion, discard=discard,
                           cmap=_check_cmap(cmap), **shown))


@app.command("attention", cls=PlainCommand)
def attention(
    run: RunArg = None, more: MoreArg = None,
    layer: Annotated[int | None, typer.Option("--layer", min=0, help="Block whose CLS attention is shown (default: the last).")] = None,
    split: SplitOpt = "test", images: ImagesOpt = None, per_class: PerClassOpt = 1, batch_size: ShowCountOpt = 8,
    cols: ColsOpt = None, fusion: FusionOpt = "mean", cmap: CmapOpt = "inferno", checkpoint: CheckpointOpt = "auto",
    device: DeviceOpt = "auto", dpi: DpiOpt = 200, vector: FormatOpt = None,
) -> None:
    """The head-fused CLS attention of one block over the images; prints every file written."""
    from ..engine.analyze import write_attention

    shown = _shown(run, more, split, images, per_class, batch_size, cols, checkpoint, device, dpi, vector)
    _printed(write_attention(shown.pop("run"), layer=layer, fusion=fusion, cmap=_check_cmap(cmap), **shown))


@app.command("crops", cls=PlainCommand)
def crops(
    run: RunArg = None, more: MoreArg = None,
    split: SplitOpt = "test", images: ImagesOpt = None, per_class: PerClassOpt = 1, batch_size: ShowCountOpt = 8,
    cols: ColsOpt = None, checkpoint: CheckpointOpt = "auto", device: DeviceOpt = "auto",
    dpi: DpiOpt = 200, vector: FormatOpt = None,
) -> None:
    """What a fine-grained method selects or crops over the images: GLSim's and RAMS's box and crop, CAL's boxes and crops, TransFG's and FFVT's patches; prints every file written.

    CAL: its evaluation boxes from the mean of its attention maps (tightest first: red, blue, yellow) and the crop
    of each; a box that covers the whole image is drawn dashed, inset, and labelled so."""
    from ..engine.analyze import write_crops

    shown = _shown(run, more, split, images, per_class, batch_size, cols, checkpoint, device, dpi, vector)
    _printed(write_crops(shown.pop("run"), **shown))


@app.command("tokens", cls=PlainCommand)
def tokens(
    run: RunArg = None, more: MoreArg = None,
    split: SplitOpt = "test", images: ImagesOpt = None, per_class: PerClassOpt = 1, batch_size: ShowCountOpt = 8,
    cols: ColsOpt = None, checkpoint: CheckpointOpt = "auto", device: DeviceOpt = "auto",
    dpi: DpiOpt = 200, vector: FormatOpt = None,
) -> None:
    """Which patches survive each token reduction (model.token_reduction), one panel per reduction after the image: EViT's dropped patches dimmed, ToMe's merged groups in colour; prints every file written."""
    from ..engine.analyze import write_tokens

    shown = _shown(run, more, split, images, per_class, batch_size, cols, checkpoint, device, dpi, vector)
    _printed(write_tokens(shown.pop("run"), **shown))
