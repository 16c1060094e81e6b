"""Per-block statistics of a ViT's features and attention, gathered in one pass over a dataset.

- Feature norm and pairwise distance (the reference's ``compute_feature_metrics``): each block's
  output is reduced to its CLS/register tokens plus the patch grid average-pooled to 7 x 7; the mean
  L2 norm of those tokens, and the mean L2 distance between any two of them in a minibatch (across
  images and positions). Grids smaller than 7 on a side are kept at their size rather than
  up-sampled, which would only duplicate tokens: the statistics are per token, so they stay
  comparable between blocks of different grid sizes.
- Mean attention distance per block and head, in input pixels (Dosovitskiy et al.): for each patch
  query, the attention-weighted distance to the patch keys, with prefix (CLS, prompt) rows and columns
  left out and the remaining weights renormalised. A valid convolution keeps one patch between
  neighbouring tokens, so after a DS-ILA the token spacing is still the backbone's patch size.
- Attention entropy per block and head (nats, over all S keys of every query), and the same divided
  by log S, which is what can be compared between blocks that attend over different token counts.

A block's output is the sequence that the next block receives (after any ILA that follows it) and,
for the last block, the sequence entering the final LayerNorm: the lengths in ``model.tokens_per_block``.
It comes from ``forward_intermediates`` in the same pass as the attention maps (its ``tap``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DatasetError
from .cka import MIN_BATCH, MinibatchCKA, cka_summary

POOL = 7


@dataclass
class Collected:
    """One forward pass: logits (B, C), attention per block (B, heads, S_i, S_i), output per block (B, T_i, D)."""

    logits: torch.Tensor
    attention: list[torch.Tensor]
    tokens: list[torch.Tensor]


@torch.no_grad()
def forward_collect(model: nn.Module, x: torch.Tensor) -> Collected:
    """Run a :class:`~ufgir_cli.model.vit.UfgirViT` (eval mode) once, keeping logits, attention and block outputs."""
    if model.training:
        raise RuntimeError("forward_collect() needs eval mode: call model.eval() first")
    probs: list[torch.Tensor] = []
    final, inter = model.forward_intermediates(x, return_prefix_tokens=True, tap=lambda a, _: probs.append(a))
    tokens = [torch.cat([prefix, patches], dim=1) for patches, prefix in inter]  # (B, T_i, D) each
    if not model.method.single_pass:  # it selects or crops by itself: more passes than this one
        return Collected(model(x), probs, tokens)
    return Collected(model.forward_head(final, intermediates=tokens), probs, tokens)


def output_grids(model: nn.Module) -> list[tuple[int, int]]:
    """Patch grid of each block's output (after the ILA that follows it, if any)."""
    return [b.out_grid for b in model.feature_info]


def pooled_tokens(tokens: torch.Tensor, grid: tuple[int, int], num_cls: int, size: int = POOL) -> torch.Tensor:
    """(B, T, D) block output -> (B, num_cls + h*w, D): CLS/register tokens + the patch grid pooled to h x w.

    The patches are the last H*W tokens (prompts, if any, sit between prefix and patches and are left
    out); h, w = min(size, H), min(size, W).
    """
    B, _, D = tokens.shape
    H, W = grid
    patches = tokens[:, tokens.shape[1] - H * W :]                              # (B, H*W, D)
    g = patches.transpose(1, 2).reshape(B, D, H, W)                             # (B, D, H, W)
    g = F.adaptive_avg_pool2d(g, (min(size, H), min(size, W)))                  # (B, D, h, w)
    g = g.flatten(2).transpose(1, 2)                                            # (B, h*w, D)
    return torch.cat([tokens[:, :num_cls], g], dim=1)                           # (B, num_cls + h*w, D)


def patch_distances(grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """(H*W, H*W) Euclidean distance in pixels between patch centres of a grid with this patch size."""
    H, W = grid
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")    # (H, W) each
    xy = torch.stack([ii.flatten() * patch[0], jj.flatten() * patch[1]], dim=1).to(torch.float64)  # (H*W, 2)
    return torch.cdist(xy, xy)


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """(B, heads, S, S) attention -> (B, heads) mean attention distance in pixels, patch tokens only."""
    N = grid[0] * grid[1]
    a = attn[..., -N:, -N:]                                                     # (B, heads, N, N): patches only
    d = patch_distances(grid, patch).to(a.device, a.dtype)                      # (N, N)
    weighted = torch.einsum("bhqk,qk->bhq", a, d)                               # (B, heads, N)
    mass = a.sum(dim=-1).clamp_min(torch.finfo(a.dtype).tiny)                   # (B, heads, N): weight on patches
    return (weighted / mass).to(torch.float64).mean(dim=-1)


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, S) attention -> (B, heads) mean entropy (nats) of the query rows; 0 log 0 = 0."""
    return torch.special.entr(attn).sum(dim=-1).to(torch.float64).mean(dim=-1)  # (B, heads)


class FeatureMetrics:
    """Accumulates the per-block statistics over minibatches; :meth:`compute` returns plain lists.

    Norms, attention distance and entropy are means over every image (and token/query); the pairwise
    distance is a mean over the pairs inside each minibatch, averaged over minibatches as the reference
    does.
    """

    def __init__(self, grids: list[tuple[int, int]], out_grids: list[tuple[int, int]], num_cls: int,
                 patch: tuple[int, int], heads: int):
        self.grids, self.out_grids, self.num_cls, self.patch = grids, out_grids, num_cls, patch
        L = len(grids)
        self.images = 0
        self.minibatches = 0
        self.norm_sum = torch.zeros(L, dtype=torch.float64)
        self.norm_count = torch.zeros(L, dtype=torch.float64)
        self.dist_sum = torch.zeros(L, dtype=torch.float64)
        self.dist_batches = torch.zeros(L, dtype=torch.float64)
        self.attn_dist_sum = torch.zeros(L, heads, dtype=torch.float64)
        self.entropy_sum = torch.zeros(L, heads, dtype=torch.float64)
        self.seq_len = torch.zeros(L, dtype=torch.float64)

    def update(self, attention: list[torch.Tensor], tokens: list[torch.Tensor]) -> None:
        self.images += attention[0].shape[0]
        self.minibatches += 1
        for i, (attn, out) in enumerate(zip(attention, tokens, strict=True)):
            pooled = pooled_tokens(out, self.out_grids[i], self.num_cls).to(torch.float64)
            rows = pooled.reshape(-1, pooled.shape[-1])                             # (B*T, D)
            self.norm_sum[i] += rows.norm(dim=1).sum().cpu()
            self.norm_count[i] += rows.shape[0]
            n = rows.shape[0]
            if n > 1:  # mean over the n(n-1) ordered pairs; the zero diagonal adds nothing to the sum
                self.dist_sum[i] += (torch.cdist(rows, rows).sum() / (n * (n - 1))).cpu()
                self.dist_batches[i] += 1
            self.attn_dist_sum[i] += attention_distance(attn, self.grids[i], self.patch).sum(dim=0).cpu()  # (heads,)
            self.entropy_sum[i] += attention_entropy(attn).sum(dim=0).cpu()                             # (heads,)
            self.seq_len[i] = attn.shape[-1]

    def compute(self) -> dict:
        if not self.images:
            raise ValueError("no minibatch was added")
        attn_dist = self.attn_dist_sum / self.images                                   # (L, heads)
        entropy = self.entropy_sum / self.images                                       # (L, heads)
        return {
            "feature_norm": (self.norm_sum / self.norm_count).tolist(),
            "pairwise_distance": (self.dist_sum / self.dist_batches.clamp_min(1)).tolist(),
            "attention_distance_px": attn_dist.tolist(),
            "attention_distance_px_mean": attn_dist.mean(dim=1).tolist(),
            "attention_entropy": entropy.tolist(),
            "attention_entropy_mean": entropy.mean(dim=1).tolist(),
            "attention_entropy_normalized_mean": (entropy.mean(dim=1) / self.seq_len.log()).tolist(),
            "pooled_grid": [[min(POOL, g[0]), min(POOL, g[1])] for g in self.out_grids],
            "images": self.images,
            "minibatches": self.minibatches,
        }


def analyse_batches(model: nn.Module, batches: Iterable[torch.Tensor], *, cka: bool = True, features: bool = True,
                    max_batches: int | None = None, on_batch: Callable[[int], None] | None = None) -> dict:
    """Attention CKA and/or feature statistics of ``model`` (eval mode) over normalised (B, 3, S, S) batches.

    Returns ``{"attention_cka": {...}, "features": {...}}`` (only the groups asked for) as plain
    Python values; a CKA matrix entry that is undefined is None.
    """
    vit = model.vit
    patch = tuple(vit.patch_embed.patch_size)
    acc_cka = MinibatchCKA() if cka else None
    info = model.feature_info
    acc_feat = (FeatureMetrics([b.grid for b in info], [b.out_grid for b in info], vit.num_prefix_tokens, patch,
                               heads=vit.blocks[0].attn.num_heads) if features else None)
    for n, x in enumerate(batches):
        if max_batches is not None and n >= max_batches:
            break
        out = forward_collect(model, x)
        if acc_cka is not None:
            acc_cka.update(out.attention)
        if acc_feat is not None:
            acc_feat.update(out.attention, out.tokens)
        if on_batch is not None:
            on_batch(x.shape[0])
    result: dict = {}
    if acc_cka is not None:
        if not acc_cka.minibatches:
            raise DatasetError(
                f"attention CKA needs a minibatch of at least {MIN_BATCH} images, got minibatches of "
                f"{acc_cka.skipped}; use a larger --batch-size or split, or pass --no-attention-cka"
            )
        matrix = acc_cka.compute()
        result["attention_cka"] = {
            "matrix": [[v if v == v else None for v in row] for row in matrix.tolist()],
            **cka_summary(matrix),
            "minibatches": acc_cka.minibatches,
            "images": acc_cka.images,
            "skipped_minibatch_sizes": acc_cka.skipped,
        }
    if acc_feat is not None:
        result["features"] = acc_feat.compute()
    return result


__all__ = ["POOL", "Collected", "FeatureMetrics", "analyse_batches", "attention_distance", "attention_entropy",
           "forward_collect", "output_grids", "patch_distances", "pooled_tokens"]
