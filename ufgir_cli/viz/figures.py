"""Figures for `ufgir metrics`, `ufgir visualize` and `ufgir compare`, ready for a paper or a slide.

Sizes are in inches and fonts in points at the saved size (no text under ``MIN_FONT_PT``), so a figure
looks the same at any ``dpi``: only its pixel count changes. Panels are placed at fixed positions in
inches rather than by tight bounding boxes, so a figure's size depends on what it shows (how many
panels, how many title lines), never on the renderer. PNG is always written; PDF (TrueType fonts, which
publishers ask for) and SVG on request, without time stamps so that equal figures are equal files.

Figures are drawn on a ``Figure`` with an Agg canvas, never through pyplot, so nothing global
(backend, current figure) changes and no display is needed; ``draw_*`` return the figure (tests read
it), :func:`save` writes it atomically. One module (about 580 lines) because every figure
shares the style, the inch-based layout helpers and :func:`save`; splitting it would scatter those.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..io import atomic_open
from .labels import LABEL_PT, place_labels

DPI = 200
FORMATS = ("png", "pdf", "svg")
MIN_FONT_PT = 8.0
MAX_ASPECT = 3.0             # width / height of any figure

STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "legend.title_fontsize": 8, "figure.titlesize": 11,
    "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42,      # TrueType in PDFs: Type 3 fonts are refused by many publishers
    "svg.hashsalt": "ufgir",  # stable element ids, so equal SVGs are equal files
}
_METADATA = {"png": None, "pdf": {"CreationDate": None}, "svg": {"Date": None}}
_CHAR_EM = 0.55              # mean glyph width of the default sans-serif, in ems: for wrapping text

#: Marker colour per method family (the compare plot), from the colour-blind-safe tableau palette.
FAMILY_COLOURS = {"ILA": "#d62728", "PETL": "#1f77b4", "FGIR": "#2ca02c", "full fine-tuning": "#7f7f7f",
                  "other": "#9467bd"}


# --------------------------------------------------------------------------------------------
# common


def _figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def _axes(fig: Figure, left: float, bottom: float, width: float, height: float):
    """Axes at a position given in inches from the figure's lower left corner."""
    W, H = fig.get_size_inches()
    return fig.add_axes((left / W, bottom / H, width / W, height / H))


def _wrap(text: str, width_in: float, size_pt: float) -> str:
    """``text`` broken into lines that fit ``width_in`` at ``size_pt``: between its " · " parts where it
    can, the later parts kept together (a title's "what · run · split" breaks as "what" / "run · split"),
    else between words."""
    chars = max(12, int(width_in * 72 / (_CHAR_EM * size_pt)))
    out = []
    for line in text.split("\n"):
        lines: list[str] = []
        current = ""
        for part in reversed(line.split(" · ")):  # packed from the end
            if current and len(current) + 3 + len(part) <= chars:
                current = part + " · " + current
                continue
            if current:
                lines.insert(0, current)
            current = part
            if len(part) > chars:  # a part longer than a line: between its words
                lines[:0] = textwrap.wrap(part, chars, break_on_hyphens=False)
                current = ""
        if current or not lines:
            lines.insert(0, current)
        out += lines
    return "\n".join(out)


def _fit(text: str, width_in: float, size_pt: float) -> str:
    """``text`` cut with an ellipsis to fit one line of ``width_in``."""
    chars = max(4, int(width_in * 72 / (_CHAR_EM * size_pt)))
    return text if len(text) <= chars else text[: chars - 1] + "…"


#: A title is written on one line up to this width, widening a narrow figure for it.
MAX_TITLE_WIDTH_IN = 6.5
_BOLD_EM = 0.6               # mean glyph width of the bold title font, in ems


def _title_width(text: str) -> float:
    """Inches a one-line figure title needs (with the margins `_wrap` keeps)."""
    return len(text) * _BOLD_EM * STYLE["figure.titlesize"] / 72 + 0.3


def _lines(text: str) -> int:
    return text.count("\n") + 1 if text else 0


def ds_positions(groups: Sequence[Sequence[int]]) -> list[int]:
    """Blocks followed by a down-sampling ILA: the last block of every encoder group ``(a, b)`` (``b``
    exclusive) but the final one."""
    return [b - 1 for _, b in groups[:-1]]


def save(fig: Figure, path: Path, dpi: int = DPI, formats: Sequence[str] = ()) -> Path:
    """Write ``fig`` as PNG at ``dpi`` and, beside it with the same stem, in each of ``formats``
    (``"pdf"``, ``"svg"``); returns the PNG's path."""
    png = Path(path).with_suffix(".png")
    with mpl.rc_context(STYLE):
        for fmt in dict.fromkeys(("png", *formats)):
            if fmt not in FORMATS:
                raise ValueError(f"figure format {fmt!r} is not one of {', '.join(FORMATS)}")
            with atomic_open(png.with_suffix(f".{fmt}"), "wb") as f:
                fig.savefig(f, format=fmt, dpi=dpi, metadata=_METADATA[fmt])
    return png


def _styled(draw):
    """Run a ``draw_*`` function under :data:`STYLE` (fonts are fixed when an artist is made)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def _colorbar(fig: Figure, cax, norm: Normalize, cmap: str, label: str, **kw) -> None:
    """A colour bar in ``cax``, named like the ones matplotlib places itself (tests find it so)."""
    cax.set_label("<colorbar>")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, label=label, **kw)


def _suptitle(fig: Figure, text: str, top_in: float) -> None:
    fig.text(0.5, 1 - top_in / fig.get_size_inches()[1], text, ha="center", va="top",
             fontsize=STYLE["figure.titlesize"], fontweight="bold")


# --------------------------------------------------------------------------------------------
# metrics: CKA heatmaps and feature statistics


@_styled
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
    wider = min(_title_width(title), MAX_TITLE_WIDTH_IN) - width
    if wider > 0:
        left, right, width = left + wider / 2, right + wider / 2, width + wider
    title = _wrap(title, width - 0.3, STYLE["figure.titlesize"])
    top = 0.15 + 0.2 * _lines(title) + 0.55          # title lines, then the panel title and the DS marks
    fig = _figure(width, bottom + side + top)
    _suptitle(fig, title, 0.12)
    for k, (m, name) in enumerate(zip(mats, titles, strict=True)):
        ax = _axes(fig, left + k * (side + gap), bottom, side, side)
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
        ax.set_title(_fit(name, side, STYLE["axes.titlesize"]), pad=16)
    cax = _axes(fig, width - right + 0.2, bottom, 0.14, side)
    _colorbar(fig, cax, norm, "magma", "attention CKA (linear)")
    return fig


_FEATURE_PANELS = (
    # key, axis label, log axis: norms and distances span orders of magnitude over the blocks
    ("feature_norm", "feature norm (L2, 7x7-pooled tokens)", True),
    ("pairwise_distance", "mean pairwise token distance (L2)", True),
    ("attention_distance_px_mean", "mean attention distance (px)", False),
    ("attention_entropy_normalized_mean", "attention entropy / log S", False),
)


@_styled
def draw_features(results: Sequence[dict], labels: Sequence[str], *,
                  groups: Sequence[Sequence[Sequence[int]]] | None = None, title: str = "") -> Figure:
    """Per-block feature norm, pairwise distance, attention distance (mean line, one faint dot per head)
    and normalised attention entropy; one colour per run, a down-sampling ILA as a dashed line in its
    run's colour, one legend for all panels."""
    pw, ph, left, hgap, vgap, bottom = 3.2, 2.3, 0.75, 0.85, 0.65, 0.55
    width = left + 2 * pw + hgap + 0.2
    title = _wrap(title, width - 0.3, STYLE["figure.titlesize"])
    entries = 2 * len(labels) + sum(1 for g in groups or () if ds_positions(g))
    top = 0.15 + 0.2 * _lines(title) + 0.25 + 0.2 * math.ceil(entries / 3)                # title, legend rows
    fig = _figure(width, bottom + 2 * ph + vgap + top)
    _suptitle(fig, title, 0.12)
    colours = [f"C{i}" for i in range(len(results))]
    for k, (key, label, log) in enumerate(_FEATURE_PANELS):
        r, c = divmod(k, 2)
        ax = _axes(fig, left + c * (pw + hgap), bottom + (1 - r) * (ph + vgap), pw, ph)
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
            _log_ticks(ax.yaxis, *ax.get_ylim())
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
               bbox_to_anchor=(0.5, 1 - (0.2 + 0.2 * _lines(title)) / H))
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
    title = _wrap(title, width0 - bar - 2 * _MARGIN_IN, STYLE["figure.titlesize"])
    width, height = _overlay_size(k, rows, per_image, _lines(title))
    width -= bar
    fig = _figure(width, height)
    _suptitle(fig, title, _MARGIN_IN)
    top = height - _MARGIN_IN - 0.22 * _lines(title) - 0.1 - (_HEADER_IN if per_image > 1 else 0.0)
    for i in range(count):
        r, c = divmod(i, k)
        x0 = _MARGIN_IN + c * (group + _IMAGE_GAP_IN)
        y0 = top - r * (_PANEL_IN + _CAPTION_IN) - _PANEL_IN
        for j, label in enumerate(labels):
            ax = _axes(fig, x0 + j * (_PANEL_IN + _PANEL_GAP_IN), y0, _PANEL_IN, _PANEL_IN)
            draw(ax, i, j)
            ax.set_axis_off()
            if r == 0 and per_image > 1:  # one panel per image: the caller names it in the title
                ax.set_title(_fit(label, _PANEL_IN + _PANEL_GAP_IN, 9), fontsize=9, pad=4)
        pred, true, *rest = captions[i]
        first = f"true {true}" if true is not None else rest[0] if rest and rest[0] else None  # the class, or your file
        cx = (x0 + group / 2) / width
        if first is not None:
            fig.text(cx, (y0 - 0.05) / height, _fit(first, group, 9), ha="center", va="top", fontsize=9,
                     color="black" if true is not None else "0.3")
        fig.text(cx, (y0 - 0.05 - (0.17 if first is not None else 0.0)) / height, _fit(f"pred {pred}", group, 9),
                 ha="center", va="top", fontsize=9, color="black" if true in (None, pred) else "#c00000")
    return fig, width, top, rows


@_styled
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
    cax = _axes(fig, width - _BAR_IN + 0.12, top - bar_h, 0.13, bar_h)
    _colorbar(fig, cax, Normalize(0.0, 1.0), cmap, colorbar_label, ticks=(0, 0.5, 1))
    return fig


@_styled
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


# --------------------------------------------------------------------------------------------
# compare: accuracy against cost


def marker_area(trainable: float, biggest: float) -> float:
    """Marker area in pt^2 for a number of trainable parameters, against the largest in the figure: grows
    with the square root, so that an 86 M full fine-tune and a 26 k linear probe both stay readable (the
    size legend gives the scale)."""
    return 30.0 + 600.0 * math.sqrt(trainable / biggest)


def _count(n: float) -> str:
    return f"{n / 1e6:g} M" if n >= 1e6 else f"{n / 1e3:g} k"


def _size_steps(values: Sequence[float]) -> list[float]:
    """Round parameter counts (1, 3, 10, 30, ... k) from about the smallest to the largest of ``values``,
    at most four, the largest kept."""
    lo, hi = min(values), max(values)
    steps = [m * 10.0**e for e in range(2, 10) for m in (1, 3)]
    inside = [s for s in steps if lo / 3 < s <= hi] or [min(steps, key=lambda s: abs(math.log(s / hi)))]
    return inside[::-1][:: max(1, math.ceil(len(inside) / 4))][::-1]


def _log_ticks(axis, lo: float, hi: float) -> None:
    """Plain numbers on a log axis: every minor tick labelled within a decade, the 2s and 5s within two,
    only the powers of ten beyond."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    digits = "123456789" if hi / lo < 10 else "25" if hi / lo < 100 else ""
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in digits else ""))


#: Labels in the compare plot: their font size, how far from its marker's edge a label may sit (points),
#: and the space kept around each label box.
_COMPARE_SCALES = (1.0, 1.2, 1.45, 1.75, 2.1)     # the axes grow until every label finds a place


#: Marker shapes of the compare plot's backbones, in the order they first appear (one backbone: circles).
BACKBONE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "p")


def backbone_markers(points: Sequence[dict]) -> dict[str, str]:
    """Backbone -> marker shape where the points name more than one backbone, else empty (all circles)."""
    names = list(dict.fromkeys(p["backbone"] for p in points if p.get("backbone")))
    return dict(zip(names, BACKBONE_MARKERS * (len(names) // len(BACKBONE_MARKERS) + 1), strict=False)) \
        if len(names) > 1 else {}


def _compare_axes(points: Sequence[dict], title: str, scale: float):
    """The compare figure without its point labels, its axes ``scale`` times the usual size."""
    aw, ah, left, bottom, right = 4.6 * scale, 3.4 * scale, 0.7, 0.6, 1.9
    width = left + aw + right
    title = _wrap(title, width - 0.3, STYLE["figure.titlesize"])
    height = bottom + ah + 0.2 + 0.2 * _lines(title)
    fig = _figure(width, height)
    _suptitle(fig, title, 0.1)
    ax = _axes(fig, left, bottom, aw, ah)
    biggest = max(p["trainable"] for p in points) or 1
    shapes = backbone_markers(points)
    for p in points:
        colour = FAMILY_COLOURS[p["family"]]
        if p.get("std"):  # mean ± sample std over seeds
            ax.errorbar(p["gmacs"], p["top1"], yerr=p["std"], fmt="none", ecolor=colour, elinewidth=1.2, capsize=3,
                        capthick=1.2, zorder=2)
        ax.scatter(p["gmacs"], p["top1"], s=marker_area(p["trainable"], biggest), zorder=3, linewidths=1.2,
                   marker=shapes.get(p.get("backbone"), "o"),
                   facecolors="none" if p["paper"] else colour, edgecolors=colour, alpha=1.0 if p["paper"] else 0.75)
    ax.set_xscale("log")
    gmacs = np.array([p["gmacs"] for p in points])
    lo = np.array([p["top1"] - (p.get("std") or 0) for p in points])
    hi = np.array([p["top1"] + (p.get("std") or 0) for p in points])
    xpad = max(1.25, (gmacs.max() / gmacs.min()) ** 0.12)
    ax.set_xlim(gmacs.min() / xpad, gmacs.max() * xpad)
    ypad = max(2.0, 0.12 * (hi.max() - lo.min()))
    ax.set_ylim(max(0.0, lo.min() - ypad), min(102.0, hi.max() + ypad))
    _log_ticks(ax.xaxis, *ax.get_xlim())
    ax.set_xlabel("multiply-adds per image (G, log scale; the paper's \"GFLOPs\")")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    families = list(dict.fromkeys(p["family"] for p in points))
    fam = [Line2D([], [], ls="", marker="o", markersize=7, color=FAMILY_COLOURS[f], label=f) for f in families]
    if any(p["paper"] for p in points):
        fam += [Line2D([], [], ls="", marker="o", markersize=7, color="0.4", label="ours")] * any(not p["paper"] for p in points)
        cites = list(dict.fromkeys(p.get("cite") or "paper" for p in points if p["paper"]))
        fam += [Line2D([], [], ls="", marker="o", markersize=7, mfc="none", color="0.4",
                       label=f"{c} (448 px)" if len(c) < 8 else f"{c}\n(448 px)") for c in cites]
    if any(p.get("std") for p in points):
        fam.append(Line2D([], [], ls="", marker="|", markersize=10, markeredgewidth=1.2, color="0.4",
                          label="± std over seeds"))
    fam += [Line2D([], [], ls="", marker=m, markersize=7, color="0.4", label=b.split(".")[0]) for b, m in shapes.items()]
    first = ax.legend(handles=fam, title="method family" + (" · backbone" if shapes else ""), loc="upper left",
                      bbox_to_anchor=(1.03, 1.0),
                      frameon=False, alignment="left")
    ax.add_artist(first)
    sizes = [Line2D([], [], ls="", marker="o", color="0.6", markersize=math.sqrt(marker_area(s, biggest)),
                    label=_count(s))
             for s in _size_steps([p["trainable"] for p in points])]
    ax.legend(handles=sizes, title="trainable params", loc="lower left", bbox_to_anchor=(1.03, 0.0),
              frameon=False, labelspacing=1.5, borderpad=1.0, handletextpad=1.5, alignment="left")
    return fig, ax, biggest


def _in_points(ax, x: float, y: float) -> tuple[float, float]:
    """Data coordinates -> points from the axes' lower left corner."""
    px, py = ax.transData.transform((x, y))
    return (px - ax.bbox.x0) * 72.0 / ax.figure.dpi, (py - ax.bbox.y0) * 72.0 / ax.figure.dpi


@_styled
def draw_compare(points: Sequence[dict], *, title: str = "") -> Figure:
    """Top-1 against multiply-adds per image on a log axis, the paper's accuracy-vs-cost style: marker
    area by trainable parameters (with a size legend), colour by method family, hollow markers for the
    paper's numbers, error bars of ± one sample std where a point is the mean of several seeds.

    ``points``: dicts with ``label``, ``gmacs``, ``top1``, ``trainable``, ``family`` (a key of
    ``FAMILY_COLOURS``), ``paper`` (True for the paper's numbers) and optionally ``std``, ``backbone``
    (where points name several, each backbone has its marker shape, `backbone_markers`) and, for a paper's
    number, ``cite`` (its source, short: one hollow-marker legend entry per source).

    Every label sits beside its marker (its box within ``LABEL_MAX_GAP_PT`` of the marker's edge, with a
    thin leader line when it does not touch it), never on another label (:func:`place_labels`); where the
    labels do not fit, the axes grow until they do. The axes' annotations are the labels, in the order
    of ``points``.
    """
    for scale in _COMPARE_SCALES:
        fig, ax, biggest = _compare_axes(points, title, scale)
        r = fig.canvas.get_renderer()
        to_pt = 72.0 / fig.dpi
        at = functools.partial(_in_points, ax)
        centres = [at(p["gmacs"], p["top1"]) for p in points]
        radii = [0.5 * math.sqrt(marker_area(p["trainable"], biggest)) for p in points]
        sizes = []
        for p in points:  # measured on the canvas, then removed: the labels are made once placed
            t = ax.text(0, 0, p["label"], fontsize=LABEL_PT)
            box = t.get_window_extent(r)
            sizes.append((box.width * to_pt, box.height * to_pt))
            t.remove()
        bars = [(c[0] - 3.0, at(p["gmacs"], p["top1"] - p["std"])[1], c[0] + 3.0, at(p["gmacs"], p["top1"] + p["std"])[1])
                for p, c in zip(points, centres, strict=True) if p.get("std")]
        spots = place_labels(centres, radii, sizes, (ax.bbox.width * to_pt, ax.bbox.height * to_pt), bars)
        if all(s is not None for s in spots):
            break
    for p, spot, (cx, cy), radius, (w, h) in zip(points, spots, centres, radii, sizes, strict=True):
        if spot is None:  # no room even on the largest axes: right of its marker, where it may overlap
            spot = (cx + radius + 2.0, cy - h / 2)
        nx, ny = min(max(cx, spot[0]), spot[0] + w), min(max(cy, spot[1]), spot[1] + h)   # its point nearest the marker
        leader = math.hypot(nx - cx, ny - cy) - radius > 3.0                              # not touching its marker
        arrow = {"arrowstyle": "-", "lw": 0.6, "color": "0.45", "shrinkA": 0.0, "shrinkB": radius,
                 "relpos": ((nx - spot[0]) / w, (ny - spot[1]) / h)} if leader else None
        ax.annotate(p["label"], (p["gmacs"], p["top1"]), xytext=(spot[0] - cx, spot[1] - cy), textcoords="offset points",
                    ha="left", va="bottom", fontsize=LABEL_PT, color="0.35" if p["paper"] else "black", zorder=4,
                    arrowprops=arrow)
    return fig


__all__ = ["BACKBONE_MARKERS", "CMAP", "DPI", "FAMILY_COLOURS", "FORMATS", "MAX_ASPECT", "MIN_FONT_PT", "STYLE", "blend",
           "backbone_markers", "draw_cka", "draw_compare", "draw_features", "draw_overlays", "draw_selection", "ds_positions", "marker_area",
           "overlay_layout", "place_labels", "save", "save_overlay_folder"]
