"""GLSim and RAMS (reference/FGIR.md §1, §7): patches picked on a first pass, their box cropped from
the image and run through the backbone again with a CLS token of its own (``anchor_cls``, starting as
a copy of the image's); GLSim puts both CLS tokens through one more block, RAMS averages the head's
logits on each.

GLSim picks the patches most similar to the CLS token; RAMS those with the largest attention rollout.
Selection and boxes run in float32 and without gradient. Crops are resized image by image, the only
way that matches the reference bit for bit (see `crop_resize`).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from ...methods import MethodSpec
from ...recipe import ModelConfig
from ..attention import cls_row_through, rollout_factor
from ..backbone import new_block_like
from ..precision import float32_region
from .aggregator import AggregatorHead
from .base import Method, Selection


class AvgClsHead(nn.Module):
    """RAMS's head as the reference runs it: one zero-initialised Linear on each CLS token (the image's
    and the crop's), the two logit vectors averaged."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, cls_tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``cls_tokens`` (B, passes, D) -> logits (B, C)."""
        return cls_tokens if pre_logits else self.fc(cls_tokens).mean(dim=1)


def rollout_scores(maps: list[torch.Tensor], row0_chain: bool = False) -> torch.Tensor:
    """RAMS's selection scores: attention rollout (heads averaged, `rollout_factor` per block, blocks
    multiplied last to first), the CLS row over the patch columns. (B, heads, S, S) maps -> (B, S - 1),
    in float32; ``row0_chain`` as in `attention.cls_row_through`."""
    return cls_row_through([rollout_factor(a.float().mean(dim=1)) for a in maps], row0_chain)


def glsim_scores(tokens: torch.Tensor, metric: str = "cos", num_prefix: int = 1) -> tuple[torch.Tensor, bool]:
    """GLSim's global-local similarity of the CLS token to every patch token of the final normed
    tokens (B, P + N, D), P prefix tokens (the CLS token first, then any registers, never candidates)
    -> ((B, N) scores, whether the largest are the most similar), in float32.
    ``cos``: cosine similarity; ``l1`` / ``l2``: mean absolute / squared difference (smallest wins)."""
    t = tokens.float()
    g, patches = t[:, :1], t[:, num_prefix:]
    if metric == "cos":
        return F.cosine_similarity(g, patches, dim=-1), True
    diff = (g - patches).abs() if metric == "l1" else (g - patches) ** 2
    return diff.mean(dim=-1).abs(), False


def crop_boxes(indices: torch.Tensor, grid: tuple[int, int], patch: int, size: int) -> torch.Tensor:
    """The box around the selected patches, (B, K) patch indices -> (B, 4) pixels [top, bottom, left,
    right], with the reference's quirk kept for parity: the far edge is the top-left corner of the last
    selected row or column (that row or column is cut off), a degenerate box grows to one patch."""
    rows, cols = indices // grid[1], indices % grid[1]
    top, left = rows.min(dim=1).values * patch, cols.min(dim=1).values * patch
    bottom = torch.clamp(torch.maximum(rows.max(dim=1).values * patch, top + patch), max=size)
    right = torch.clamp(torch.maximum(cols.max(dim=1).values * patch, left + patch), max=size)
    return torch.stack([top, bottom, left, right], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box resized back to the full size: bilinear with aligned corners, one image at a
    time. Why per sample: a batched resampler (roi_align) differs from the reference in the last bits,
    and the crops must be the reference's exactly."""
    size = images.shape[-2:]
    out = [F.interpolate(img[None, :, top:bottom, left:right], size=size, mode="bilinear", align_corners=True)
           for img, (top, bottom, left, right) in zip(images, boxes.tolist(), strict=True)]
    return torch.cat(out)                                                    # (B, 3, S, S)


class _TwoPass(Method):
    """The first pass chooses a box; its crop runs again with the anchor CLS token. A subclass gives
    ``scores(model, x)``: the first pass's final normed tokens (B, P + N, D), a score per patch (B, N)
    and whether the largest scores win."""

    train_passes = 2  # the image, then the crop, both trained through

    single_pass = False
    traceable = False
    timm_head = False

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.crop_tokens = cfg.crop_tokens  # None: 8, and 16 at 448 px and more (the reference's rule)

    def extra_parameters(self, vit):
        return {"anchor_cls": nn.Parameter(vit.cls_token.detach().clone())}

    def passes(self, eval_mode=None) -> int:
        return 2

    def pools_cls(self, model) -> bool:
        return True  # the crop's pass reads its CLS row alone

    def forward_head(self, model, x, pre_logits=False, intermediates=None):
        raise ValueError(f"the {self.name} head reads a second pass over a crop: call model(x)")

    def crop(self, model, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first pass and what it chooses: ``tokens`` (B, P + N, D) after the final norm, the
        ``indices`` (B, k) of the selected patches, their ``boxes`` (B, 4) in pixels [top, bottom, left,
        right] and the ``crops`` (B, 3, S, S) resized from the input. On the meta device (cost counting)
        the crop is the whole image, which costs the second pass the same."""
        S = x.shape[-1]
        k = self.crop_tokens or (16 if S >= 448 else 8)
        tokens, scores, largest = self.scores(model, x)
        with torch.no_grad(), float32_region(tokens):
            indices = scores.topk(k, dim=-1, largest=largest).indices           # (B, k)
            boxes = crop_boxes(indices, model.feature_info[0].grid, model.vit.patch_embed.patch_size[0], S)
            crops = x if x.is_meta else crop_resize(x, boxes)
        return {"tokens": tokens, "indices": indices, "boxes": boxes, "crops": crops}

    def cls_tokens(self, model, x: torch.Tensor) -> torch.Tensor:
        """Both passes' CLS tokens after the final norm, (B, 2, D)."""
        first = self.crop(model, x)
        second = model.encode(first["crops"], last_cls_only=model.last_block_cls_only, cls_token=model.anchor_cls)[0]
        return torch.stack([first["tokens"][:, 0], model.vit.norm(second)[:, 0]], dim=1)

    def select(self, model, x):
        first = self.crop(model, x)
        return Selection(f"{first['indices'].shape[1]} selected patches, their box and the crop",
                         model.feature_info[0].grid, boxes=first["boxes"][None], crops=first["crops"][None],
                         labels=("crop (second pass)",))

    @classmethod
    def upstream_settings(cls, config: argparse.Namespace) -> dict[str, Any]:
        return {"crop_tokens": int(getattr(config, "selector_num_tokens", 8)),  # already doubled at 448
                "sim_metric": getattr(config, "sim_metric", None) or "cos"}


class GLSim(_TwoPass):
    upstream_head_keys = (("head.", "head.fc."),)

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.metric = cfg.sim_metric
        self.eps = cfg.layer_norm_eps or 1e-6

    def build_head(self, vit, num_classes):
        return AggregatorHead(new_block_like(vit, self.eps), vit.embed_dim, num_classes, self.eps, own_norm=True)

    def scores(self, model, x):
        tokens = model.vit.norm(model.encode(x)[0])                            # (B, P + N, D)
        with torch.no_grad(), float32_region(tokens):
            return (tokens, *glsim_scores(tokens, self.metric, model.num_prefix_tokens))

    def forward(self, model, x, eval_mode=None):
        self._mode(eval_mode)
        return model.head(self.cls_tokens(model, x), model.vit.norm, model.drop)


class RAMS(_TwoPass):
    upstream_head_keys = (("head.", "head.fc."),)

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.row0_chain = cfg.row0_chain

    def build_head(self, vit, num_classes):
        return AvgClsHead(vit.embed_dim, num_classes)

    def scores(self, model, x):
        maps: list[torch.Tensor] = []
        tokens = model.vit.norm(model.encode(x, tap=lambda a, _: maps.append(a))[0])  # (B, P + N, D)
        with torch.no_grad(), float32_region(tokens):
            scores = rollout_scores(maps, self.row0_chain)[:, model.num_prefix_tokens - 1:]  # (B, HW): no registers
            return tokens, scores, True

    def forward(self, model, x, eval_mode=None):
        self._mode(eval_mode)
        return model.head(self.cls_tokens(model, x))

    def map_upstream_key(self, key, state):
        if key.startswith("head_reducer.0."):  # the head stored twice (head_reducer = Sequential(head, mean))
            twin = key.replace("head_reducer.0.", "head.")
            if not torch.equal(state[key], state.get(twin, torch.empty(0))):
                raise CheckpointError(f"reference checkpoint key {key} differs from {twin}, which it should repeat")
            return ""
        return super().map_upstream_key(key, state)


__all__ = ["GLSim", "RAMS", "AvgClsHead", "crop_boxes", "crop_resize", "glsim_scores", "rollout_scores"]
