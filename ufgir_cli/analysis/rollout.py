"""Attention rollout (Abnar & Zuidema, 2020) for ViTs whose token count shrinks between groups.

Within an encoder group (blocks a .. b-1 that attend over the same tokens) the reference's
``rollout_a_b`` is: fuse the heads, add the identity (the residual path), renormalise every row,
multiply the block matrices in order, take the CLS row without the prefix columns, reshape it to the
patch grid and min-max normalise (reference/ILA.md, section 6). ``attention_l`` is the fused CLS row of
one block.

Beyond the reference, :func:`rollout_across` carries the rollout through every down-sampling ILA. A
DS-ILA's k x k valid convolution makes output patch (i, j) a mix of input patches (i..i+k-1, j..j+k-1)
while prefix tokens pass through unchanged; that is the (N_out x N_in) row-normalised token map used
between groups, giving one map on the input patch grid for the whole network.

Only the CLS row of the product is needed, so it is propagated as a row vector from the last block
back to the first (r <- r A_{b-1} ... A_a): O(S^2) per block instead of the O(S^3) of forming the
matrix product, and cheap enough to run in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ..model.attention import rollout_factor

Fusion = Literal["mean", "max", "min"]
FUSIONS: tuple[str, ...] = ("mean", "max", "min")


def fuse_heads(attn: torch.Tensor, fusion: Fusion = "mean") -> torch.Tensor:
    """(B, heads, S, S) -> (B, S, S): mean, max or min over heads."""
    if fusion == "mean":
        return attn.mean(dim=1)
    if fusion == "max":
        return attn.amax(dim=1)
    if fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head fusion {fusion!r} is not one of {', '.join(FUSIONS)}")


def discard_lowest(a: torch.Tensor, ratio: float, keep: int = 0) -> torch.Tensor:
    """Zero the ``ratio`` fraction of smallest entries of each image's (S, S) matrix.

    The entry (keep, keep) (CLS to itself) is never dropped, as in the usual rollout implementations,
    so that a row cannot end up all zero before the identity is added.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard ratio {ratio} must be in [0, 1)")
    B, S, _ = a.shape
    k = int(S * S * ratio)
    if k == 0:
        return a
    flat = a.reshape(B, S * S).clone()                                      # (B, S*S)
    kept = flat[:, keep * S + keep].clone()
    lowest = flat.topk(k, dim=1, largest=False).indices                     # (B, k)
    flat.scatter_(1, lowest, 0.0)
    flat[:, keep * S + keep] = kept
    return flat.reshape(B, S, S)


def residual_attention(attn: torch.Tensor, fusion: Fusion = "mean", discard: float = 0.0) -> torch.Tensor:
    """One block's rollout factor: fuse heads, discard, add identity, renormalise rows -> (B, S, S) float64."""
    return rollout_factor(discard_lowest(fuse_heads(attn, fusion).to(torch.float64), discard))


def encoder_groups(grids: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs of consecutive blocks attending over the same patch grid, as (a, b) with b exclusive.

    With DS-ILA after blocks 3 and 7 of a 12-block ViT: [(0, 4), (4, 8), (8, 12)].
    """
    groups, start = [], 0
    key = [None if g is None else tuple(g) for g in grids]  # None: no grid (past a token reduction)
    for i in range(1, len(grids) + 1):
        if i == len(grids) or key[i] != key[start]:
            groups.append((start, i))
            start = i
    return groups


def parse_group(text: str, grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``"a-b"`` -> (a, b), checked to lie inside one encoder group of a model with these grids."""
    groups = encoder_groups(grids)
    names = ", ".join(f"{a}-{b}" for a, b in groups)
    try:
        a, b = (int(v) for v in text.split("-"))
    except ValueError:
        raise ValueError(f"group {text!r} is not of the form a-b (blocks a .. b-1); this model's groups: {names}") from None
    if not 0 <= a < b <= len(grids):
        raise ValueError(f"group {text!r} is outside blocks 0-{len(grids)}; this model's groups: {names}")
    if any(ga <= a and b <= gb for ga, gb in groups):
        return a, b
    raise ValueError(
        f"group {text!r} spans a down-sampling ILA (the token count changes inside it); "
        f"use one of {names} or rollout --across"
    )


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each (H, W) map of a (B, H, W) batch to [0, 1].

    A map whose values are all equal (to 1e-9 of its largest magnitude) has nothing that stands out
    and becomes all zeros instead of amplified rounding noise.
    """
    flat = maps.reshape(maps.shape[0], -1)                                  # (B, H*W)
    lo = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - lo
    scale = flat.abs().amax(dim=1, keepdim=True)
    flat_span = span <= 1e-9 * scale.clamp_min(torch.finfo(flat.dtype).tiny)
    out = torch.where(flat_span, torch.zeros_like(flat), (flat - lo) / torch.where(flat_span, 1.0, span))
    return out.reshape(maps.shape)


def grid_map(row: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, S) CLS row -> (B, H, W) min-max map of the patch columns (the last H*W; prefix columns dropped)."""
    H, W = grid
    return minmax(row[:, row.shape[1] - H * W :].reshape(row.shape[0], H, W))  # (B, H, W)


def _propagate(row: torch.Tensor, maps: Sequence[torch.Tensor], fusion: Fusion, discard: float) -> torch.Tensor:
    """row (B, S) times the rollout of ``maps`` (applied last block first) -> (B, S)."""
    for attn in reversed(maps):
        row = (row.unsqueeze(1) @ residual_attention(attn, fusion, discard)).squeeze(1)  # (B, S)
    return row


def _cls_row(attn: torch.Tensor, cls_index: int) -> torch.Tensor:
    B, _, S, _ = attn.shape
    row = torch.zeros(B, S, dtype=torch.float64, device=attn.device)       # (B, S)
    row[:, cls_index] = 1.0
    return row


def rollout(maps: Sequence[torch.Tensor], grid: tuple[int, int], fusion: Fusion = "mean",
            discard: float = 0.0, cls_index: int = 0) -> torch.Tensor:
    """Rollout over the (B, heads, S, S) maps of consecutive blocks of one group -> (B, H, W) in [0, 1]."""
    if not maps:
        raise ValueError("rollout needs the attention maps of at least one block")
    if len({tuple(m.shape[-2:]) for m in maps}) != 1:
        raise ValueError("rollout within a group needs blocks with the same token count; use rollout_across")
    return grid_map(_propagate(_cls_row(maps[-1], cls_index), maps, fusion, discard), grid)


def attention_l(attn: torch.Tensor, grid: tuple[int, int], fusion: Fusion = "mean", cls_index: int = 0) -> torch.Tensor:
    """The head-fused CLS row of one block's (B, heads, S, S) attention -> (B, H, W) in [0, 1]."""
    return grid_map(fuse_heads(attn, fusion)[:, cls_index].to(torch.float64), grid)


def token_mixing_matrix(grid_in: tuple[int, int], kernel: int, num_prefix: int) -> torch.Tensor:
    """The token map of a k x k valid convolution: (P + H'W') x (P + HW), rows summing to 1, float64.

    Output patch (i, j) takes 1/k^2 from each input patch (i + di, j + dj), 0 <= di, dj < k; each of
    the P prefix tokens maps to itself.
    """
    H, W = grid_in
    Ho, Wo = H - kernel + 1, W - kernel + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"a {kernel}x{kernel} valid convolution does not fit a {H}x{W} grid")
    P = num_prefix
    m = torch.zeros(P + Ho * Wo, P + H * W, dtype=torch.float64)
    m[:P, :P] = torch.eye(P, dtype=torch.float64)
    i, j, di, dj = torch.meshgrid(torch.arange(Ho), torch.arange(Wo), torch.arange(kernel), torch.arange(kernel),
                                  indexing="ij")                             # each (Ho, Wo, k, k)
    rows = P + i * Wo + j
    cols = P + (i + di) * W + (j + dj)
    m[rows.flatten(), cols.flatten()] = 1.0 / kernel**2
    return m


def rollout_across(maps: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], kernels: Mapping[int, int],
                   fusion: Fusion = "mean", discard: float = 0.0, cls_index: int = 0) -> torch.Tensor:
    """Rollout through all blocks, carried over each down-sampling ILA -> (B, H0, W0) on the input grid.

    ``maps``: every block's (B, heads, S_i, S_i) attention; ``grids``: the patch grid each block
    attends over; ``kernels``: kernel size of the down-sampling ILA after block i, for every block i
    that ends a group (except the last).
    """
    if len(maps) != len(grids):
        raise ValueError(f"{len(maps)} attention maps but {len(grids)} block grids")
    groups = encoder_groups(grids)
    row = _cls_row(maps[-1], cls_index)
    for n in range(len(groups) - 1, -1, -1):
        a, b = groups[n]
        row = _propagate(row, maps[a:b], fusion, discard)                 # (B, S_a)
        if n == 0:
            break
        last, first = a - 1, a  # the down-sampling ILA after block `last` feeds block `first`
        if last not in kernels:
            raise ValueError(f"the token count changes after block {last} but no down-sampling kernel is given for it")
        k = kernels[last]
        g_in, g_out = tuple(grids[last]), tuple(grids[first])
        if (g_in[0] - k + 1, g_in[1] - k + 1) != g_out:
            raise ValueError(f"a {k}x{k} valid convolution maps grid {g_in} to {g_in[0] - k + 1}x{g_in[1] - k + 1}, "
                             f"not to block {first}'s grid {g_out}")
        p_in = maps[last].shape[-1] - g_in[0] * g_in[1]
        p_out = maps[first].shape[-1] - g_out[0] * g_out[1]
        if p_in != p_out:
            raise ValueError(f"blocks {last} and {first} carry {p_in} and {p_out} prefix tokens; cannot map tokens")
        mix = token_mixing_matrix(g_in, k, p_in).to(row.device)           # (S_first, S_last)
        row = row @ mix                                                    # (B, S_last)
    return grid_map(row, tuple(grids[0]))


def downsample_kernels(model) -> dict[int, int]:
    """``rollout_across``'s ``kernels`` for a model: block -> kernel of the down-sampling ILA after it
    (read from ``model.feature_info``)."""
    return {b.index: b.ila_kernel for b in model.feature_info if b.ila == "down"}


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) maps in [0, 1] -> (B, H, W) by bilinear resizing (the patch grid covers the image)."""
    return F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)


__all__ = ["FUSIONS", "Fusion", "attention_l", "discard_lowest", "downsample_kernels", "encoder_groups", "fuse_heads", "grid_map",
           "minmax", "parse_group", "residual_attention", "rollout", "rollout_across", "token_mixing_matrix",
           "upsample"]
