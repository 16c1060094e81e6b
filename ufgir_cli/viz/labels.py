"""Where a scatter plot's labels go: beside their markers, on no other label, marker or error bar,
with a leader line where a label cannot touch its marker. Pure geometry in points (no matplotlib),
so the placement rule can be tested apart from drawing (`figures.draw_compare` uses it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LABEL_PT = 8.0
LABEL_MAX_GAP_PT = 12.0
LABEL_PAD_PT = 1.0
_GAPS_PT = (2.0, 4.0, 7.0, 10.0, LABEL_MAX_GAP_PT)


def _label_candidates(w: float, h: float, r: float) -> list[tuple[float, float, float]]:
    """Where a w x h label box (points) may go around a marker of radius ``r`` centred at the origin:
    (x0, y0 of the box's lower left corner, cost), beside the marker first, then above or below, then
    diagonal, nearest first; the box's nearest point is at most ``LABEL_MAX_GAP_PT`` from the marker's edge."""
    out = []
    for g in _GAPS_PT:
        d = r + g
        c = d / math.sqrt(2)
        sides = [(d, -h / 2 + s * h / 2, 0.0 + 0.25 * abs(s)) for s in (0, 1, -1, 2, -2)]          # right
        sides += [(-d - w, -h / 2 + s * h / 2, 0.4 + 0.25 * abs(s)) for s in (0, 1, -1, 2, -2)]    # left
        sides += [(-w / 2 + s * w / 4, d, 0.8 + 0.1 * abs(s)) for s in (0, 1, -1, 2, -2)]          # above
        sides += [(-w / 2 + s * w / 4, -d - h, 0.9 + 0.1 * abs(s)) for s in (0, 1, -1, 2, -2)]     # below
        sides += [(c, c, 0.6), (c, -c - h, 0.7), (-c - w, c, 0.8), (-c - w, -c - h, 0.9)]         # diagonal
        for x0, y0, pref in sides:
            nx, ny = min(max(0.0, x0), x0 + w), min(max(0.0, y0), y0 + h)
            gap = math.hypot(nx, ny) - r
            if 0.5 <= gap <= LABEL_MAX_GAP_PT + 1e-6:
                out.append((x0, y0, gap / 2 + pref))
    return sorted(out, key=lambda c: c[2])


def _overlap(a: tuple, b: tuple) -> float:
    """The overlapping area of boxes (x0, y0, x1, y1)."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _gap(box: tuple, centre: tuple[float, float], r: float) -> float:
    """Distance from box (x0, y0, x1, y1) to the edge of the circle of radius ``r`` at ``centre``."""
    nx, ny = min(max(centre[0], box[0]), box[2]), min(max(centre[1], box[1]), box[3])
    return math.hypot(nx - centre[0], ny - centre[1]) - r


def place_labels(centres: Sequence[tuple[float, float]], radii: Sequence[float], sizes: Sequence[tuple[float, float]],
                 area: tuple[float, float], bars: Sequence[tuple] = ()) -> list[tuple[float, float] | None]:
    """Label boxes beside their markers without overlap: per label the lower left corner of its box
    (points, in the axes' frame), or None where none fits.

    ``centres`` and ``radii``: the markers (points); ``sizes``: the label boxes (w, h); ``area``: the
    axes (w, h), which every box stays inside; ``bars``: error bars as boxes (x0, y0, x1, y1) that labels
    avoid where they can. Greedy, most crowded marker first; a label never overlaps another and sits
    within ``LABEL_MAX_GAP_PT`` of its marker's edge; covering another marker or an error bar costs."""
    n = len(centres)
    crowd = [sum(math.hypot(cx - ox, cy - oy) < 60 for ox, oy in centres) for cx, cy in centres]
    order = sorted(range(n), key=lambda i: (-crowd[i], centres[i][0], centres[i][1]))
    markers = [(cx - r, cy - r, cx + r, cy + r) for (cx, cy), r in zip(centres, radii, strict=True)]
    placed: list[tuple] = []
    out: list[tuple[float, float] | None] = [None] * n
    pad = LABEL_PAD_PT
    for i in order:
        (cx, cy), (w, h) = centres[i], sizes[i]
        best = None
        for dx, dy, cost in _label_candidates(w, h, radii[i]):
            box = (cx + dx, cy + dy, cx + dx + w, cy + dy + h)
            if box[0] < pad or box[1] < pad or box[2] > area[0] - pad or box[3] > area[1] - pad:
                continue
            padded = (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)
            if any(_overlap(padded, q) > 0 for q in placed):
                continue
            cost += sum(30.0 * min(1.0, _overlap(box, m) / 20) for k, m in enumerate(markers) if k != i)
            cost += sum(5.0 * min(1.0, _overlap(box, b) / 5) for b in bars)
            own = _gap(box, centres[i], radii[i])
            # nearer another marker than its own, a label reads as that one's
            cost += sum(8.0 for k in range(n) if k != i and _gap(box, centres[k], radii[k]) < own + 2.0)
            if best is None or cost < best[0]:
                best = (cost, box)
            if cost < 1.0:  # beside its marker, on nothing: no better place to look for
                break
        if best is not None:
            placed.append(best[1])
            out[i] = (best[1][0], best[1][1])
    return out
