"""What the fine-grained comparison methods select before their heads, as methods of UfgirViT.

TransFG and FFVT pick tokens from the backbone's attention (`select_tokens`); GLSim and RAMS pick
patches on a first pass, crop their box from the image and run the crop through the backbone again
(`crop`, `_two_passes`); CAL crops the image to where its attention maps fire and, in training,
also drops what one map covers (`attention_crops`, `_cal_train`, `_cal_eval`). Kept apart from
`vit.py`, which runs the blocks, because these are a method's use of the blocks' outputs, not the
blocks themselves. Selection runs in float32 whatever the
autocast (fp16 ties move a selection) and, for boxes, without gradient.
"""

from __future__ import annotations

import torch

from .cal import (
    EVAL_CROPS,
    SINGLE_CROP,
    TRAIN_CROP_PADDING,
    TRAIN_CROP_THETA,
    TRAIN_DROP_THETA,
    CALOutput,
    attention_boxes,
    attention_drop,
    choose_maps,
    uniform,
)
from .heads import crop_boxes, crop_resize, glsim_scores, maws_scores, psm_scores, rollout_scores
from .precision import float32_region


class SelectionMixin:
    """Token and crop selection for `UfgirViT` (it provides ``_encode``, ``_selection``, ``vit``,
    ``cfg``, ``plan``, ``head``, ``drop``, ``anchor_cls`` and ``feature_info``)."""

    def select_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TransFG's and FFVT's input to their aggregator block: the last block's CLS token followed by
        the selected tokens, (B, 1 + K, D), and the selected indices into each block's tokens.

        TransFG (``psm``): per head, the argmax of the CLS row of the attention product over the patch
        tokens, gathered from the last block's output: K = heads, indices (B, heads).
        FFVT (``maws``): per block, the 12 tokens with the largest mutual attention weight (the CLS
        token may be one), gathered from that block's output: K = 12 x blocks, indices (blocks, B, 12).
        Scores and selection run in float32 whatever the autocast (fp16 ties move a selection)."""
        maws = self.plan.selector == "maws"  # FFVT gathers from every block's output, TransFG from the last
        self._selection = sel = []
        try:
            last, outputs = self._encode(x, frozenset(range(len(self.vit.blocks))) if maws else frozenset())
        finally:
            self._selection = None
        D = last.shape[-1]
        with float32_region(last):
            if not maws:
                scores = psm_scores([maps for maps, _ in sel], row0_chain=self.cfg.row0_chain)
                idx = scores.argmax(dim=-1) + 1                                    # (B, heads): past the CLS
                parts = [last.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))]     # (B, heads, D)
            else:
                idx = torch.stack([maws_scores(rows, key0).topk(self.cfg.maws_tokens, dim=-1).indices
                                   for rows, key0 in sel])                        # (blocks, B, K)
                parts = [out.gather(1, i.unsqueeze(-1).expand(-1, -1, D)) for out, i in zip(outputs, idx, strict=True)]
        return torch.cat([last[:, :1], *parts], dim=1), idx                       # (B, 1 + K, D)

    @property
    def crops_second_pass(self) -> bool:
        """GLSim and RAMS: a box chosen on the first pass is cropped and run, with a CLS token of its
        own, through the backbone again."""
        return self.plan.selector in ("glsim", "rollout")

    @property
    def crops_image(self) -> bool:
        """The image is cropped to a box that a first pass chose (GLSim, RAMS, CAL): the box's size
        depends on the image, which no traced graph can hold."""
        return self.plan.selector in ("glsim", "rollout", "cal")

    @property
    def eval_modes(self) -> dict[str, dict]:
        """Evaluation modes of different cost, as recipe overrides: CAL's 8 passes (the image and its
        mirror, three crops each) and its single crop (2 passes). Empty for every other method."""
        if self.plan.head != "cal":
            return {}
        return {"8 passes": {"cal_single_crop": False}, "2 passes (single crop)": {"cal_single_crop": True}}

    def crop(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first pass of GLSim or RAMS and what it chooses: ``tokens`` (B, 1 + N, D) after the final
        norm, the ``indices`` (B, k) of the selected patches, their ``boxes`` (B, 4) in pixels [top,
        bottom, left, right] and the ``crops`` (B, 3, S, S) resized from the input. Selection and boxes
        run in float32 and without gradient; on the meta device (cost counting) the crop is the whole
        image, which costs the second pass the same."""
        rollout = self.plan.selector == "rollout"
        self._selection = sel = [] if rollout else None
        try:
            tokens = self.vit.norm(self._encode(x)[0])                          # (B, 1 + N, D)
        finally:
            self._selection = None
        S = x.shape[-1]
        k = self.cfg.crop_tokens or (16 if S >= 448 else 8)
        with torch.no_grad(), float32_region(tokens):
            if rollout:
                scores, largest = rollout_scores([maps for maps, _ in sel], self.cfg.row0_chain), True
            else:
                scores, largest = glsim_scores(tokens, self.cfg.sim_metric)
            indices = scores.topk(k, dim=-1, largest=largest).indices           # (B, k)
            boxes = crop_boxes(indices, self.feature_info[0].grid, self.vit.patch_embed.patch_size[0], S)
            crops = x if x.is_meta else crop_resize(x, boxes)
        return {"tokens": tokens, "indices": indices, "boxes": boxes, "crops": crops}

    def _two_passes(self, x: torch.Tensor) -> torch.Tensor:
        """GLSim / RAMS logits: the image's pass, the crop's pass with the anchor CLS token, then the
        two CLS tokens into the aggregator (GLSim) or each through the head, averaged (RAMS)."""
        first = self.crop(x)
        cls_only = self.last_block_cls_only and self._attn_probs is None
        second = self._encode(first["crops"], last_cls_only=cls_only, cls_token=self.anchor_cls)[0]
        cls = torch.stack([first["tokens"][:, 0], self.vit.norm(second)[:, 0]], dim=1)  # (B, 2, D)
        if self.plan.head == "avg_cls":
            return self.head(cls)
        return self.head(cls, self.vit.norm, self.drop)

    # ---- CAL ------------------------------------------------------------------------------
    def _cal_head(self, x: torch.Tensor, counterfactual: bool = False) -> tuple:
        """One backbone pass of images (B, 3, S, S) into CAL's head: (logits, counterfactual effect or
        None, BAP features, attention maps); see `WSDANHead.forward`."""
        tokens = self.vit.norm(self._encode(x)[0])[:, self.num_prefix_tokens:]  # (B, N, D): no CLS token
        return self.head(tokens, self.feature_info[-1].out_grid, counterfactual)

    def attention_crops(self, x: torch.Tensor, settings: tuple[tuple[float, float], ...] | None = None,
                        ) -> dict:
        """CAL's first pass and the crops it chooses: the pass's ``logits`` (B, C) and attention ``maps``
        (B, M, h, w), their ``mean_map`` (B, 1, h, w), and for each (threshold, padding) of ``settings``
        (default: the recipe's evaluation crops; returned too) the ``boxes`` (K, B, 4) [top, bottom,
        left, right) and the ``crops`` (K, B, 3, S, S). On the meta device (cost counting) each crop is
        the whole image."""
        if settings is None:
            settings = SINGLE_CROP if self.cfg.cal_single_crop else EVAL_CROPS
        logits, _, _, maps = self._cal_head(x)
        mean_map = maps.mean(dim=1, keepdim=True)                                  # (B, 1, h, w)
        S = x.shape[-1]
        if x.is_meta:
            boxes = torch.zeros(len(settings), x.shape[0], 4, dtype=torch.long)
            crops = x.expand(len(settings), *x.shape)
        else:
            boxes = torch.stack([attention_boxes(mean_map, theta, pad, S) for theta, pad in settings])
            crops = torch.stack([crop_resize(x, b) for b in boxes])                # (K, B, 3, S, S)
        return {"logits": logits, "maps": maps, "mean_map": mean_map, "boxes": boxes, "crops": crops,
                "settings": settings}

    def _cal_eval(self, x: torch.Tensor) -> torch.Tensor:
        """CAL's evaluation logits: per view (the image and, unless single-crop, its mirror), the mean of
        the view's pass and its crops' passes; then the mean over views. The views share one backbone
        pass, and all their crops another (BatchNorm is in eval mode, so batching changes nothing)."""
        B = x.shape[0]
        views = x if self.cfg.cal_single_crop else torch.cat([x, x.flip(3)])       # (V*B, 3, S, S)
        first = self.attention_crops(views)
        K = first["boxes"].shape[0]
        crop_logits = self._cal_head(first["crops"].flatten(0, 1))[0]              # (K*V*B, C)
        per_view = (first["logits"] + crop_logits.view(K, views.shape[0], -1).sum(0)) / (K + 1)  # (V*B, C)
        return per_view.view(-1, B, per_view.shape[-1]).mean(0)                   # (B, C)

    def _cal_train(self, x: torch.Tensor) -> CALOutput:
        """CAL's three passes: the image; then, together, its crop to one attention map (threshold
        U(0.4, 0.6) of the map's max, 10 % padding) and its drop of another (threshold U(0.2, 0.5)),
        the two maps drawn per sample by `choose_maps`."""
        B, S = x.shape[0], x.shape[-1]
        raw, aux_raw, features, maps = self._cal_head(x, counterfactual=True)
        with torch.no_grad():
            chosen = choose_maps(maps.detach())                                     # (B, 2, h, w)
            boxes = attention_boxes(chosen[:, :1], uniform(*TRAIN_CROP_THETA, B), TRAIN_CROP_PADDING, S)
            crops = crop_resize(x, boxes)
            drops = attention_drop(x, chosen[:, 1:], uniform(*TRAIN_DROP_THETA, B))
        aug, aux_aug, _, _ = self._cal_head(torch.cat([crops, drops]), counterfactual=True)
        return CALOutput((raw + aug[:B]) / 2, raw, aug, torch.cat([aux_raw, aux_aug]), features)
