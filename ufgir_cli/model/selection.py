"""What the fine-grained comparison methods select before their heads, as methods of UfgirViT.

TransFG and FFVT pick tokens from the backbone's attention (`select_tokens`); GLSim and RAMS pick
patches on a first pass, crop their box from the image and run the crop through the backbone again
(`crop`, `_two_passes`). Kept apart from `vit.py`, which runs the blocks, because these are a method's
use of the blocks' outputs, not the blocks themselves. Selection runs in float32 whatever the
autocast (fp16 ties move a selection) and, for boxes, without gradient.
"""

from __future__ import annotations

import torch

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
        """GLSim and RAMS: a box chosen on the first pass is cropped and run through the backbone again."""
        return self.plan.selector in ("glsim", "rollout")

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
