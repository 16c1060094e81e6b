"""A backbone's geometry from its name, and whether a recipe's ILA layout fits it. No torch.

Recipes are checked when they are loaded, before any model is built (a ViT-L takes seconds to build):
the patch size and depth come from the backbone's timm name (`BACKBONE_DEPTHS`, every backbone ufgir
ships or names, then timm's plain ViT naming), and ``check_geometry`` finds the layouts that cannot
work (a block past the last one, a grid too small for a down-sampling convolution). A method's
default positions follow the depth (`scale_block`). Where the name says nothing, the depth is read
from the built backbone instead and the model checks the same again with its real numbers.

The same goes for what else a name tells: the backbone's family (`FAMILIES`: prefix tokens, position
embedding, pooling, LayerNorm eps), so that a method a family cannot run is refused on load, and its
pretrained numerics (`PRETRAINED`, `backbone_numerics`), or the reference's where a recipe asks for
them on one of the reference's backbones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

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
    # timm's Eva class: EVA-02 (MIM-pretrained, rotary + absolute positions) and DINOv3 (rotary only)
    **{f"eva02_{s}_patch14_{px}": d for s, d in (("tiny", 12), ("small", 12), ("base", 12), ("large", 24))
       for px in (224, 336, 448) if not (px == 336 and s in ("base", "large")) and not (px == 448 and s in ("tiny", "small"))},
    **{f"vit_{s}_patch16_dinov3{q}": d for s, d in (("small", 12), ("small_plus", 12), ("base", 12), ("large", 24),
                                                    ("huge_plus", 32)) for q in ("", "_qkvb")},
}
#: timm's plain ViT naming: the size word gives the depth (not for the 18x2 / 36x1 variants).
_SIZE_DEPTH = {"tiny": 12, "small": 12, "base": 12, "large": 24, "huge": 32, "giant": 40}
_PLAIN_VIT = re.compile(r"(?:vit|deit3?)_(tiny|small|base|large|huge|giant)_patch\d+_(?!\d+x\d)")


#: Backbones whose attention timm builds with separate q, k and v projections (``attn.q_proj``, ...);
#: every other one has a single fused ``attn.qkv`` (``tests/test_protocol.py`` builds each one and looks).
_SEPARATE_QKV = re.compile(r"eva02_(?:base|large)_patch14_\d+")


def separate_qkv(name: str) -> bool:
    """Whether the backbone projects queries, keys and values apart (EVA-02 B and L), from its name."""
    return _SEPARATE_QKV.fullmatch(name.split(".")[0]) is not None


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


# --------------------------------------------------------------------------------------------
# Families: what a backbone is, from its name alone, so that a method that cannot run on it is
# refused when the recipe loads (``tests/test_backbones.py`` builds each family and compares).

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Family:
    """A kind of timm ViT. ``registers``: prefix tokens besides the CLS token (DINOv2's ``regN``
    archs say N in their name); ``pos_embed``: "prefix+patches" when the prefix tokens have positions
    of their own, "patches" when only the patch tokens do (timm's ``no_embed_class``), "none" when the
    positions are rotary alone (DINOv3); ``pool``: what timm's head reads (the CLS token, an
    attention-pooling head, or the patch average), which is what the linear probe classifies;
    ``fixed_registers``: registers that every arch of the family has, unnamed (DINOv3's 4);
    ``plain_blocks``: timm's ``VisionTransformer`` blocks (fused ``qkv``, absolute positions), which token
    reduction runs inside; False for timm's ``Eva`` class."""

    key: str
    title: str
    pattern: re.Pattern
    example: str  # a pretrained tag of the family (README, tests)
    cls_token: bool
    pos_embed: Literal["prefix+patches", "patches", "none"]
    pool: Literal["token", "map", "avg"]
    layer_norm_eps: float
    blocks: str  # in words: pre-norm, LayerScale, ...
    fixed_registers: int = 0
    plain_blocks: bool = True

    def registers(self, name: str) -> int:
        m = re.search(r"_reg(\d+)_", name.split(".")[0])
        return int(m.group(1)) if m else self.fixed_registers

    @property
    def pooled(self) -> str:
        """What the linear probe reads, in words (timm's head on this family)."""
        return {"token": "CLS token", "map": "attention pool", "avg": "patch average"}[self.pool]

    def prefix_tokens(self, name: str) -> int:
        return int(self.cls_token) + self.registers(name)

    def has(self, need: str) -> bool:
        """Whether backbones of this family have what a method may need (``methods.Need``)."""
        return {"cls_token": self.cls_token, "patch_grid": True, "abs_pos_embed": self.pos_embed != "none",
                "token_reduction": self.plain_blocks}[need]


_SIZE = r"(?:tiny|small|medium|base|large|huge|giant|so400m|betwixt|giantopt|gigantic)"
FAMILIES: tuple[Family, ...] = (
    Family("vit", "ViT (the paper's, ImageNet-21k)", re.compile(rf"^(?:vit_{_SIZE}_patch\d+_\d+|ufgir_vit_micro_patch8_64)$"),
           "vit_base_patch16_224.orig_in21k", True, "prefix+patches", "token", 1e-6, "pre-LN blocks"),
    Family("deit3", "DeiT 3", re.compile(rf"^deit3_{_SIZE}_patch\d+_\d+$"), "deit3_base_patch16_224.fb_in22k_ft_in1k",
           True, "patches", "token", 1e-6, "LayerScale"),
    Family("clip", "CLIP", re.compile(rf"^vit_{_SIZE}_patch\d+_(?:plus_)?clip_(?:quickgelu_)?\d+$"),
           "vit_base_patch16_clip_224.openai", True, "prefix+patches", "token", 1e-5, "LayerNorm before block 0 (pre-norm)"),
    Family("dinov2", "DINOv2", re.compile(rf"^vit_{_SIZE}_patch14_dinov2$"), "vit_base_patch14_dinov2.lvd142m",
           True, "prefix+patches", "token", 1e-6, "LayerScale"),
    Family("dinov2_reg", "DINOv2 with registers", re.compile(rf"^vit_{_SIZE}_patch14_reg\d+_dinov2$"),
           "vit_base_patch14_reg4_dinov2.lvd142m", True, "patches", "token", 1e-6, "LayerScale; 4 registers"),
    Family("siglip", "SigLIP / SigLIP 2", re.compile(rf"^vit_{_SIZE}_patch\d+_siglip_\d+$"),
           "vit_base_patch16_siglip_224.v2_webli", False, "patches", "map", 1e-6, "no CLS token; attention-pooling head"),
    Family("siglip_gap", "SigLIP / SigLIP 2, average-pooled", re.compile(rf"^vit_{_SIZE}_patch\d+_siglip_gap_\d+$"),
           "vit_base_patch16_siglip_gap_224.v2_webli", False, "patches", "avg", 1e-6, "no CLS token; average pooling"),
    Family("eva02", "EVA-02", re.compile(rf"^eva02_{_SIZE}_patch14_\d+$"), "eva02_base_patch14_224.mim_in22k",
           True, "prefix+patches", "avg", 1e-6, "timm's Eva: rotary positions, SwiGLU, separate q/k/v (B, L); "
           "patch average, then LayerNorm", plain_blocks=False),
    Family("dinov3", "DINOv3", re.compile(rf"^vit_{_SIZE}(?:_plus)?_patch16_dinov3(?:_qkvb)?$"),
           "vit_base_patch16_dinov3.lvd1689m", True, "none", "avg", 1e-5, "timm's Eva: rotary positions only, "
           "LayerScale; 4 registers", fixed_registers=4, plain_blocks=False),
)


def backbone_family(name: str) -> Family | None:
    """The family of a timm name (its pretrained tag ignored); None for a name no family knows."""
    arch = name.split(".")[0]
    return next((f for f in FAMILIES if f.pattern.match(arch)), None)


# --------------------------------------------------------------------------------------------
# Numerics: normalisation, resize, LayerNorm eps and position resampling, from the backbone's own
# pretrained config unless a recipe asks for the reference's (``model.numerics = "reference"``).

#: Pretrained configs (timm's ``pretrained_cfg``) of the names ufgir names, tagged or not (an untagged
#: name is timm's default tag): (mean, std, crop_pct), all bicubic. A name missing here is read from
#: timm when the model is built (``tests/test_backbones.py`` compares every entry with timm's).
_IN21K = {f"vit_{a}_224.orig_in21k": (HALF, HALF, 0.9)
          for a in ("base_patch16", "base_patch32", "large_patch16", "large_patch32", "huge_patch14")}
_DINOV2 = {f"vit_{s}_patch14_{r}dinov2{t}": (IMAGENET_MEAN, IMAGENET_STD, 1.0)
           for s in ("small", "base", "large", "giant") for r in ("", "reg4_") for t in ("", ".lvd142m")}
_SIGLIP = {f"{a}{t}": (HALF, HALF, 0.9) for t in ("", ".v2_webli", ".webli")
           for a in ("vit_base_patch16_siglip_224", "vit_base_patch16_siglip_256", "vit_so400m_patch14_siglip_224",
                     "vit_base_patch16_siglip_gap_224", "vit_large_patch16_siglip_256")}
_EVA02 = {f"eva02_{s}_patch14_{px}{t}": (CLIP_MEAN, CLIP_STD, c) for s in ("tiny", "small", "base", "large")
          for px, t, c in ((224, "", 0.9), (224, ".mim_in22k", 0.9), (448, "", 1.0), (448, ".mim_in22k_ft_in22k_in1k", 1.0))
          if not (px == 448 and s in ("tiny", "small"))}
_DINOV3 = {f"vit_{s}_patch16_dinov3{q}{t}": (IMAGENET_MEAN, IMAGENET_STD, 1.0)
           for s in ("small", "small_plus", "base", "large", "huge_plus") for q in ("", "_qkvb") for t in ("", ".lvd1689m")}
_DEIT3 = {f"deit3_{s}_patch16_224{t}": (IMAGENET_MEAN, IMAGENET_STD, c) for s in ("small", "medium", "base", "large")
          for t, c in (("", 0.9), (".fb_in1k", 0.9), (".fb_in22k_ft_in1k", 1.0))}
PRETRAINED: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    "ufgir_vit_micro_patch8_64": (HALF, HALF, 1.0), "ufgir_vit_micro_patch8_64.synthetic": (HALF, HALF, 1.0),
    **{f"vit_{s}_patch16_224": (HALF, HALF, 0.9) for s in ("tiny", "small", "base", "large")},
    **_IN21K, **_DEIT3, **_DINOV2, **_SIGLIP, **_EVA02, **_DINOV3,
    "vit_base_patch16_clip_224": (CLIP_MEAN, CLIP_STD, 0.95),
    "vit_base_patch16_clip_224.openai": (CLIP_MEAN, CLIP_STD, 0.9),
    "vit_base_patch16_clip_224.laion2b": (CLIP_MEAN, CLIP_STD, 1.0),
    "vit_base_patch16_clip_224.datacompxl": (CLIP_MEAN, CLIP_STD, 1.0),
    "vit_base_patch32_clip_224.openai": (CLIP_MEAN, CLIP_STD, 0.9),
    "vit_large_patch14_clip_224.openai": (CLIP_MEAN, CLIP_STD, 1.0),
    "vit_large_patch14_clip_224.laion2b": (HALF, HALF, 1.0),
}

#: The backbones the reference code ran (its ``vit_t16`` ... ``vit_l32`` as timm names: ImageNet-21k
#: ViTs) and ufgir's micro ViT, which stands in for them in the tests and the demo: the only ones on
#: which ``model.numerics = "reference"`` means the reference's numerics.
REFERENCE_BACKBONES = re.compile(
    r"^(?:vit_\w+_patch\d+_224\.orig_in21k|vit_(?:tiny|small)_patch16_224|ufgir_vit_micro_patch8_64(?:\.synthetic)?)$")
#: The reference's numerics (reference/ILA.md section 4), by recipe key.
REFERENCE_NUMERICS: dict[str, Any] = {
    "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "layer_norm_eps": 1e-12, "pos_embed_resize": "bilinear_corners",
    "resize_ratio": 1.34, "interpolation": "bicubic",
}
#: Recipe keys (of the model and data sections) whose unset values come from ``model.numerics``.
NUMERIC_KEYS = {"model": ("mean", "std", "layer_norm_eps", "pos_embed_resize"), "data": ("resize_ratio", "interpolation")}


def is_reference_backbone(name: str) -> bool:
    return bool(REFERENCE_BACKBONES.match(name))


def backbone_numerics(name: str, numerics: str = "backbone") -> tuple[dict[str, Any], str]:
    """The numeric keys that ``numerics`` ("backbone" or "reference") gives a backbone, and where
    they come from in words. Keys the name does not tell are left out (the build reads them from timm)."""
    if numerics == "reference" and is_reference_backbone(name):
        return dict(REFERENCE_NUMERICS), "the reference's numerics (model.numerics)"
    out: dict[str, Any] = {}
    family = backbone_family(name)
    if family is not None:
        out["layer_norm_eps"] = family.layer_norm_eps
        out["pos_embed_resize"] = "bicubic"  # timm's own resampling
    if name in PRETRAINED:
        mean, std, crop_pct = PRETRAINED[name]
        out.update(mean=mean, std=std, resize_ratio=1.0 / crop_pct, interpolation="bicubic")
    why = "; the reference's numerics are for the reference's backbones" if numerics == "reference" else ""
    return out, f"the backbone's own ({name}{why})"
