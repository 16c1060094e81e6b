"""A backbone's geometry from its name, and whether a recipe's ILA layout fits it. No torch.

Recipes are checked when they are loaded, before any model is built (a ViT-L takes seconds to build):
the patch size and depth come from well-known timm names, and ``check_geometry`` finds the layouts
that cannot work (a block past the last one, a grid too small for a down-sampling convolution). The
model checks the same again with the built backbone's real numbers.
"""

from __future__ import annotations

import re
from typing import Any

#: Depth of well-known timm ViT names, so a recipe can be checked without building it.
_KNOWN_DEPTH = {"tiny": 12, "small": 12, "base": 12, "large": 24, "huge": 32, "giant": 40}


def backbone_patch(name: str) -> int | None:
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else None


def backbone_depth(name: str) -> int | None:
    if name.startswith("ufgir_"):
        m = re.search(r"_d(\d+)", name)
        return int(m.group(1)) if m else None
    m = re.match(r"(?:vit|deit3?)_(tiny|small|base|large|huge|giant)_", name)
    return _KNOWN_DEPTH.get(m.group(1)) if m else None


def check_geometry(cfg: Any, depth: int | None, patch: int) -> None:
    """Raise ValueError when positions or grid sizes cannot work for this backbone and image size
    (``cfg``: a recipe's model section)."""
    if cfg.image_size % patch:
        raise ValueError(
            f"model.image_size {cfg.image_size} is not a multiple of the backbone's patch size {patch}; "
            f"use e.g. {patch * round(cfg.image_size / patch)}"
        )
    for key in ("ila_locs", "ila_ds_locs"):
        locs = getattr(cfg, key) or ()
        if depth is not None and any(i >= depth for i in locs):
            raise ValueError(
                f"model.{key} {list(locs)} names a block past the last one; the backbone has {depth} "
                f"blocks (0-{depth - 1})"
            )
    grid = cfg.image_size // patch
    shrink = cfg.ila_kernel - 1
    for n, loc in enumerate(cfg.ila_ds_locs or ()):
        if grid < cfg.ila_kernel or grid - shrink < 1:
            raise ValueError(
                f"model.ila_ds_locs {list(cfg.ila_ds_locs)}: down-sampling #{n + 1} (after block {loc}) "
                f"meets a {grid}x{grid} grid, too small for a {cfg.ila_kernel}x{cfg.ila_kernel} valid "
                f"convolution at model.image_size {cfg.image_size}; use fewer positions or a larger image"
            )
        grid -= shrink
