"""A backbone's geometry from its name, and whether a recipe's ILA layout fits it. No torch.

Recipes are checked when they are loaded, before any model is built (a ViT-L takes seconds to build):
the patch size and depth come from the backbone's timm name (`BACKBONE_DEPTHS`, every backbone ufgir
ships or names, then timm's plain ViT naming), and ``check_geometry`` finds the layouts that cannot
work (a block past the last one, a grid too small for a down-sampling convolution). A method's
default positions follow the depth (`scale_block`). Where the name says nothing, the depth is read
from the built backbone instead and the model checks the same again with its real numbers.
"""

from __future__ import annotations

import re
from typing import Any

#: Blocks of every backbone that ufgir ships or names, by timm name without its pretrained tag
#: (``tests/test_geometry.py`` builds each one on the meta device and counts).
BACKBONE_DEPTHS: dict[str, int] = {
    "ufgir_vit_micro_patch8_64": 6,
    "vit_tiny_patch16_224": 12, "vit_small_patch16_224": 12, "vit_base_patch16_224": 12, "vit_base_patch32_224": 12,
    "vit_large_patch16_224": 24, "vit_large_patch32_224": 24,
    "vit_base_patch16_clip_224": 12, "vit_large_patch14_clip_224": 24, "vit_huge_patch14_clip_224": 32,
    "vit_small_patch14_dinov2": 12, "vit_base_patch14_dinov2": 12, "vit_large_patch14_dinov2": 24,
    "vit_small_patch14_reg4_dinov2": 12, "vit_base_patch14_reg4_dinov2": 12, "vit_large_patch14_reg4_dinov2": 24,
    "vit_base_patch16_siglip_224": 12, "vit_base_patch16_siglip_256": 12, "vit_so400m_patch14_siglip_224": 27,
    "deit3_small_patch16_224": 12, "deit3_base_patch16_224": 12, "deit3_large_patch16_224": 24,
}
#: timm's plain ViT naming: the size word gives the depth (not for the 18x2 / 36x1 variants).
_SIZE_DEPTH = {"tiny": 12, "small": 12, "base": 12, "large": 24, "huge": 32, "giant": 40}
_PLAIN_VIT = re.compile(r"(?:vit|deit3?)_(tiny|small|base|large|huge|giant)_patch\d+_(?!\d+x\d)")


def backbone_patch(name: str) -> int | None:
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else None


def backbone_depth(name: str) -> int | None:
    """Blocks of a timm backbone from its name alone; None when the name does not say (the model
    build reads it from the backbone then)."""
    arch = name.split(".")[0]
    if arch in BACKBONE_DEPTHS:
        return BACKBONE_DEPTHS[arch]
    m = _PLAIN_VIT.match(arch)
    return _SIZE_DEPTH[m.group(1)] if m else None


def scale_block(block: int, depth: int, of: int = 12) -> int:
    """The block of a ``depth``-block backbone at the place of ``block`` in an ``of``-block one:
    after block b of 12 is after block round((b + 1) * depth / 12) - 1, so the paper's 3 and 7 of
    12 are round(D/3) - 1 and round(2D/3) - 1 (1 and 3 of 6, 7 and 15 of 24)."""
    return max(round((block + 1) * depth / of) - 1, 0)


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
