"""The `ufgir compare` figure: top-1 against cost, a marker per run (its area the trainable
parameters, its colour the method family, its shape the backbone), labels placed clear of the
markers and of each other.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .labels import LABEL_PT, place_labels
from .style import (
    STYLE,
    axes_at,
    line_count,
    log_ticks,
    new_figure,
    styled,
    suptitle,
    wrap,
)

#: Marker colour per method family (the compare plot), from the colour-blind-safe tableau palette.
FAMILY_COLOURS = {"ILA": "#d62728", "PETL": "#1f77b4", "FGIR": "#2ca02c", "full fine-tuning": "#7f7f7f",
                  "other": "#9467bd"}

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
    title = wrap(title, width - 0.3, STYLE["figure.titlesize"])
    height = bottom + ah + 0.2 + 0.2 * line_count(title)
    fig = new_figure(width, height)
    suptitle(fig, title, 0.1)
    ax = axes_at(fig, left, bottom, aw, ah)
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
    log_ticks(ax.xaxis, *ax.get_xlim())
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


@styled
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
