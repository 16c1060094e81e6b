"""`ufgir visualize rollout|attention|crops`: attention (or what a method selects) drawn over images, written under
``<run>/analysis/visualize/<name>/`` (a grid and one figure per image; one image per class by default).

The maps come from ``ufgir_cli.analysis.report`` and the figures from ``ufgir_cli.viz``. Every command
takes the same options for which images, which model and how heads fuse: they are declared once, as the
parameters of :func:`_shown_options`, and arrive in each command's ``**shown``.
"""

from __future__ import annotations

import inspect
from functools import partial
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


def _shown_options(
    run: RunArg = None,
    split: SplitOpt = "test",
    images: Annotated[list[Path] | None, typer.Option(
        "--images", help="Image files to show instead of a split (repeatable).", show_default=False)] = None,
    per_class: Annotated[int, typer.Option("--per-class", min=1, help="Images of each class to show.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Show at most this many images (classes spread over the split's).")] = 8,
    cols: Annotated[int | None, typer.Option("--cols", min=1, help="Panels per row of the grid (default: a shape near 16:9).", show_default=False)] = None,
    fusion: Annotated[str, typer.Option("--fusion", callback=_check_fusion, help="Head fusion: mean, max or min.")] = "mean",
    checkpoint: CheckpointOpt = "auto",
    device: DeviceOpt = "auto",
    dpi: DpiOpt = 200,
    vector: FormatOpt = None,
) -> None:
    """The options every `visualize` command shares (its signature is what matters)."""


def _with_shown_options(command):
    """Make Typer see ``command``'s own options plus those of :func:`_shown_options` (the run argument
    first); the shared values reach ``command`` through its ``**shown``."""
    run, *shared = inspect.signature(_shown_options, eval_str=True).parameters.values()
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([run, *own, *shared])
    return command


def _draw(kind: str, what: str, make_maps, *, run: Path | None, split: str, images: list[Path] | None, per_class: int,
          batch_size: int, cols: int | None, checkpoint: str, device: str, dpi: int, vector: list[str] | None) -> None:
    """Compute the maps over the images, write ``<kind>_<split or "images">/``, print the grid's path."""
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
    from ..analysis.report import visualize
    from ..paths import run_dir_of
    from ..viz.figures import save_overlay_folder

    shown = visualize(run, make_maps, split=split, images=images, count=batch_size, per_class=per_class,
                      checkpoint=checkpoint, device=device)
    folder = run_dir_of(run) / "analysis" / "visualize" / f"{kind}_{'images' if images else split}"
    if len(shown.maps) == 1:  # one map per image: its blocks go in the title rather than over every panel
        what = f"{what}, {shown.maps[0][0]}"
    grid = save_overlay_folder(shown.images, shown.maps, shown.captions, shown.stems, folder,
                               title=f"{what} · {shown.title}", cols=cols, dpi=dpi, formats=formats)
    console.print(str(grid), soft_wrap=True, markup=False)


@app.command("rollout", cls=PlainCommand)
@_with_shown_options
def rollout(
    group: Annotated[str | None, typer.Option("--group", help="Blocks a-b (inclusive) inside one encoder group, e.g. 0-3 (default: every group).")] = None,
    discard: Annotated[float, typer.Option("--discard", min=0.0, max=0.99, help="Drop this fraction of the weakest attention entries per block.")] = 0.0,
    across: Annotated[bool, typer.Option("--across", help="One map through all blocks, carried over each down-sampling ILA.")] = False,
    **shown,
) -> None:
    """Attention rollout per encoder group (or --across the whole network) over the images; prints the grid path."""
    if across and group is not None:
        raise typer.BadParameter("--group and --across exclude each other", param_hint="--group")
    from ..analysis.report import rollout_maps

    fusion = shown.pop("fusion")
    kind = f"rollout_{'across' if across else (group or 'groups')}_{fusion}" + (f"_discard{discard:g}" if discard else "")
    what = "Attention rollout" + (" across down-sampling ILAs" if across else "") + (f", {fusion} of heads" if fusion != "mean" else "")
    _draw(kind, what, partial(rollout_maps, group=group, across=across, fusion=fusion, discard=discard), **shown)


@app.command("attention", cls=PlainCommand)
@_with_shown_options
def attention(
    layer: Annotated[int | None, typer.Option("--layer", min=0, help="Block whose CLS attention is shown (default: the last).")] = None,
    **shown,
) -> None:
    """The head-fused CLS attention of one block over the images; prints the grid path."""
    from ..analysis.report import block_attention

    fusion = shown.pop("fusion")
    kind = f"attention_{'last' if layer is None else f'l{layer}'}_{fusion}"
    what = "CLS attention" + (f", {fusion} of heads" if fusion != "mean" else "")
    _draw(kind, what, partial(block_attention, layer=layer, fusion=fusion), **shown)


@app.command("crops", cls=PlainCommand)
@_with_shown_options
def crops(**shown) -> None:
    """What GLSim and RAMS crop (the box and the crop beside the image) or which patches TransFG and FFVT
    select, over the images; prints the grid path."""
    from ..analysis.report import selections
    from ..paths import run_dir_of
    from ..viz.figures import draw_selection, save

    shown.pop("fusion")
    formats = figure_formats(shown.pop("vector"))
    run, cols, dpi = resolve_run(shown.pop("run")), shown.pop("cols"), shown.pop("dpi")
    split, images = shown.pop("split"), shown.pop("images")
    sel = selections(run, split=split, images=images, count=shown.pop("batch_size"), **shown)
    folder = run_dir_of(run) / "analysis" / "visualize" / f"crops_{'images' if images else split}"
    fig = draw_selection(sel.panels, sel.captions, title=f"{sel.what} · {sel.title}", cols=cols)
    console.print(str(save(fig, folder / "grid.png", dpi, formats)), soft_wrap=True, markup=False)
