"""Figures as a reader sees them: fonts at the saved size, labelled axes and colour bars, marked encoder
groups, shape, and the files and formats written (matplotlib objects; no model, no training)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from ufgir_cli.viz import compare, figures, labels, style

GROUPS_ILA = [[0, 2], [2, 4], [4, 6]]          # DS-ILA after blocks 1 and 3 of a 6-block model
GROUPS_VIT = [[0, 6]]


def _texts(fig) -> list[Text]:
    """Every non-empty text that drawing the figure puts on the canvas (titles, labels, the tick labels
    inside the view, legends, annotations), in drawing order."""
    drawn, draw = [], Text.draw

    def record(self, renderer):
        if self.get_text().strip():
            drawn.append(self)
        return draw(self, renderer)

    Text.draw = record
    try:
        fig.canvas.draw()
    finally:
        Text.draw = draw
    return drawn


def _check_readable(fig) -> None:
    """No text under 8 pt at the saved size, nothing outside the figure, not wider than 3:1."""
    texts = _texts(fig)
    assert texts
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < style.MIN_FONT_PT]
    assert not small, small
    r = fig.canvas.get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    for t in texts:
        box = t.get_window_extent(r)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= W + 1 and box.y1 <= H + 1, t.get_text()
    w, h = fig.get_size_inches()
    assert w / h <= style.MAX_ASPECT


def _strings(fig) -> set[str]:
    return {t.get_text() for t in _texts(fig)}


def _colorbar_label(fig) -> str:
    return next(ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>")


def _cka(n: int) -> list[list[float | None]]:
    m = (0.5 + 0.5 * np.eye(n)).tolist()
    m[0][1] = None  # undefined entries are drawn blank
    return m


def test_cka_side_by_side_with_groups_marked():
    fig = figures.draw_cka([_cka(6), _cka(6)], ["ILA++", "Linear probe"], groups=[GROUPS_ILA, GROUPS_VIT],
                           title="Attention CKA between blocks · SoyAgeing · test")
    _check_readable(fig)
    heat = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in heat] == ["ILA++", "Linear probe"]
    assert all(ax.get_xlabel() == "block" and ax.get_ylabel() == "block" for ax in heat)
    assert _colorbar_label(fig) == "attention CKA (linear)"
    # the ILA's two down-sampling positions: a dashed line each way and a name above; none for the ViT
    assert [t.get_text() for t in heat[0].texts] == ["DS-ILA", "DS-ILA"]
    dashed = [line for line in heat[0].lines if line.get_linestyle() == "--"]
    assert sorted(float(line.get_xdata()[0]) for line in dashed if line.get_xdata()[0] == line.get_xdata()[1]) == [1.5, 3.5]
    assert sorted(float(line.get_ydata()[0]) for line in dashed if line.get_ydata()[0] == line.get_ydata()[1]) == [1.5, 3.5]
    assert not heat[1].texts
    assert "Attention CKA between blocks · SoyAgeing · test" in _strings(fig)


def test_features_log_axes_one_legend_heads_explained():
    rng = np.random.default_rng(0)
    feat = {"feature_norm": [7, 20, 60, 90, 150, 205], "pairwise_distance": [3, 8, 20, 40, 80, 120],
            "attention_distance_px": rng.uniform(5, 30, (6, 3)).tolist(), "attention_distance_px_mean": [10, 12, 15, 18, 20, 22],
            "attention_entropy_normalized_mean": [0.9, 0.8, 0.8, 0.7, 0.6, 0.5]}
    fig = figures.draw_features([feat, feat], ["ILA++", "Linear probe"], groups=[GROUPS_ILA, GROUPS_VIT], title="Features")
    _check_readable(fig)
    panels = fig.axes
    assert [ax.get_yscale() for ax in panels] == ["log", "log", "linear", "linear"]
    assert all(ax.get_xlabel() == "block" and ax.get_ylabel() for ax in panels)
    assert not any(ax.get_legend() for ax in panels) and len(fig.legends) == 1
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["ILA++", "Linear probe", "one head (attention distance), ILA++",
                      "one head (attention distance), Linear probe", "down-sampling ILA, ILA++"]
    # every entry is drawn in the colour of what it names (issue 37: the DS-ILA key was grey, its lines not)
    from matplotlib.colors import to_rgb

    keys = {h.get_label(): to_rgb(h.get_color()) for h in fig.legends[0].legend_handles}
    lines = [to_rgb(line.get_color()) for line in panels[0].get_lines() if line.get_linestyle() == "-"]
    dashed = {to_rgb(line.get_color()) for line in panels[0].get_lines() if line.get_linestyle() == "--"}
    assert keys["ILA++"] == keys["one head (attention distance), ILA++"] == lines[0]
    assert keys["Linear probe"] == lines[1] != lines[0]
    assert dashed == {keys["down-sampling ILA, ILA++"]}


def _overlay_inputs(count: int, per_image: int):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (count, 32, 32, 3), dtype=np.uint8)
    maps = [(f"blocks {2 * j}-{2 * j + 1}", rng.random((count, 32, 32))) for j in range(per_image)]
    captions = [("leaf_b", "leaf_a")] + [(f"leaf_{i}", f"leaf_{i}") for i in range(1, count)]
    return images, maps, captions


@pytest.mark.parametrize("count,per_image", [(1, 1), (1, 3), (8, 3), (8, 1), (20, 1), (200, 3)])
def test_overlay_grids_wrap_into_rows(count, per_image):
    images, maps, captions = _overlay_inputs(count, per_image)
    fig = figures.draw_overlays(images, maps, captions, title="Attention rollout · ILA++ · SoyAgeing ultra long name")
    _check_readable(fig)
    w, h = fig.get_size_inches()
    assert w / h <= style.MAX_ASPECT
    assert _colorbar_label(fig) == "attention (min-max per map)"
    if count > 1:
        assert w / h >= 0.9  # wrapped towards 16:9, neither a strip nor a tower


def test_overlay_captions_and_headers():
    images, maps, captions = _overlay_inputs(8, 3)
    fig = figures.draw_overlays(images, maps, captions, title="t", cols=6)  # two images per row
    assert figures.overlay_layout(8, 3, cols=6) == (2, 4)
    strings = _strings(fig)
    assert {"blocks 0-1", "blocks 2-3", "blocks 4-5", "true leaf_a", "pred leaf_b"} <= strings
    wrong = next(t for t in _texts(fig) if t.get_text() == "pred leaf_b")
    right = next(t for t in _texts(fig) if t.get_text() == "pred leaf_1")
    assert wrong.get_color() != right.get_color()
    headers = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert headers == ["blocks 0-1", "blocks 2-3", "blocks 4-5"] * 2  # over the top row only


def _points(paper: bool = True) -> list[dict]:
    pts = [{"label": "ILA++", "gmacs": 13.1, "top1": 75.0, "trainable": 507_062, "family": "ILA", "paper": False},
           {"label": "Linear probe", "gmacs": 17.6, "top1": 48.6, "trainable": 153_030, "family": "PETL", "paper": False},
           {"label": "Full fine-tuning", "gmacs": 78.5, "top1": 99.5, "trainable": 86_000_000,
            "family": "full fine-tuning", "paper": False}]
    if paper:
        pts.append({"label": "VPT-deep", "gmacs": 90.1, "top1": 60.8, "trainable": 1_074_630, "family": "PETL",
                    "paper": True})
    return pts


def test_compare_log_axis_families_sizes_labels_inside():
    fig = compare.draw_compare(_points(), title="Top-1 against cost · SoyAgeing · test")
    _check_readable(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "multiply-adds" in ax.get_xlabel() and "top-1" in ax.get_ylabel()
    family, sizes = ax.artists[0], ax.get_legend()
    assert [t.get_text() for t in family.get_texts()] == ["ILA", "PETL", "full fine-tuning", "ours", "paper (448 px)"]
    assert sizes.get_title().get_text() == "trainable params"
    steps = [t.get_text() for t in sizes.get_texts()]
    assert steps[0].endswith("k") and steps[-1].endswith("M") and len(steps) <= 4
    r = fig.canvas.get_renderer()
    box = ax.get_window_extent(r)
    for t in ax.texts:  # every point's label stays inside the axes, even at the right edge and the top
        tb = t.get_window_extent(r)
        assert box.x0 <= tb.x0 and tb.x1 <= box.x1 and box.y0 <= tb.y0 and tb.y1 <= box.y1, t.get_text()
    areas = {p["label"]: compare.marker_area(p["trainable"], 86_000_000) for p in _points()}
    assert areas["Linear probe"] < areas["ILA++"] < areas["Full fine-tuning"]


def test_a_box_covering_the_whole_image_is_drawn_inside_and_said():
    """CAL's box can be the whole image: on the image's border it would be invisible."""
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    rects = [[(0, 0, 32, 32, "#ff2a2a"), (4, 4, 10, 10, "#0072b2")], [(0, 0, 32, 32, "#ff2a2a")]]
    fig = figures.draw_selection([("image and boxes", images, rects)], [("a", "a"), ("b", "a")], title="t")
    _check_readable(fig)
    said = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert said == ["dashed: whole image", "box = whole image"]
    whole = [p for p in fig.axes[0].patches if p.get_linestyle() != "solid"]
    assert len(whole) == 1 and whole[0].get_x() > 0 and whole[0].get_width() < 32


# The paper's SoyAgeing row (Table 1 at the cost we count for ViT-B/16 at 448 px) and eight runs of ours near
# it, four the mean of several seeds: the crowded case of `compare --paper` (issue 37).
PAPER_SOY = [("Linear probe", 78.49, 48.61, 153030, "PETL"), ("VPT-shallow", 90.07, 49.12, 229830, "PETL"),
             ("VPT-deep", 90.07, 60.76, 1074630, "PETL"), ("ConvPass", 78.74, 60.18, 480582, "PETL"),
             ("Adapter", 78.73, 73.31, 466566, "PETL"), ("ILA+", 66.95, 68.79, 326886, "ILA"),
             ("ILA++", 67.06, 75.0, 507062, "ILA"), ("MPN-COV", 78.43, 40.43, 461318, "FGIR"),
             ("IFA", 78.49, 56.01, 154579, "FGIR"), ("TransFG", 130.13, 57.54, 7240902, "FGIR"),
             ("FFVT", 72.96, 69.93, 7242438, "FGIR"), ("GLSim", 157.0, 56.58, 7243206, "FGIR"),
             ("RAMS", 162.31, 50.73, 153798, "FGIR"), ("CAL", 627.39, 51.16, 4890688, "FGIR"),
             ("TrFG* (full fine-tuning)", 130.13, 72.16, 86402502, "FGIR")]
OURS_SOY = [("ILA++", 67.06, 74.1, 507062, "ILA", 1.2), ("Adapter", 78.73, 72.4, 466566, "PETL", 0.8),
            ("Linear probe", 78.49, 47.9, 153030, "PETL", 0.5), ("VPT-deep", 90.07, 61.9, 1074630, "PETL", 2.1),
            ("ILA+", 66.95, 69.6, 326886, "ILA", None), ("IFA", 78.49, 55.2, 154579, "FGIR", None),
            ("TransFG", 130.13, 58.8, 7240902, "FGIR", None), ("ConvPass", 78.74, 59.1, 480582, "PETL", 1.5)]


def _crowd(suffix: str = "") -> list[dict]:
    return ([{"label": lab + suffix, "gmacs": g, "top1": t, "trainable": n, "family": f, "paper": False, "std": sd}
             for lab, g, t, n, f, sd in OURS_SOY]
            + [{"label": lab + suffix, "gmacs": g, "top1": t, "trainable": n, "family": f, "paper": True}
               for lab, g, t, n, f in PAPER_SOY])


@pytest.mark.parametrize("suffix", ["", " · SoyAgeing"])
def test_compare_labels_never_overlap_and_sit_by_their_markers(suffix):
    """On the rendered figure (200 dpi, as saved): no two label boxes overlap, each is within 40 px of its
    marker's edge and off every marker's centre, inside the axes; error bars for the seeds' spread."""
    from matplotlib.text import Annotation

    points = _crowd(suffix)
    fig = compare.draw_compare(points, title="Top-1 against cost · SoyAgeing · test")
    _check_readable(fig)
    fig.set_dpi(200)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if isinstance(t, Annotation)]
    assert [t.get_text() for t in labels] == [p["label"] for p in points]
    boxes = [Text.get_window_extent(t, r) for t in labels]  # the text alone, not its leader line
    for i in range(len(boxes)):
        for j in range(i):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    biggest = max(p["trainable"] for p in points)
    frame = ax.get_window_extent(r)
    for t, box, p in zip(labels, boxes, points, strict=True):
        cx, cy = ax.transData.transform((p["gmacs"], p["top1"]))
        radius = 0.5 * np.sqrt(compare.marker_area(p["trainable"], biggest)) * 200 / 72
        nx, ny = min(max(cx, box.x0), box.x1), min(max(cy, box.y0), box.y1)
        gap = np.hypot(nx - cx, ny - cy) - radius
        assert -1 <= gap <= 40, (t.get_text(), gap)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t.get_text()
    # a label away from its marker has a leader line to it; one error bar per point with a std
    assert any(t.arrow_patch is not None for t in labels)
    assert len(ax.containers) == sum(1 for p in points if p.get("std"))
    family = [t.get_text() for t in ax.artists[0].get_texts()]
    assert family[-1] == "± std over seeds" and "ours" in family and "paper (448 px)" in family


def test_place_labels_keeps_apart_or_says_none():
    """The placer alone: three labels around three touching markers all fit; one that cannot fit in a tiny
    area is None, never on top of another."""
    spots = labels.place_labels([(50, 50), (58, 50), (54, 57)], [4, 4, 4], [(30, 10)] * 3, (200, 120))
    assert all(s is not None for s in spots)
    boxes = [(x, y, x + 30, y + 10) for x, y in spots]
    assert all(labels._overlap(a, b) == 0 for k, a in enumerate(boxes) for b in boxes[:k])
    assert labels.place_labels([(20, 10), (22, 10)], [4, 4], [(30, 10), (30, 10)], (44, 22)).count(None) >= 1


def test_save_png_at_dpi_and_vector_files(tmp_path):
    fig = compare.draw_compare(_points(paper=False), title="t")
    png = style.save(fig, tmp_path / "cmp.png", dpi=100, formats=("pdf", "svg"))
    assert png == tmp_path / "cmp.png"
    w, h = fig.get_size_inches()
    with Image.open(png) as im:
        assert im.size == (round(w * 100), round(h * 100))
    assert (tmp_path / "cmp.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in (tmp_path / "cmp.svg").read_bytes()
    # no time stamps: the same figure is the same file
    first = (tmp_path / "cmp.pdf").read_bytes(), (tmp_path / "cmp.svg").read_bytes()
    style.save(fig, tmp_path / "cmp.png", dpi=100, formats=("pdf", "svg"))
    assert ((tmp_path / "cmp.pdf").read_bytes(), (tmp_path / "cmp.svg").read_bytes()) == first
    style.save(fig, tmp_path / "hi.png")
    with Image.open(tmp_path / "hi.png") as im:
        assert im.size == (round(w * style.DPI), round(h * style.DPI))
    with pytest.raises(ValueError, match="not one of png, pdf, svg"):
        style.save(fig, tmp_path / "x.png", formats=("jpg",))


def test_overlay_folder_files_and_formats(tmp_path):
    images, maps, captions = _overlay_inputs(3, 2)
    names = ["a", "b", "c"]
    files = figures.save_overlay_folder(images, maps, captions, names, tmp_path, title="t", dpi=80, formats=("svg",))
    assert files[:2] == [tmp_path / "grid.png", tmp_path / "grid.svg"]  # every file written, the grid's first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files) == [
        "000_a.png", "000_a.svg", "001_b.png", "001_b.svg", "002_c.png", "002_c.svg", "grid.png", "grid.svg"]
    # a smaller PNG-only call removes the per-image files it does not write, and nothing of the user's
    (tmp_path / "notes.txt").write_text("mine")
    figures.save_overlay_folder(images[:1], [(k, m[:1]) for k, m in maps], captions[:1], names[:1], tmp_path, title="t",
                                dpi=80)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_a.png", "grid.png", "grid.svg", "notes.txt"]

