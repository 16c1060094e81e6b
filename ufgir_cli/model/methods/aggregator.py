"""TransFG and FFVT (reference/FGIR.md §2, §3): tokens picked from the backbone's attention, into
one more transformer block whose CLS token is classified.

TransFG (part selection, ``psm``): per head, the argmax of the CLS row of the product of every
block's attention maps, gathered from the last block's output. FFVT (mutual attention weight
selection, ``maws``): per block, the 12 tokens that attend most to the CLS token and that it attends to
most, gathered from that block's output. Scores and selection run in float32 whatever the autocast
(fp16 ties move a selection).
"""

from __future__ import annotations

import torch
from torch import nn

from ...methods import MethodSpec
from ...recipe import ModelConfig
from ..attention import cls_row_through
from ..backbone import new_block_like
from ..ila import xavier_linear_
from ..precision import float32_region
from .base import Method, Selection


class AggregatorHead(nn.Module):
    """TransFG's, FFVT's and GLSim's head: one more transformer block (random init, never the backbone's
    last) over the CLS token and the selected tokens, a LayerNorm, and a zero-initialised Linear on the CLS.

    ``own_norm``: FFVT's and GLSim's LayerNorm is new and trains; TransFG's is the backbone's final
    norm (frozen), passed to ``forward``."""

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


def psm_scores(maps: list[torch.Tensor], row0_chain: bool = False) -> torch.Tensor:
    """TransFG's part selection: per head, the CLS row of the product of every block's attention,
    A_L-1 ... A_0, with no identity and no renormalisation, over the patch columns.
    (B, heads, S, S) maps -> (B, heads, S - 1) scores, in float32. The full product costs 58 GMACs for
    ViT-B/16 at 448 px; ``row0_chain`` (see `cls_row_through`) a fraction of that."""
    return cls_row_through([a.float() for a in maps], row0_chain)


def maws_scores(cls_rows: torch.Tensor, key0_logits: torch.Tensor) -> torch.Tensor:
    """FFVT's mutual attention weight selection for one block: how much each token attends to the CLS
    token (the pre-softmax key-0 column, softmaxed over the queries) times how much the CLS token
    attends to it (the CLS row of the attention), both averaged over heads. (B, heads, S) CLS rows and
    (B, heads, S) key-0 logits -> (B, S), over every position, the CLS itself included; in float32."""
    contribution = key0_logits.float().softmax(dim=-1).mean(dim=1)           # (B, S)
    weight = cls_rows.float().mean(dim=1)                                     # (B, S)
    return contribution * weight


def _no_registers(scores: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, S) scores over the CLS token, ``num_prefix - 1`` registers and the patches, with the registers
    ruled out of a top-k (a register is never a selection candidate)."""
    if num_prefix <= 1:
        return scores
    return torch.cat([scores[:, :1], torch.full_like(scores[:, 1:num_prefix], float("-inf")), scores[:, num_prefix:]], dim=1)


class _Aggregator(Method):
    """Select tokens in one pass, then the aggregator block: ``model(x)`` only. A subclass gives
    ``select_tokens(model, x)``: the aggregator's input, (B, 1 + K, D) (the last block's CLS token and
    the K selected tokens), and the selected indices into the blocks' tokens."""

    single_pass = False
    timm_head = False
    own_norm = False
    upstream_head_keys = (("head.", "head.fc."),)

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.eps = cfg.layer_norm_eps or 1e-6

    def build_head(self, vit, num_classes):
        return AggregatorHead(new_block_like(vit, self.eps), vit.embed_dim, num_classes, self.eps, own_norm=self.own_norm)

    def pools_cls(self, model) -> bool:
        return False

    def forward_head(self, model, x, pre_logits=False, intermediates=None):
        raise ValueError(f"the {self.name} head reads what it selects from attention: call model(x)")

    def forward(self, model, x, eval_mode=None):
        self._mode(eval_mode)
        return model.head(self.select_tokens(model, x)[0], model.vit.norm, model.drop)


class TransFG(_Aggregator):
    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.row0_chain = cfg.row0_chain

    def select_tokens(self, model, x):
        """K = heads tokens, indices (B, heads) into the last block's tokens (P = the first patch, past
        the CLS token and any registers, which are never picked)."""
        maps: list[torch.Tensor] = []
        last, _ = model.encode(x, tap=lambda a, _: maps.append(a))
        D, P = last.shape[-1], model.num_prefix_tokens
        with float32_region(last):
            scores = psm_scores(maps, row0_chain=self.row0_chain)[..., P - 1:]     # (B, heads, HW): patches only
            idx = scores.argmax(dim=-1) + P                                           # (B, heads)
            picked = last.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))              # (B, heads, D)
        return torch.cat([last[:, :1], picked], dim=1), idx                           # (B, 1 + heads, D)

    def select(self, model, x):
        _, idx = self.select_tokens(model, x)
        return Selection("one token per head (attention product)", model.feature_info[-1].out_grid,
                         patches=[i - model.num_prefix_tokens for i in idx])


class FFVT(_Aggregator):
    own_norm = True

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.tokens = cfg.maws_tokens

    def select_tokens(self, model, x):
        """K = 12 x blocks tokens, indices (blocks, B, 12) into each block's tokens (0 = the CLS token,
        which may be picked, as the reference does; registers never are)."""
        sel: list[tuple[torch.Tensor, torch.Tensor]] = []  # per block: its CLS rows and key-0 logits
        last, outputs = model.encode(x, frozenset(range(len(model.vit.blocks))),
                                     tap=lambda a, key0: sel.append((a[:, :, 0], key0)), tap_key0=True)
        D = last.shape[-1]
        with float32_region(last):
            idx = torch.stack([_no_registers(maws_scores(rows, key0), model.num_prefix_tokens)
                               .topk(self.tokens, dim=-1).indices for rows, key0 in sel])  # (blocks, B, K)
            parts = [out.gather(1, i.unsqueeze(-1).expand(-1, -1, D)) for out, i in zip(outputs, idx, strict=True)]
        return torch.cat([last[:, :1], *parts], dim=1), idx                           # (B, 1 + K, D)

    def select(self, model, x):
        _, idx = self.select_tokens(model, x)
        P = model.num_prefix_tokens
        patches = [idx[:, b][idx[:, b] >= P] - P for b in range(idx.shape[1])]        # per image, CLS left out
        return Selection(f"{idx.shape[-1]} tokens from each of {idx.shape[0]} blocks (mutual attention)",
                         model.feature_info[-1].out_grid, patches=patches)


__all__ = ["AggregatorHead", "FFVT", "TransFG", "maws_scores", "psm_scores"]
