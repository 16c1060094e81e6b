"""Figures for `ufgir metrics`, `ufgir visualize` and `ufgir compare` (matplotlib, Agg, PNG).

Every figure has a fixed size in pixels (the ``*_PX`` constants at ``DPI``) and is saved without
tight bounding boxes, so a figure's size depends only on what it shows (number of panels), never on
its text: tests and documentation can rely on it. Figures are drawn on a ``Figure`` with an Agg
canvas, never through pyplot, so nothing global (backend, current figure) changes and no display is
needed. Files are written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import atomic_open

DPI = 100
CKA_PX = (600, 500)          # per heatmap
FEATURES_PX = (1000, 750)
PANEL_PX = (300, 300)        # per overlay panel: the image plus room for a three-line title
IMAGE_PX = 240
COLORBAR_PX = 70             # once per overlay figure
_PANEL_FOOT_PX = 10
SCATTER_PX = (800, 550)


def _figure(width_px: int, height_px: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def save_cka(matrices: Sequence[Sequence[Sequence[float | None]]], titles: Sequence[str], path: Path) -> Path:
    """CKA heatmaps side by side (one per run) with a shared colour scale and bar; undefined entries blank."""
    from matplotlib.colors import Normalize

    mats = [np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float) for m in matrices]
    lo = min(0.0, *(float(np.nanmin(m)) for m in mats if np.isfinite(m).any()))
    norm = Normalize(vmin=lo, vmax=1.0)
    fig = _figure(CKA_PX[0] * len(mats), CKA_PX[1])
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    im = None
    for ax, m, title in zip(axes, mats, titles, strict=True):
        im = ax.imshow(np.ma.masked_invalid(m), origin="lower", cmap="magma", norm=norm)
        ticks = range(m.shape[0])
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("block")
        ax.set_ylabel("block")
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=list(axes), fraction=0.046 / len(mats), pad=0.03, label="attention CKA")
    return _save(fig, path)


def save_feature_metrics(results: Sequence[dict], labels: Sequence[str], path: Path) -> Path:
    """Per-block feature norm, pairwise distance, attention distance and normalised entropy; one line per run."""
    fig = _figure(*FEATURES_PX)
    axes = fig.subplots(2, 2).flatten()
    panels = (
        ("feature_norm", "L2 norm of 7x7-pooled tokens"),
        ("pairwise_distance", "mean pairwise L2 distance"),
        ("attention_distance_px_mean", "mean attention distance (px)"),
        ("attention_entropy_normalized_mean", "attention entropy / log S"),
    )
    for ax, (key, label) in zip(axes, panels, strict=True):
        for res, name in zip(results, labels, strict=True):
            blocks = range(len(res[key]))
            (line,) = ax.plot(blocks, res[key], marker="o", markersize=3, label=name)
            if key == "attention_distance_px_mean":  # heads as faint dots behind the mean
                for b, heads in zip(blocks, res["attention_distance_px"], strict=True):
                    ax.scatter([b] * len(heads), heads, s=6, color=line.get_color(), alpha=0.35, linewidths=0)
        ax.set_xlabel("block")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.96, bottom=0.08, hspace=0.3, wspace=0.25)
    return _save(fig, path)


@dataclass(frozen=True)
class Overlay:
    """One panel: an image (H, W, 3) uint8, a heat map (H, W) in [0, 1] and its title."""

    image: np.ndarray
    heat: np.ndarray
    title: str


def blend(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """50/50 blend of a uint8 (H, W, 3) image and the jet colouring of an (H, W) map in [0, 1] -> float RGB."""
    from matplotlib import colormaps

    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]                # (H, W, 3)
    return 0.5 * image.astype(np.float64) / 255.0 + 0.5 * colour


def overlay_columns(cols: int, per_image: int) -> int:
    """Panels per row: ``cols`` rounded down to a multiple of ``per_image`` (at least one image's worth),
    so that the panels of one image always share a row (fewer when there are fewer panels)."""
    return max(per_image, cols // per_image * per_image)


def save_overlays(panels: Sequence[Overlay], path: Path, cols: int, per_image: int = 1) -> Path:
    """A grid of overlay panels, ``per_image`` consecutive panels per image, and one jet colour bar.

    Every map is min-max normalised to [0, 1], so one colour bar serves all panels. Panels are placed
    at fixed pixel positions (``PANEL_PX`` each, the image ``IMAGE_PX`` square at the bottom, the title
    above it) with ``COLORBAR_PX`` on the right, so the PNG is exactly
    (columns * PANEL_PX[0] + COLORBAR_PX) x (rows * PANEL_PX[1]) pixels.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    ncol = min(overlay_columns(cols, per_image), len(panels))
    nrow = math.ceil(len(panels) / ncol)
    pw, ph = PANEL_PX
    W, H = pw * ncol + COLORBAR_PX, ph * nrow
    fig = _figure(W, H)
    for k, p in enumerate(panels):
        r, c = divmod(k, ncol)
        left, bottom = c * pw + (pw - IMAGE_PX) / 2, H - (r + 1) * ph + _PANEL_FOOT_PX
        ax = fig.add_axes((left / W, bottom / H, IMAGE_PX / W, IMAGE_PX / H))
        ax.imshow(blend(p.image, p.heat))
        ax.set_title(p.title, fontsize=7)
        ax.axis("off")
    cax = fig.add_axes(((pw * ncol + 12) / W, 0.1, 14 / W, 0.8))
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap="jet"), cax=cax).ax.tick_params(labelsize=7)
    return _save(fig, path)


def save_overlay_folder(images: np.ndarray, maps: Sequence[tuple[str, np.ndarray]], titles: Sequence[str],
                        names: Sequence[str], folder: Path, cols: int) -> Path:
    """What `ufgir visualize` writes: ``grid.png`` with every image's panels (one per map) and one
    ``NNN_<name>.png`` per image; per-image files of an earlier, larger call are removed, other files kept.

    ``images`` is (B, H, W, 3) uint8, each map (B, H, W) in [0, 1]; returns the grid's path.
    """
    folder = Path(folder)
    per_image = len(maps)
    panels, written = [], set()
    for b, (title, name) in enumerate(zip(titles, names, strict=True)):
        own = [Overlay(images[b], m[b], f"{title}\n{label}") for label, m in maps]
        written.add(save_overlays(own, folder / f"{b:03d}_{name}.png", cols=per_image, per_image=per_image).name)
        panels += own
    grid = save_overlays(panels, folder / "grid.png", cols=cols, per_image=per_image)
    for old in folder.glob("[0-9][0-9][0-9]_*.png"):
        if old.name not in written:
            old.unlink()
    return grid


def save_accuracy_vs_macs(points: Sequence[dict], path: Path, title: str) -> Path:
    """Top-1 against multiply-adds, marker area by trainable parameters (the paper's accuracy/cost figure).

    ``points``: dicts with ``label``, ``gmacs``, ``top1`` and ``trainable``.
    """
    fig = _figure(*SCATTER_PX)
    ax = fig.subplots()
    biggest = max(p["trainable"] for p in points) or 1
    for p in points:
        # area grows with the square root so an 86 M full fine-tune does not hide a 0.4 M adapter
        size = 30 + 900 * math.sqrt(p["trainable"] / biggest)
        ax.scatter(p["gmacs"], p["top1"], s=size, alpha=0.6, edgecolors="black", linewidths=0.5)
        ax.annotate(f"{p['label']}\n{_count(p['trainable'])} trainable", (p["gmacs"], p["top1"]),
                    fontsize=7, xytext=(6, 6), textcoords="offset points")
    ax.set_xlabel("multiply-adds per image (G)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.1)
    return _save(fig, path)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


__all__ = ["CKA_PX", "COLORBAR_PX", "DPI", "FEATURES_PX", "IMAGE_PX", "Overlay", "PANEL_PX", "SCATTER_PX", "blend", "overlay_columns",
           "save_accuracy_vs_macs", "save_cka", "save_feature_metrics", "save_overlay_folder", "save_overlays"]
