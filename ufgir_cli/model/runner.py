"""How `UfgirViT`'s block loop runs one kind of timm block: the parts that differ between timm's
block classes, behind one small interface.

The loop itself (prompts, adapters, ILAs, the CLS-only last block, taps and edits) is the same for
every backbone; what a block does inside (how it projects queries, keys and values, where positions
enter, how its LayerScale is held, how tokens are embedded) belongs to a :class:`BlockRunner`. This
module holds the plain ``VisionTransformer``'s; ``model/eva.py`` holds timm's ``Eva`` class's (EVA-02,
DINOv3: rotary positions, separate q/k/v, SwiGLU), and `block_runner` chooses by the backbone's class.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RecipeError
from .attention import cls_attention, explicit_attention
from .backbone import embed_tokens


class BlockRunner:
    """A timm ``VisionTransformer``'s blocks: pre-norm, fused ``qkv``, LayerScale as ``ls1``/``ls2``,
    absolute positions added once at the embedding. Holds no tensors (the backbone does)."""

    #: Whether token reduction (`model/reduction.py`, which projects a fused ``qkv`` itself) runs on it.
    reduces_tokens = True

    def check(self, vit: nn.Module, backbone: str) -> None:
        """RecipeError when the backbone's blocks are not what this runner runs."""
        for blk in vit.blocks:
            if not all(hasattr(blk, a) for a in ("norm1", "attn", "norm2", "mlp")) or not hasattr(blk.attn, "qkv"):
                raise RecipeError(f"model.backbone {backbone!r}: blocks are not pre-norm ViT blocks")

    def embed(self, vit: nn.Module, x: torch.Tensor, cls_token: torch.Tensor | None = None,
              suffix: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, S, S) -> the tokens entering block 0 (see `backbone.embed_tokens`)."""
        return embed_tokens(vit, x, cls_token, suffix)

    def attention(self, blk: nn.Module, h: torch.Tensor, grid: tuple[int, int],
                  probs: list[torch.Tensor] | None = None, query_only: int = 0,
                  key0: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Block ``blk``'s attention on its normed input ``h`` (B, N, D) whose last H*W rows lie on
        ``grid``; ``probs``, ``query_only`` and ``key0`` as `attention.explicit_attention` takes them."""
        return explicit_attention(blk.attn, h, probs, query_only=query_only, key0=key0)

    def cls_attention(self, blk: nn.Module, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The attention's output for the first row alone, (B, 1, D) (see `attention.cls_attention`)."""
        return cls_attention(blk.attn, h)

    def scale_attn(self, blk: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """The attention branch's LayerScale (identity where the block has none)."""
        return blk.ls1(a)

    def scale_mlp(self, blk: nn.Module, m: torch.Tensor) -> torch.Tensor:
        """The MLP branch's LayerScale (identity where the block has none)."""
        return blk.ls2(m)


__all__ = ["BlockRunner"]
