"""Figures for `ufgir metrics` and `ufgir visualize`: CKA heatmaps, feature statistics, and image
overlays (attention maps, crops, kept tokens), ready for a paper or a slide.

``draw_*`` return the figure (tests read it); :func:`~.style.save` writes it atomically. The style
and the inch-based layout they share are :mod:`.style`; the compare plot is :mod:`.compare`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .style import (
    DPI,
    FORMATS,
    MAX_ASPECT,
    MAX_TITLE_WIDTH_IN,
    MIN_FONT_PT,
    STYLE,
    axes_at,
    colorbar,
    fit,
    line_count,
    log_ticks,
    new_figure,
    save,
    styled,
    suptitle,
    title_width,
    wrap,
)

# --------------------------------------------------------------------------------------------
# metrics: CKA heatmaps and feature statistics


def ds_positions(groups: Sequence[Sequence[int]]) -> list[int]:
    """Blocks followed by a down-sampling ILA: the last block of every encoder group ``(a, b)`` (``b``
    exclusive) but the final one."""
    return [b - 1 for _, b in groups[:-1]]


@styled
def draw_cka(matrices: Sequence[Sequence[Sequence[float | None]]], titles: Sequence[str], *,
             groups: Sequence[Sequence[Sequence[int]]] | None = None, title: str = "") -> Figure:
    """Block-by-block attention CKA heatmaps side by side (one per run) on one colour scale and bar.

    ``groups``: each run's encoder groups ``(a, b)``, ``b`` exclusive; a down-sampling ILA is drawn as
    white lines between the groups it separates and named above the heatmap. Undefined entries are blank.
    """
    mats = [np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float) for m in matrices]
    lo = min(0.0, *(float(np.nanmin(m)) for m in mats if np.isfinite(m).any()))
    norm = Normalize(vmin=lo, vmax=1.0)
    side, gap, left, right, bottom = 3.0, 0.75, 0.65, 1.05, 0.6
    width = left + len(mats) * side + (len(mats) - 1) * gap + right
    # a title a little wider than one heatmap widens the figure (panels centred) rather than wrapping
    wider = min(title_width(title), MAX_TITLE_WIDTH_IN) - width
    if wider > 0:
        left, right, width = left + wider / 2, right + wider / 2, width + wider
    title = wrap(title, width - 0.3, STYLE["figure.titlesize"])
    top = 0.15 + 0.2 * line_count(title) + 0.55          # title lines, then the panel title and the DS marks
    fig = new_figure(width, bottom + side + top)
    suptitle(fig, title, 0.12)
    for k, (m, name) in enumerate(zip(mats, titles, strict=True)):
        ax = axes_at(fig, left + k * (side + gap), bottom, side, side)
        ax.imshow(np.ma.masked_invalid(m), origin="lower", cmap="magma", norm=norm)
        n = m.shape[0]
        ticks = range(0, n, 1 if n <= 16 else 2)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xlabel("block")
        ax.set_ylabel("block")
        ax.spines[["top", "right"]].set_visible(True)
        for b in ds_positions(groups[k]) if groups else ():
            for line in (ax.axvline, ax.axhline):
                line(b + 0.5, color="white", lw=1.2, ls="--")
            ax.text(b + 0.5, n - 0.5, "DS-ILA", transform=ax.transData, ha="center", va="bottom",
                    fontsize=MIN_FONT_PT, color="0.25")
        ax.set_title(fit(name, side, STYLE["axes.titlesize"]), pad=16)
    cax = axes_at(fig, width - right + 0.2, bottom, 0.14, side)
    colorbar(fig, cax, norm, "magma", "attention CKA (linear)")
    return fig


_FEATURE_PANELS = (
    # key, axis label, log axis: norms and distances span orders of magnitude over the blocks
    ("feature_norm", "feature norm (L2, 7x7-pooled tokens)", True),
    ("pairwise_distance", "mean pairwise token distance (L2)", True),
    ("attention_distance_px_mean", "mean attention distance (px)", False),
    ("attention_entropy_normalized_mean", "attention entropy / log S", False),
)


@styled
def draw_features(results: Sequence[dict], labels: Sequence[str], *,
                  groups: Sequence[Sequence[Sequence[int]]] | None = None, title: str = "") -> Figure:
    """Per-block feature norm, pairwise distance, attention distance (mean line, one faint dot per head)
    and normalised attention entropy; one colour per run, a down-sampling ILA as a dashed line in its
    run's colour, one legend for all panels."""
    pw, ph, left, hgap, vgap, bottom = 3.2, 2.3, 0.75, 0.85, 0.65, 0.55
    width = left + 2 * pw + hgap + 0.2
    title = wrap(title, width - 0.3, STYLE["figure.titlesize"])
    entries = 2 * len(labels) + sum(1 for g in groups or () if ds_positions(g))
    top = 0.15 + 0.2 * line_count(title) + 0.25 + 0.2 * math.ceil(entries / 3)                # title, legend rows
    fig = new_figure(width, bottom + 2 * ph + vgap + top)
    suptitle(fig, title, 0.12)
    colours = [f"C{i}" for i in range(len(results))]
    for k, (key, label, log) in enumerate(_FEATURE_PANELS):
        r, c = divmod(k, 2)
        ax = axes_at(fig, left + c * (pw + hgap), bottom + (1 - r) * (ph + vgap), pw, ph)
        for i, (res, colour) in enumerate(zip(results, colours, strict=True)):
            blocks = np.arange(len(res[key]))
            if key == "attention_distance_px_mean":
                for b, heads in zip(blocks, res["attention_distance_px"], strict=True):
                    ax.scatter([b] * len(heads), heads, s=8, color=colour, alpha=0.3, linewidths=0)
            ax.plot(blocks, res[key], marker="o", markersize=3.5, color=colour)
            for b in ds_positions(groups[i]) if groups else ():
                ax.axvline(b + 0.5, color=colour, lw=1, ls="--", alpha=0.7)
        if log:
            ax.set_yscale("log")
            log_ticks(ax.yaxis, *ax.get_ylim())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="major")
    # every legend entry in the colour of what it names: a run's line, its heads' dots, its DS-ILA lines
    handles = [Line2D([], [], color=c, marker="o", markersize=4, label=lab) for c, lab in zip(colours, labels, strict=True)]
    several = len(results) > 1
    handles += [Line2D([], [], color=c, marker="o", ls="", alpha=0.4, markersize=4,
                       label="one head (attention distance)" + (f", {lab}" if several else ""))
                for c, lab in zip(colours, labels, strict=True)]
    handles += [Line2D([], [], color=colours[i], ls="--", alpha=0.7, label="down-sampling ILA" + (f", {labels[i]}" if several else ""))
                for i in range(len(results)) if groups and ds_positions(groups[i])]
    H = fig.get_size_inches()[1]
    fig.legend(handles=handles, loc="upper center", ncols=3, frameon=False,
               bbox_to_anchor=(0.5, 1 - (0.2 + 0.2 * line_count(title)) / H))
    return fig


# --------------------------------------------------------------------------------------------
# visualize: attention over images


#: The colour map of attention over images: perceptually uniform and readable with any colour vision
#: (jet is neither); `ufgir visualize --cmap` picks another.
CMAP = "inferno"


def blend(image: np.ndarray, heat: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """50/50 blend of a uint8 (H, W, 3) image and the ``cmap`` colouring of an (H, W) map in [0, 1] -> float RGB."""
    colour = mpl.colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]                 # (H, W, 3)
    return 0.5 * image.astype(np.float64) / 255.0 + 0.5 * colour


_PANEL_IN = 1.5              # an overlay's side
_PANEL_GAP_IN = 0.06         # between the panels of one image
_IMAGE_GAP_IN = 0.3          # between images
_CAPTION_IN = 0.42           # two caption lines under each image, then a gap to the next row
_HEADER_IN = 0.22            # one line of map names over the top row
_MARGIN_IN = 0.15
_BAR_IN = 0.95               # the colour bar and its label on the right


def _overlay_size(images_per_row: int, rows: int, per_image: int, title_lines: int) -> tuple[float, float]:
    group = per_image * _PANEL_IN + (per_image - 1) * _PANEL_GAP_IN
    width = 2 * _MARGIN_IN + images_per_row * group + (images_per_row - 1) * _IMAGE_GAP_IN + _BAR_IN
    head = _HEADER_IN if per_image > 1 else 0.0
    height = 2 * _MARGIN_IN + 0.22 * title_lines + 0.1 + head + rows * (_PANEL_IN + _CAPTION_IN)
    return width, height


def overlay_layout(count: int, per_image: int, cols: int | None = None) -> tuple[int, int]:
    """(images per row, rows) of an overlay grid: ``cols`` panels per row (rounded down to whole images),
    or else the layout whose shape is nearest 16:9 without exceeding ``MAX_ASPECT``."""
    if cols is not None:
        k = min(count, max(1, cols // per_image))
        return k, math.ceil(count / k)

    def shape(k: int) -> float:
        w, h = _overlay_size(k, math.ceil(count / k), per_image, 1)
        return w / h

    fits = [k for k in range(1, count + 1) if shape(k) <= MAX_ASPECT] or [1]
    k = min(fits, key=lambda k: (abs(math.log(shape(k) / (16 / 9))), k))
    return k, math.ceil(count / k)


def _panel_grid(labels: Sequence[str], captions: Sequence[tuple[str, str | None]], draw, *, title: str,
                cols: int | None, colour_bar: bool) -> tuple[Figure, float, float, int]:
    """The grid both image figures share: per image its panels side by side (``draw(ax, image, panel)``
    fills one), captioned under them with the true class (or for your own file, its name) and the
    predicted class (red when it differs from the true one), panel
    names over the top row, room on the right for a colour bar if asked. Returns (figure, width,
    top of the first row, rows), in inches."""
    per_image, count = len(labels), len(captions)
    k, rows = overlay_layout(count, per_image, cols)
    group = per_image * _PANEL_IN + (per_image - 1) * _PANEL_GAP_IN
    bar = 0.0 if colour_bar else _BAR_IN - _MARGIN_IN
    width0, _ = _overlay_size(k, rows, per_image, 1)
    title = wrap(title, width0 - bar - 2 * _MARGIN_IN, STYLE["figure.titlesize"])
    width, height = _overlay_size(k, rows, per_image, line_count(title))
    width -= bar
    fig = new_figure(width, height)
    suptitle(fig, title, _MARGIN_IN)
    top = height - _MARGIN_IN - 0.22 * line_count(title) - 0.1 - (_HEADER_IN if per_image > 1 else 0.0)
    for i in range(count):
        r, c = divmod(i, k)
        x0 = _MARGIN_IN + c * (group + _IMAGE_GAP_IN)
        y0 = top - r * (_PANEL_IN + _CAPTION_IN) - _PANEL_IN
        for j, label in enumerate(labels):
            ax = axes_at(fig, x0 + j * (_PANEL_IN + _PANEL_GAP_IN), y0, _PANEL_IN, _PANEL_IN)
            draw(ax, i, j)
            ax.set_axis_off()
            if r == 0 and per_image > 1:  # one panel per image: the caller names it in the title
                ax.set_title(fit(label, _PANEL_IN + _PANEL_GAP_IN, 9), fontsize=9, pad=4)
        pred, true, *rest = captions[i]
        first = f"true {true}" if true is not None else rest[0] if rest and rest[0] else None  # the class, or your file
        cx = (x0 + group / 2) / width
        if first is not None:
            fig.text(cx, (y0 - 0.05) / height, fit(first, group, 9), ha="center", va="top", fontsize=9,
                     color="black" if true is not None else "0.3")
        fig.text(cx, (y0 - 0.05 - (0.17 if first is not None else 0.0)) / height, fit(f"pred {pred}", group, 9),
                 ha="center", va="top", fontsize=9, color="black" if true in (None, pred) else "#c00000")
    return fig, width, top, rows


@styled
def draw_overlays(images: np.ndarray, maps: Sequence[tuple[str, np.ndarray]], captions: Sequence[tuple[str, str | None]],
                  *, title: str = "", colorbar_label: str = "attention (min-max per map)",
                  cols: int | None = None, cmap: str = CMAP) -> Figure:
    """A grid of attention maps blended over images: every image's maps side by side, captioned under
    them with the true and predicted class (red when they differ), map names over the top row.

    ``images`` is (B, H, W, 3) uint8, each map (B, H, W) in [0, 1] (min-max normalised, so one colour bar
    serves all panels), ``captions`` (predicted, true or None[, your file's name]) per image. ``cols`` is
    panels per row (whole images only); by default the grid is as near 16:9 as it gets. ``cmap``: the
    colour map (default :data:`CMAP`, colour-blind safe).
    """
    fig, width, top, rows = _panel_grid(
        [label for label, _ in maps], captions, lambda ax, i, j: ax.imshow(blend(images[i], maps[j][1][i], cmap)),
        title=title, cols=cols, colour_bar=True)
    bar_h = min(2.2, rows * (_PANEL_IN + _CAPTION_IN) - _CAPTION_IN)
    cax = axes_at(fig, width - _BAR_IN + 0.12, top - bar_h, 0.13, bar_h)
    colorbar(fig, cax, Normalize(0.0, 1.0), cmap, colorbar_label, ticks=(0, 0.5, 1))
    return fig


@styled
def draw_selection(panels: Sequence[tuple[str, np.ndarray, Sequence[Sequence[tuple[int, int, int, int]]]]],
                   captions: Sequence[tuple[str, str | None]], *, title: str = "", cols: int | None = None) -> Figure:
    """What a fine-grained method selects, per image: its panels side by side (GLSim/RAMS: the image
    with the box, then the crop; TransFG/FFVT: the image with the selected patches outlined), captioned
    as :func:`draw_overlays` captions.

    ``panels``: (label, images (B, H, W, 3) uint8, per image its rectangles (top, left, height, width)
    in pixels, red, or (top, left, height, width, colour)); the grid is as near 16:9 as it gets. A box that
    covers the whole image is drawn dashed, inset, and labelled "box = whole image" (on the image's border it
    would not show)."""

    def draw(ax, i: int, j: int) -> None:
        _, imgs, rects = panels[j]
        ax.imshow(imgs[i])
        H, W = imgs[i].shape[:2]
        whole = 0
        for t, left, h, w, *colour in rects[i]:
            edge = colour[0] if colour else "#ff2a2a"
            if t <= 0 and left <= 0 and t + h >= H and left + w >= W:
                # the whole image: on its border the box would not show, so dashed and inset (nested when
                # several are), and said in words below
                inset = 0.025 * (1 + whole) * min(H, W)
                ax.add_patch(Rectangle((inset - 0.5, inset - 0.5), W - 2 * inset, H - 2 * inset, fill=False,
                                       edgecolor=edge, linewidth=1.5, linestyle=(0, (4, 2))))
                whole += 1
            else:
                ax.add_patch(Rectangle((left - 0.5, t - 0.5), w, h, fill=False, edgecolor=edge, linewidth=1.5))
        if whole:
            said = "box = whole image" if len(rects[i]) == 1 else \
                "boxes = whole image" if whole == len(rects[i]) else "dashed: whole image"
            ax.text(0.5, 0.06, said, transform=ax.transAxes, color="black", fontsize=MIN_FONT_PT, ha="center",
                    va="bottom", bbox={"facecolor": "white", "alpha": 0.8, "pad": 1.5, "linewidth": 0})

    return _panel_grid([label for label, _, _ in panels], captions, draw, title=title, cols=cols,
                       colour_bar=False)[0]


def save_overlay_folder(images: np.ndarray, maps: Sequence[tuple[str, np.ndarray]],
                        captions: Sequence[tuple[str, str | None]], names: Sequence[str], folder: Path, *,
                        title: str = "", colorbar_label: str = "attention (min-max per map)", cols: int | None = None,
                        dpi: int = DPI, formats: Sequence[str] = (), cmap: str = CMAP) -> list[Path]:
    """What `ufgir visualize` writes: ``grid.png`` with every image and one ``NNN_<name>.png`` per image
    (each also in ``formats``); per-image files of an earlier, larger call are removed, other files kept.

    Arguments as :func:`draw_overlays`, ``names`` per image; returns every file written, the grid's first
    (its PNG, then each of ``formats``), then the per-image figures'.
    """
    folder = Path(folder)
    per_image: list[Path] = []
    for b, name in enumerate(names):
        fig = draw_overlays(images[b : b + 1], [(label, m[b : b + 1]) for label, m in maps], captions[b : b + 1],
                            title=title, colorbar_label=colorbar_label, cmap=cmap)
        png = save(fig, folder / f"{b:03d}_{name}.png", dpi, formats)
        per_image += [png.with_suffix(f".{fmt}") for fmt in dict.fromkeys(("png", *formats))]
    fig = draw_overlays(images, maps, captions, title=title, colorbar_label=colorbar_label, cols=cols, cmap=cmap)
    grid = save(fig, folder / "grid.png", dpi, formats)
    kept = {p.name for p in per_image}
    for old in folder.glob("[0-9][0-9][0-9]_*.*"):
        if old.suffix[1:] in FORMATS and old.name not in kept:
            old.unlink()
    return [grid.with_suffix(f".{fmt}") for fmt in dict.fromkeys(("png", *formats))] + per_image
