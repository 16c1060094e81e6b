"""Parallel bottleneck adapters (ADPT) and ConvPass, pure torch.

Both sit beside a block's attention and MLP, read the same LayerNorm'd input as that branch, and add
their output to the branch output (scale 1 in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from .ila import xavier_linear_


class Adapter(nn.Module):
    """Linear D -> r, GELU, Linear r -> D, times ``scale``.

    ``init="xavier"`` is the reference's; ``"zero"`` zeroes the up-projection so the adapter starts
    as an identity of the frozen backbone (a small backbone is easily swamped by random adapters).
    """

    #: Whether one token's output depends on other tokens (a conv over the grid does).
    mixes_tokens = False

    def __init__(self, dim: int, r: int = 8, scale: float = 1.0, init: str = "xavier"):
        super().__init__()
        self.down = nn.Linear(dim, r)
        self.act = nn.GELU()
        self.up = nn.Linear(r, dim)
        self.scale = scale
        xavier_linear_(self.down)
        xavier_linear_(self.up)
        if init == "zero":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, num_prefix: int = 1) -> torch.Tensor:
        return self._scaled(self.up(self.act(self.down(x))))

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.scale == 1.0 else out * self.scale  # scale 1 (the paper's) costs no pass


class ConvPass(Adapter):
    """An adapter whose bottleneck also runs a k x k conv over the patch grid (prefix tokens as 1x1 maps)."""

    mixes_tokens = True

    def __init__(self, dim: int, r: int = 8, scale: float = 1.0, kernel_size: int = 3, init: str = "xavier"):
        super().__init__(dim, r, scale, init)
        self.conv = nn.Conv2d(r, r, kernel_size, padding=kernel_size // 2)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, num_prefix: int = 1) -> torch.Tensor:
        assert grid is not None, "ConvPass needs the patch grid"
        B, N, _ = x.shape
        H, W = grid
        h = self.act(self.down(x)).transpose(1, 2)            # (B, r, N)
        r = h.shape[1]
        hp = self.conv(h[:, :, num_prefix:].reshape(B, r, H, W)).flatten(2)  # (B, r, H*W)
        hc = h[:, :, :num_prefix]                                            # (B, r, P)
        if num_prefix:  # each prefix token as a 1x1 map (a backbone may have none: SigLIP)
            hc = self.conv(hc.unsqueeze(-1)).squeeze(-1)
        h = self.act(torch.cat([hc, hp], dim=2)).transpose(1, 2)             # (B, N, r)
        return self._scaled(self.up(h))


def _adapter(dim: int, r: int, scale: float, kernel_size: int, init: str) -> Adapter:
    return Adapter(dim, r, scale, init)


def _convpass(dim: int, r: int, scale: float, kernel_size: int, init: str) -> ConvPass:
    return ConvPass(dim, r, scale, kernel_size, init)


#: Parallel adapter kinds a method row may name (``MethodSpec.adapter``) -> builder.
ADAPTERS = {"adapter": _adapter, "convpass": _convpass}


class BlockAdapters(nn.Module):
    """The two parallel adapters of one block: beside attention and beside the MLP."""

    def __init__(self, dim: int, r: int, scale: float, kind: str, kernel_size: int = 3, init: str = "xavier"):
        super().__init__()
        make = ADAPTERS[kind]
        self.attn = make(dim, r, scale, kernel_size, init)
        self.mlp = make(dim, r, scale, kernel_size, init)

    @property
    def mixes_tokens(self) -> bool:
        return self.attn.mixes_tokens or self.mlp.mixes_tokens
