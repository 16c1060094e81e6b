"""Single-pass methods with a head of their own (reference/FGIR.md §5, §6, §8b): IFA mixes the CLS
token of every block, MPN-COV pools the patch tokens by their covariance, VQT reads every block's
query-only prompt rows. Each head reads a different part of the backbone, which is why they are not
one Linear on the CLS token.

Inits follow the reference: every Linear xavier-uniform with a tiny normal bias, the conv kaiming
(fan_out). Numerics that the reference runs in float32 (covariance, matrix square root) run in
float32 here under autocast too.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...methods import MethodSpec
from ...recipe import ModelConfig
from ..ila import xavier_linear_
from ..precision import float32_region
from .base import Method


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


class _EveryBlock(Method):
    """A head that reads every block's output (IFA, VQT): ``model(x)`` collects them in its one pass;
    ``forward_head`` needs them passed as ``intermediates``."""

    timm_head = False
    reads_intermediates = True

    def forward(self, model, x: torch.Tensor, eval_mode: str | None = None) -> torch.Tensor:
        self._mode(eval_mode)
        cls_only = model.last_block_cls_only and model.cls_only_last_block
        last, inter = model.encode(x, frozenset(range(len(model.vit.blocks))), last_cls_only=cls_only)
        return model.forward_head(model.vit.norm(last), intermediates=inter + [last] if cls_only else inter)

    def _need(self, intermediates: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if intermediates is None:
            raise ValueError(f"the {self.name} head reads every block's output: call model(x), or pass "
                             "forward_head(x, intermediates=[each block's output tokens])")
        return intermediates


class IFA(_EveryBlock):
    upstream_head_keys = (("head.ifa_head.0.", "head.mix."), ("head.ifa_head.3.", "head.norm."),
                          ("head.ifa_head.4.", "head.fc."))

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.eps = cfg.layer_norm_eps or 1e-6

    def build_head(self, vit, num_classes):
        return IFAHead(len(vit.blocks), vit.embed_dim, num_classes, eps=self.eps)

    def pools_cls(self, model) -> bool:
        return getattr(model.vit, "attn_pool", None) is None  # every block's CLS row, the last one's included

    def forward_head(self, model, x, pre_logits=False, intermediates=None):
        inter = self._need(intermediates)
        return model.head(torch.stack([t[:, 0] for t in inter], dim=1), pre_logits)  # (B, depth, D)


class VQT(_EveryBlock):
    upstream_head_keys = (("head.head.", "head.fc."),)

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.prompt_len = cfg.prompt_len

    def build_head(self, vit, num_classes):
        return VQTHead(len(vit.blocks), self.prompt_len, vit.embed_dim, num_classes)

    def pools_cls(self, model) -> bool:
        return False

    def forward_head(self, model, x, pre_logits=False, intermediates=None):
        L = self.prompt_len  # the prompt rows of every block, then the normed CLS behind them
        return model.head([t[:, :L] for t in self._need(intermediates)], x[:, L], pre_logits)


class MPNCov(Method):
    timm_head = False
    upstream_head_keys = (("head.mpncov.conv_dr_block.", "head.reduce."), ("head.head.1.", "head.fc."))

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.cov_dim = cfg.cov_dim

    def build_head(self, vit, num_classes):
        return MPNCovHead(vit.embed_dim, num_classes, proj=self.cov_dim)

    def pools_cls(self, model) -> bool:
        return False

    def forward_head(self, model, x, pre_logits=False, intermediates=None):
        return model.head(x[:, model.num_prefix_tokens:], model.feature_info[-1].out_grid, pre_logits)

    @classmethod
    def upstream_settings(cls, config: argparse.Namespace) -> dict[str, Any]:
        return {"cov_dim": int(getattr(config, "class_proj_size", 64))}


__all__ = ["IFA", "IFAHead", "MPNCov", "MPNCovHead", "VQT", "VQTHead", "isqrt_newton_schulz", "upper_triangle"]
