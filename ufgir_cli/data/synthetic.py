"""A synthetic ultra-fine-grained dataset that needs no download: "leaves" whose classes differ only
in the layout of a few small marks.

Every image draws an upright leaf (as leaf scans are) with random tilt, size, aspect, position, leaf
colour, mark colour, vein angle and background: none of these carries the class. The class is a *layout code*: which
cells of a 4x4 lattice in the leaf's own coordinates carry a small mark. Demo classes differ from
each other in two marks, so telling them apart takes local detail, as with cultivars of soybean.

The same renderer makes the pretraining set of our small backbone (`ufgir pretrain-backbone`),
whose targets are the 16 per-cell mark attributes of uniformly random codes (all mark colours),
so its features cover the demo's cues without having seen the demo's classes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .catalog import DEMO_CLASSES, DEMO_TEST, DEMO_TRAIN_VAL
from .folder import read_info, write_dataset_folder

LATTICE = 4
CELLS = LATTICE * LATTICE
SYNTHETIC_VERSION = 2
DEMO_SIZE = 96
DEMO_SEED = 20240917


def mirror_code(code: int) -> int:
    """The layout seen in a horizontally flipped image: lattice rows reversed across the midrib."""
    out = 0
    for k in range(CELLS):
        if code >> k & 1:
            row, col = divmod(k, LATTICE)
            out |= 1 << ((LATTICE - 1 - row) * LATTICE + col)
    return out


def demo_codes(num_classes: int = DEMO_CLASSES, marks: int = 5, seed: int = 7) -> list[int]:
    """Class codes: ``marks`` of 16 cells set; every two classes differ in at least 2 cells, also
    after a horizontal flip (training flips images, so a code and its mirror are one class)."""
    rng = np.random.default_rng(seed)
    codes: list[int] = []
    while len(codes) < num_classes:
        cells = rng.choice(CELLS, size=marks, replace=False)
        code = int(sum(1 << int(c) for c in cells))
        if all(min(bin(code ^ c).count("1"), bin(mirror_code(code) ^ c).count("1")) >= 2 for c in codes):
            codes.append(code)
    return codes


def render_leaf(code: int, rng: np.random.Generator, size: int = DEMO_SIZE, leaf_scale: float = 1.0) -> np.ndarray:
    """One (size, size, 3) uint8 image of a leaf carrying marks at the cells set in ``code``."""
    from PIL import Image, ImageDraw, ImageFilter

    s = size / 96.0
    bg = rng.integers(170, 235, size=3)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    noise = rng.normal(0, 6, size=(size, size, 1)).astype(np.float32)
    base = np.asarray(img, dtype=np.float32) + noise
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    cx, cy = size / 2 + rng.uniform(-6, 6) * s, size / 2 + rng.uniform(-6, 6) * s
    a = rng.uniform(29, 35) * s * leaf_scale  # semi-major axis
    b = a * rng.uniform(0.62, 0.78)
    theta = -math.pi / 2 + rng.uniform(-0.3, 0.3)  # upright, tip up, as leaves are scanned
    ct, st = math.cos(theta), math.sin(theta)

    def to_img(u: float, v: float) -> tuple[float, float]:
        """Leaf coordinates (u along the midrib, v across, both in [-1, 1]) -> pixels."""
        x, y = u * a, v * b
        return cx + x * ct - y * st, cy + x * st + y * ct

    # Leaf blade: an ellipse with a pointed tip.
    pts = []
    for t in np.linspace(0, 2 * math.pi, 48, endpoint=False):
        u, v = math.cos(t), math.sin(t)
        u = u * (1.0 + 0.18 * max(0.0, u) ** 3)
        pts.append(to_img(u, v))
    hue = rng.uniform(0, 1)
    leaf = np.array([60 + 70 * hue, 120 + 50 * rng.uniform(), 40 + 30 * rng.uniform()]) * rng.uniform(0.8, 1.1)
    fill = tuple(int(c) for c in np.clip(leaf, 0, 255))
    draw.line([to_img(-0.9, 0), to_img(-1.3, 0)], fill=fill, width=max(2, round(2.5 * s)))  # petiole
    draw.polygon(pts, fill=fill)
    # Midrib and veins at a random angle: texture, not class.
    vein = tuple(int(c) for c in np.clip(leaf * 1.25 + 10, 0, 255))
    draw.line([to_img(-0.95, 0), to_img(1.05, 0)], fill=vein, width=max(1, round(1.2 * s)))
    angle = rng.uniform(0.5, 1.0)
    for u0 in np.linspace(-0.7, 0.7, 6):
        for side in (-1, 1):
            draw.line([to_img(u0, 0), to_img(u0 + 0.28 * angle, side * 0.75)], fill=vein, width=1)
    # Marks: small dots at the code's lattice cells (cell centres jittered a little).
    mark = rng.integers(0, 256, size=3) * rng.uniform(0.15, 0.6)
    mark_rgb = tuple(int(c) for c in mark)
    r = rng.uniform(2.4, 3.2) * s * leaf_scale
    cells = np.linspace(-0.62, 0.62, LATTICE)
    for k in range(CELLS):
        if code >> k & 1:
            u = cells[k % LATTICE] + rng.uniform(-0.05, 0.05)
            v = cells[k // LATTICE] * 0.8 + rng.uniform(-0.05, 0.05)
            x, y = to_img(u, v)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=mark_rgb)
    img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 0.6)))
    return np.asarray(img, dtype=np.uint8)


def generate_synthetic(root: Path, num_classes: int = DEMO_CLASSES, train_val: int = DEMO_TRAIN_VAL,
                       test: int = DEMO_TEST, size: int = DEMO_SIZE, seed: int = DEMO_SEED) -> dict:
    """Write the demo dataset folder (same format as the downloaded datasets) deterministically."""
    import os
    import shutil
    import tempfile

    from PIL import Image

    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        codes = demo_codes(num_classes)
        rows: dict[str, list[tuple[int, str]]] = {"train_val": [], "test": []}
        for cid, code in enumerate(codes):
            rng = np.random.default_rng([seed, cid])
            for split, n in (("train_val", train_val), ("test", test)):
                for k in range(n):
                    rel = f"images/c{cid:02d}/c{cid:02d}_{k:03d}_{split}.png"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(render_leaf(code, rng, size)).save(tmp / rel, optimize=False)
                    rows[split].append((cid, rel))
        names = [f"layout_{code:04x}" for code in codes]
        info = write_dataset_folder(tmp, rows["train_val"], rows["test"], names, {
            "name": "synthetic", "source": "generated", "generator_version": SYNTHETIC_VERSION,
            "seed": seed, "image_size": size, "archive_sha256": None,
        })
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
        return info
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_synthetic(root: Path) -> Path:
    """The demo dataset at ``root``, generated on first use (a few seconds)."""
    root = Path(root)
    info = read_info(root)
    if info.get("generator_version") != SYNTHETIC_VERSION or not (root / "splits" / "test.csv").is_file():
        try:
            generate_synthetic(root)
        except OSError as e:
            raise DatasetError(f"cannot write the synthetic dataset to {root}: {e.strerror}; set UFGIR_DATA_DIR") from None
    return root


def pretraining_batch(n: int, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of uniformly random layout codes and their 16 mark attributes (0/1).

    Leaf sizes span those the demo's resize-and-crop pipeline produces at ``size`` px."""
    codes = rng.integers(0, 1 << CELLS, size=n)
    imgs = np.stack([render_leaf(int(c), rng, size, leaf_scale=rng.uniform(1.0, 1.5)) for c in codes])
    attrs = ((codes[:, None] >> np.arange(CELLS)[None, :]) & 1).astype(np.float32)
    return imgs, attrs
