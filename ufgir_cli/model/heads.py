"""Classifier heads of the paper's single-pass comparison methods (reference/FGIR.md §5, §6, §8b), pure torch.

Each head reads a different part of the backbone, which is why they are not one Linear on the CLS token:

- :class:`IFAHead` mixes the CLS token of every block (no final LayerNorm anywhere);
- :class:`MPNCovHead` pools the patch tokens by their covariance, square-rooted by Newton-Schulz (no CLS);
- :class:`VQTHead` reads every block's query-only prompt rows (UfgirViT runs them) plus the normed CLS;
- CAL's :class:`~.cal.WSDANHead` pools the patch tokens under its attention maps (``model/cal.py``).

Inits follow the reference: every Linear xavier-uniform with a tiny normal bias, the conv kaiming
(fan_out). Numerics that the reference runs in float32 (covariance, matrix square root) run in float32
here under autocast too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import method_spec
from .backbone import new_block_like
from .cal import WSDANHead
from .ila import xavier_linear_
from .precision import float32_region


class IFAHead(nn.Module):
    """Intermediate-features aggregation: a learned weighted sum of the ``depth`` per-block CLS tokens
    (Linear(depth -> 1) across blocks), ReLU, LayerNorm, Linear to the classes."""

    def __init__(self, depth: int, dim: int, num_classes: int, eps: float = 1e-12):
        super().__init__()
        self.mix = nn.Linear(depth, 1)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)
        xavier_linear_(self.mix)
        xavier_linear_(self.fc)

    def forward(self, cls_per_block: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``cls_per_block`` (B, depth, D) -> logits (B, C)."""
        x = self.mix(cls_per_block.transpose(1, 2)).squeeze(-1)            # (B, D, depth) -> (B, D)
        x = self.norm(F.relu(x))
        return x if pre_logits else self.fc(x)


def isqrt_newton_schulz(a: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Approximate square root of SPD matrices (B, d, d) by ``iterations`` coupled Newton-Schulz steps
    on the trace-normalised matrix, as iSQRT-COV does. Five steps are about 20 % off the true square
    root: the method is defined by these steps, not by ``eigh``."""
    d = a.shape[-1]
    eye3 = 3.0 * torch.eye(d, dtype=a.dtype, device=a.device)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1)             # (B, 1, 1)
    a = a / trace
    t = 0.5 * (eye3 - a)
    y, z = a @ t, t
    for _ in range(iterations - 2):
        t = 0.5 * (eye3 - z @ y)
        y, z = y @ t, t @ z
    return 0.5 * y @ (eye3 - z @ y) * trace.sqrt()


def upper_triangle(m: torch.Tensor) -> torch.Tensor:
    """(B, d, d) -> (B, d(d+1)/2): the upper triangle with the diagonal, row by row."""
    rows, cols = torch.triu_indices(m.shape[-1], m.shape[-1], device=m.device)
    return m[:, rows, cols]


class MPNCovHead(nn.Module):
    """Matrix power normalised covariance pooling: 1x1 conv + BN + ReLU to ``proj`` channels, centred
    covariance over the grid positions, iSQRT, upper triangle (row-major, with the diagonal), Linear."""

    def __init__(self, dim: int, num_classes: int, proj: int = 64, iterations: int = 5):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(dim, proj, 1, bias=False), nn.BatchNorm2d(proj), nn.ReLU(inplace=True))
        self.iterations = iterations
        self.fc = nn.Linear(proj * (proj + 1) // 2, num_classes)
        nn.init.kaiming_normal_(self.reduce[0].weight, mode="fan_out", nonlinearity="relu")
        xavier_linear_(self.fc)

    def pool(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, N, D) on ``grid`` -> the pooled vector (B, proj*(proj+1)/2), in float32."""
        B, N, D = tokens.shape
        x = tokens.transpose(1, 2).reshape(B, D, *grid)                     # (B, D, h, w): token n at (n // w, n % w)
        x = self.reduce(x).flatten(2).float()                               # (B, proj, M)
        with float32_region(x):
            x = x - x.mean(dim=2, keepdim=True)
            cov = x @ x.transpose(1, 2) / x.shape[2]                        # (B, proj, proj)
            root = isqrt_newton_schulz(cov, self.iterations)
            return upper_triangle(root)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(tokens, grid)
        return x if pre_logits else self.fc(x.to(self.fc.weight.dtype))


class VQTHead(nn.Module):
    """Visual query tuning's head: each block's prompt rows flattened token-major and L2-normalised as
    one vector, then the L2-normalised CLS after the final norm, all into one Linear."""

    def __init__(self, depth: int, prompt_len: int, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim + depth * prompt_len * dim, num_classes)
        xavier_linear_(self.fc)

    def forward(self, prompt_rows: list[torch.Tensor], cls: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``prompt_rows``: per block (B, P, D); ``cls`` (B, D) after the final norm -> logits (B, C)."""
        parts = [F.normalize(p.flatten(1), dim=-1) for p in prompt_rows]    # (B, P*D) each, one norm per block
        x = torch.cat([*parts, F.normalize(cls, dim=-1)], dim=1)            # (B, L*P*D + D)
        return x if pre_logits else self.fc(x)


class AggregatorHead(nn.Module):
    """TransFG's and FFVT's head: one more transformer block (random init, never the backbone's last)
    over the CLS token and the selected tokens, a LayerNorm, and a zero-initialised Linear on the CLS.

    ``own_norm``: FFVT's LayerNorm is new and trains; TransFG's is the backbone's final norm (frozen),
    passed to ``forward``."""

    def __init__(self, block: nn.Module, dim: int, num_classes: int, eps: float, own_norm: bool):
        super().__init__()
        self.block = block
        self.norm = nn.LayerNorm(dim, eps=eps) if own_norm else None
        self.fc = nn.Linear(dim, num_classes)
        for m in self.block.modules():
            if isinstance(m, nn.Linear):
                xavier_linear_(m)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor, final_norm: nn.Module, drop: nn.Module,
                pre_logits: bool = False) -> torch.Tensor:
        """``tokens`` (B, 1 + K, D): the CLS token, then the K selected ones -> logits (B, C). The
        block's dropout sits on its branch outputs, as in the backbone's blocks (``drop``)."""
        blk = self.block
        x = tokens + blk.drop_path1(drop(blk.ls1(blk.attn(blk.norm1(tokens)))))
        x = x + blk.drop_path2(drop(blk.ls2(blk.mlp(blk.norm2(x)))))
        cls = (self.norm or final_norm)(x)[:, 0]                             # (B, D)
        return cls if pre_logits else self.fc(cls)


def rollout_factor(attn: torch.Tensor) -> torch.Tensor:
    """A head-fused attention map (..., S, S) -> its factor in attention rollout: identity added (the
    residual path), rows renormalised."""
    attn = attn + torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    return attn / attn.sum(dim=-1, keepdim=True)


def _cls_row_through(mats: list[torch.Tensor], row0_chain: bool) -> torch.Tensor:
    """Row 0 (the CLS query) of mats[-1] @ ... @ mats[0], over the patch columns: (..., S, S) -> (..., S - 1).
    ``row0_chain`` carries that row through the matrices (S^2 per block) instead of multiplying them
    (S^3 per block, what the reference computes): the same values up to float rounding."""
    m = mats[-1][..., :1, :] if row0_chain else mats[-1]
    for a in reversed(mats[:-1]):
        m = m @ a
    return m[..., 0, 1:]


def psm_scores(maps: list[torch.Tensor], row0_chain: bool = False) -> torch.Tensor:
    """TransFG's part selection: per head, the CLS row of the product of every block's attention,
    A_L-1 ... A_0, with no identity and no renormalisation, over the patch columns.
    (B, heads, S, S) maps -> (B, heads, S - 1) scores, in float32. The full product costs 58 GMACs for
    ViT-B/16 at 448 px; ``row0_chain`` (see `_cls_row_through`) a fraction of that."""
    return _cls_row_through([a.float() for a in maps], row0_chain)


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
    in float32; ``row0_chain`` as in `psm_scores`."""
    return _cls_row_through([rollout_factor(a.float().mean(dim=1)) for a in maps], row0_chain)


def glsim_scores(tokens: torch.Tensor, metric: str = "cos") -> tuple[torch.Tensor, bool]:
    """GLSim's global-local similarity of the CLS token to every patch token of the final normed
    tokens (B, 1 + N, D) -> ((B, N) scores, whether the largest are the most similar), in float32.
    ``cos``: cosine similarity; ``l1`` / ``l2``: mean absolute / squared difference (smallest wins)."""
    t = tokens.float()
    g, patches = t[:, :1], t[:, 1:]
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


def maws_scores(cls_rows: torch.Tensor, key0_logits: torch.Tensor) -> torch.Tensor:
    """FFVT's mutual attention weight selection for one block: how much each token attends to the CLS
    token (the pre-softmax key-0 column, softmaxed over the queries) times how much the CLS token
    attends to it (the CLS row of the attention), both averaged over heads. (B, heads, S) CLS rows and
    (B, heads, S) key-0 logits -> (B, S), over every position, the CLS itself included; in float32."""
    contribution = key0_logits.float().softmax(dim=-1).mean(dim=1)           # (B, S)
    weight = cls_rows.float().mean(dim=1)                                     # (B, S)
    return contribution * weight


def _ifa(vit: nn.Module, num_classes: int, cfg) -> nn.Module:
    return IFAHead(len(vit.blocks), vit.embed_dim, num_classes, eps=cfg.layer_norm_eps or 1e-6)


def _mpncov(vit: nn.Module, num_classes: int, cfg) -> nn.Module:
    return MPNCovHead(vit.embed_dim, num_classes, proj=cfg.cov_dim)


def _vqt(vit: nn.Module, num_classes: int, cfg) -> nn.Module:
    return VQTHead(len(vit.blocks), cfg.prompt_len, vit.embed_dim, num_classes)


def _aggregator(vit: nn.Module, num_classes: int, cfg) -> nn.Module:
    eps = cfg.layer_norm_eps or 1e-6
    return AggregatorHead(new_block_like(vit, eps), vit.embed_dim, num_classes, eps,
                          own_norm=method_spec(cfg.method).aggregator_norm)


def _avg_cls(vit: nn.Module, num_classes: int, cfg) -> nn.Module:
    return AvgClsHead(vit.embed_dim, num_classes)


def _cal(vit: nn.Module, num_classes: int, cfg) -> nn.Module:
    return WSDANHead(vit.embed_dim, num_classes, maps=cfg.cal_maps)


#: Head kind of the method table -> builder(timm backbone, num_classes, model config).
HEADS = {"ifa": _ifa, "mpncov": _mpncov, "vqt": _vqt, "aggregator": _aggregator, "avg_cls": _avg_cls, "cal": _cal}

__all__ = ["HEADS", "AggregatorHead", "AvgClsHead", "IFAHead", "crop_boxes", "crop_resize", "glsim_scores", "maws_scores",
           "psm_scores", "rollout_factor", "rollout_scores", "MPNCovHead", "VQTHead", "isqrt_newton_schulz", "upper_triangle"]
