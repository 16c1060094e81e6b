"""The Inter-Layer Adapter (ILA) of Rios et al., pure torch.

An ILA sits between two transformer blocks. Its spatial branch ("SDS") squeezes every token to r
channels, runs a depthwise conv over the patch grid, and expands back. Its residual branch either
passes the tokens through (same-resolution ILA) or shrinks the patch grid with a valid depthwise conv
(down-sampling ILA, DS-ILA), so that every later block attends over fewer tokens: that is where ILA
saves compute. Prefix tokens (CLS, shallow prompts, registers) never enter the spatial conv; their
count is passed in, never guessed from whether the token count is a square (and may be 0: SigLIP).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def xavier_linear_(m: nn.Linear) -> None:
    """The reference's init for every Linear: xavier-uniform weight, tiny normal bias."""
    nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
        nn.init.normal_(m.bias, std=1e-6)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask costs a quarter of the random draws.

    On a CPU, drawing one Bernoulli sample per element is the single most expensive elementwise op of
    a frozen-ViT training step (13 % of a ViT-B/16 ILA++ bf16 step). Here one 32-bit draw gives two
    15-bit uniforms, compared against round(p * 2^15): the drop rate is p to within 2^-16. On other
    devices this is ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16)[:n] & 0x7FFF
        keep = (bits >= round(self.p * 32768)).view(x.shape)
        scale = 1.0 / (1.0 - self.p)
        if x.dtype == torch.float32:  # scale folded into the mask: one multiply forward and backward
            return x * keep.to(x.dtype).mul_(scale)
        return x * keep.to(x.dtype) * scale  # bf16 cannot hold the scale exactly; x * scale rounds once


class TokenNorm(nn.Module):
    """Normalise (B, C, N) or (B, C, H, W) over channels: BatchNorm, LayerNorm or nothing."""

    def __init__(self, kind: str, channels: int, spatial: bool):
        super().__init__()
        self.kind = kind
        if kind == "bn":
            self.norm = nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
        elif kind == "ln":
            self.norm = nn.GroupNorm(1, channels) if spatial else nn.LayerNorm(channels)
        else:
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "ln" and x.dim() == 3:
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


class ILA(nn.Module):
    """Inter-layer adapter. ``downsample=True`` uses valid convolutions and shrinks the grid.

    Input (B, P + H*W, D) with P prefix tokens; output (B, P + H'*W', D) where H' = H - (k - 1) when
    down-sampling and H' = H otherwise.
    """

    def __init__(
        self,
        dim: int,
        r: int = 8,
        *,
        downsample: bool,
        kernel_size: int = 3,
        norm: str = "bn",
        cls_conv: bool = True,
        residual_init: str = "near_ones",
        dws_mult: int = 1,
        drop: float = 0.1,
    ):
        super().__init__()
        self.downsample = downsample
        self.kernel_size = kernel_size
        pad = 0 if downsample else kernel_size // 2
        self.down = nn.Linear(dim, r)
        self.norm1 = TokenNorm(norm, r, spatial=False)
        self.dw = nn.Conv2d(r, r * dws_mult, kernel_size, padding=pad, groups=r)
        self.norm2 = TokenNorm(norm, r * dws_mult, spatial=True)
        self.pw = nn.Conv2d(r * dws_mult, r, 1)
        self.cls_conv = nn.Conv2d(r, r, 1) if cls_conv else None
        self.norm3 = TokenNorm(norm, r, spatial=False)
        self.up = nn.Linear(r, dim)
        self.act = nn.GELU()
        self.drop = Dropout(drop)
        # Down-sampling residual: a per-channel valid conv over the patch grid, no bias.
        self.ds_conv = nn.Conv2d(dim, dim, kernel_size, groups=dim, bias=False) if downsample else None
        self.residual_init = residual_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        xavier_linear_(self.down)
        xavier_linear_(self.up)
        for conv in (self.dw, self.pw, self.cls_conv):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
        if self.ds_conv is not None:
            if self.residual_init == "near_ones":
                nn.init.normal_(self.ds_conv.weight, mean=1.0, std=0.001)
            elif self.residual_init == "ones":
                nn.init.ones_(self.ds_conv.weight)
            else:
                nn.init.xavier_uniform_(self.ds_conv.weight)

    def out_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        shrink = self.kernel_size - 1 if self.downsample else 0
        return grid[0] - shrink, grid[1] - shrink

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        B, N, D = x.shape
        H, W = grid
        Ho, Wo = self.out_grid(grid)
        # Spatial branch.
        h = self.down(x).transpose(1, 2)                      # (B, r, N)
        h = self.act(self.norm1(h))
        r = h.shape[1]
        hp = h[:, :, num_prefix:].reshape(B, r, H, W)          # (B, r, H, W)
        hp = self.pw(self.act(self.norm2(self.dw(hp))))       # (B, r, Ho, Wo)
        hp = hp.flatten(2)                                    # (B, r, Ho*Wo)
        hc = h[:, :, :num_prefix]                             # (B, r, P)
        if self.cls_conv is not None and num_prefix:
            hc = self.cls_conv(hc.unsqueeze(-1)).squeeze(-1)  # each prefix token as a 1x1 map
        h = torch.cat([hc, hp], dim=2)                        # (B, r, P + Ho*Wo)
        h = self.act(self.norm3(h)).transpose(1, 2)           # (B, P + Ho*Wo, r)
        h = self.up(h)                                        # (B, P + Ho*Wo, D)
        # Residual branch.
        if self.ds_conv is not None:
            patches = x[:, num_prefix:].transpose(1, 2).reshape(B, D, H, W)  # (B, D, H, W)
            patches = self.ds_conv(patches).flatten(2).transpose(1, 2)       # (B, Ho*Wo, D)
            res = torch.cat([x[:, :num_prefix], patches], dim=1)
        else:
            res = x
        return res + self.drop(h)


def prompt_init_bound(patch: int, dim: int, in_chans: int = 3) -> float:
    """VPT's uniform init bound sqrt(6 / (in_chans * patch^2 + D))."""
    return math.sqrt(6.0 / (in_chans * patch * patch + dim))


__all__ = ["ILA", "Dropout", "TokenNorm", "prompt_init_bound", "xavier_linear_"]
