"""Attention CKA: how similar the attention of every pair of blocks is, over a dataset.

The estimator is the minibatch one of the reference (reference/ILA.md, section 6; Nguyen et al.,
"Do wide and deep networks learn the same things?"): per minibatch of n images, each block's maps are
flattened per image into X in R^{n x d}, K = X X^T with its diagonal zeroed, and the unbiased HSIC

    HSIC(K, L) = [tr(KL) + (1^T K 1)(1^T L 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K L 1] / (n(n-3))

is computed for every pair of blocks. The three HSIC terms of the ratio are averaged over
minibatches first, then CKA_ij = HSIC(K_i, K_j) / sqrt(HSIC(K_i, K_i) HSIC(K_j, K_j)): a ratio of
averages, not an average of per-batch CKAs.

Two defects of the reference are avoided. Everything is float64: attention Gram entries are nearly
equal, the terms cancel by factors up to ~1e6, and float32 makes the matrix wrong by up to 0.03 and
asymmetric. A minibatch with fewer than 4 images (the formula divides by n - 3) is left out and
recorded instead of dividing by zero. Blocks in different encoder groups attend over different
lengths S; that is fine because only the n x n Gram matrices are compared.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_BATCH = 4
# Features are moved to float64 in column chunks of this many values per image, so that a batch of
# 448 px ViT-B attention maps (12 x 785 x 785 per image) never needs a full float64 copy.
_CHUNK = 1 << 20


def gram(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) features -> (n, n) float64 Gram matrix of the per-image flattened features, diagonal zeroed."""
    x = x.reshape(x.shape[0], -1)                                   # (n, d)
    n = x.shape[0]
    k = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for chunk in x.split(_CHUNK, dim=1):
        c = chunk.to(torch.float64)                                 # (n, <=_CHUNK)
        k += c @ c.T
    k.fill_diagonal_(0.0)
    return k


def hsic_matrix(grams: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC between every pair of (L, n, n) zero-diagonal Gram matrices -> (L, L) float64.

    tr(K_i K_j) = <K_i, K_j> (Gram matrices are symmetric), 1^T K 1 is the total sum and
    1^T K_i K_j 1 = (K_i 1) . (K_j 1), so all L^2 pairs are three small matrix products.
    """
    L, n, _ = grams.shape
    if n < MIN_BATCH:
        raise ValueError(f"unbiased HSIC needs n >= {MIN_BATCH} images per minibatch, got {n}")
    flat = grams.reshape(L, n * n)                                  # (L, n*n)
    trace = flat @ flat.T                                           # (L, L): tr(K_i K_j)
    total = grams.sum(dim=(1, 2))                                   # (L,): 1^T K_i 1
    rows = grams.sum(dim=2)                                         # (L, n): K_i 1
    h = trace + torch.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows @ rows.T)
    h = h / (n * (n - 3))
    return (h + h.T) / 2  # exact symmetry; the products above agree to rounding only


class MinibatchCKA:
    """Accumulates the minibatch HSIC terms of L blocks; :meth:`compute` gives the (L, L) CKA.

    ``update`` takes one tensor per block, each (n, ...) with the same n (the attention maps of a
    batch: (n, heads, S_i, S_i), S_i may differ between blocks).
    """

    def __init__(self) -> None:
        self.hsic_sum: torch.Tensor | None = None
        self.minibatches = 0
        self.images = 0
        self.skipped: list[int] = []  # sizes of the minibatches left out (n < 4)

    def update(self, features: Sequence[torch.Tensor]) -> bool:
        """Add one minibatch; returns False (and records its size) when it has fewer than 4 images."""
        sizes = {f.shape[0] for f in features}
        if len(sizes) != 1:
            raise ValueError(f"every block needs the same number of images in a minibatch, got {sorted(sizes)}")
        n = sizes.pop()
        if n < MIN_BATCH:
            self.skipped.append(n)
            return False
        h = hsic_matrix(torch.stack([gram(f) for f in features]))   # (L, L)
        if self.hsic_sum is None:
            self.hsic_sum = torch.zeros_like(h)
        elif self.hsic_sum.shape != h.shape:
            raise ValueError(f"minibatches disagree on the number of blocks: {self.hsic_sum.shape[0]} vs {h.shape[0]}")
        self.hsic_sum += h
        self.minibatches += 1
        self.images += n
        return True

    def compute(self) -> torch.Tensor:
        """(L, L) float64 CKA from the minibatch-averaged HSIC terms.

        An entry whose self-HSIC is not positive (a block whose maps do not vary between images, or
        an unbiased estimate that came out <= 0 on very few images) is NaN rather than a made-up number.
        """
        if self.hsic_sum is None:
            raise ValueError(f"no minibatch of at least {MIN_BATCH} images was added")
        h = self.hsic_sum / self.minibatches
        d = torch.diagonal(h)
        denom = torch.sqrt(torch.outer(d, d).clamp_min(0))
        return torch.where(denom > 0, h / denom, torch.full_like(h, float("nan")))


def cka_summary(cka: torch.Tensor) -> dict:
    """Mean off-diagonal CKA overall and per block (row), NaN entries ignored; None where undefined.

    High values mean blocks attend alike (the paper's "attention collapse" of a frozen ViT).
    """
    L = cka.shape[0]
    off = ~torch.eye(L, dtype=torch.bool, device=cka.device)
    vals = torch.where(off, cka, torch.full_like(cka, float("nan")))           # (L, L), diagonal masked
    per_block = vals.nanmean(dim=1) if L > 1 else torch.full((L,), float("nan"), dtype=cka.dtype)
    overall = vals[off].nanmean() if L > 1 else torch.tensor(float("nan"))
    return {
        "mean_offdiag": _finite_or_none(float(overall)),
        "mean_offdiag_per_block": [_finite_or_none(float(v)) for v in per_block],
    }


def _finite_or_none(v: float) -> float | None:
    return v if v == v and abs(v) != float("inf") else None


__all__ = ["MIN_BATCH", "MinibatchCKA", "cka_summary", "gram", "hsic_matrix"]
