"""timm's ``Eva`` class (EVA-02, DINOv3) under `UfgirViT`'s block loop: the :class:`EvaRunner`.

An ``Eva`` block differs from a ViT block inside, not in what the loop does around it:

- queries, keys and values come from one fused ``qkv`` Linear without bias plus the attention's own
  ``q_bias``/``v_bias`` (DINOv3, EVA-02 Ti/S), or from separate ``q_proj``/``k_proj``/``v_proj``
  (EVA-02 B/L); an inner ``attn.norm`` may sit before the output projection (it is applied by
  `attention.attend_heads`, as for any timm attention);
- positions are rotary: the normed queries and keys of the patch tokens are rotated by a table of
  (H*W, 2 * head_dim) sines and cosines, the prefix tokens (CLS, registers, prompts) are not;
- LayerScale is held as ``gamma_1``/``gamma_2`` (None without it); the MLP may be SwiGLU (called as is).

The rotary table of a block is the one of its grid: after k valid down-sampling ILAs of kernel K, an
output token is centred on the middle of its input window, so the table is the original grid's cropped
by k (K - 1) / 2 on each side, in the original coordinates (absolute indices for EVA-02, DINOv3's
normalised ones alike; `crop_table`). Nothing else of the loop changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from ..errors import RecipeError
from .attention import Rotate, attend_heads
from .backbone import stand_in_cls
from .runner import BlockRunner


def crop_table(table: torch.Tensor, base: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """A rotary table (H*W, C) of the ``base`` grid -> the one of the centred ``grid`` (h*w, C) that
    valid convolutions leave: rows [k:H-k, k:W-k], the same coordinates."""
    (H, W), (h, w) = base, grid
    if (H - h) % 2 or (W - w) % 2 or h > H or w > W:
        raise ValueError(f"grid {grid} is not a centred crop of {base}")
    kh, kw = (H - h) // 2, (W - w) // 2
    return table.reshape(H, W, -1)[kh:kh + h, kw:kw + w].reshape(h * w, -1)                # (h*w, C)


def rope_table(vit: Eva, grid: tuple[int, int]) -> torch.Tensor | None:
    """The rotary table (H*W, 2 * head_dim) of a block attending over ``grid``, as timm's ``_pos_embed``
    makes it for the input grid, cropped to ``grid`` (see the module docstring); None without rope."""
    rope = vit.rope
    if rope is None:
        return None
    base = tuple(vit.patch_embed.grid_size)
    if vit.dynamic_img_size or not hasattr(rope, "feat_shape"):
        table = rope.get_embed(shape=list(base))
    else:
        table = rope.get_embed()
    return table if tuple(grid) == base else crop_table(table, base, tuple(grid))


def _rotate_tail(t: torch.Tensor, table: torch.Tensor, half: bool) -> torch.Tensor:
    """Rotate the last H*W rows of ``t`` (B, heads, N, hd), those on the grid; the prefix rows stay."""
    n = table.shape[0]
    return torch.cat([t[:, :, :-n], apply_rot_embed_cat(t[:, :, -n:], table, half=half)], dim=2).type_as(t)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, _ = t.shape
    return t.reshape(B, N, heads, -1).transpose(1, 2)                                       # (B, heads, N, hd)


def project(attn: EvaAttention, x: torch.Tensor, query_rows: int | None = None) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, heads, N, hd) of ``x`` (B, N, D), as timm's ``EvaAttention`` projects them; with
    ``query_rows``, queries for the first rows alone. A plain fused Linear is applied by its weight (so
    that the query rows cost only theirs); a wrapped one (peft's LoRA, SSF) is called, its bias added."""
    nq = x.shape[1] if query_rows is None else query_rows
    h = attn.num_heads
    if attn.qkv is None:  # EVA-02 B/L: separate projections (token-wise, so the query rows alone)
        return _heads(attn.q_proj(x[:, :nq]), h), _heads(attn.k_proj(x), h), _heads(attn.v_proj(x), h)
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if type(attn.qkv) is nn.Linear and attn.qkv.bias is not None:  # a bias folded in (SSF's export)
        bias = attn.qkv.bias if bias is None else attn.qkv.bias + bias
    if type(attn.qkv) is nn.Linear and query_rows is None:
        qkv = F.linear(x, attn.qkv.weight, bias)                                            # (B, N, 3A)
    elif type(attn.qkv) is nn.Linear:
        A, w = attn.qkv.weight.shape[0] // 3, attn.qkv.weight
        q = F.linear(x[:, :nq], w[:A], None if bias is None else bias[:A])                   # (B, nq, A)
        kv = F.linear(x, w[A:], None if bias is None else bias[A:])                          # (B, N, 2A)
        return (_heads(q, h), *(_heads(t, h) for t in kv.chunk(2, dim=-1)))
    else:
        qkv = attn.qkv(x) if bias is None else attn.qkv(x) + bias                           # (B, N, 3A)
    q, k, v = (_heads(t, h) for t in qkv.chunk(3, dim=-1))
    return q[:, :, :nq], k, v


class EvaRunner(BlockRunner):
    """timm's ``Eva`` blocks (pre-norm ``EvaBlock`` with ``EvaAttention``): see the module docstring.
    Bound to its backbone, whose rotary module and input grid make each block's table."""

    reduces_tokens = False  # rotary tables per grid position; token reduction leaves no grid

    def __init__(self, vit: Eva):
        self.vit = vit

    def check(self, vit: nn.Module, backbone: str) -> None:
        why = None
        if getattr(vit, "rope_mixed", False):
            why = "its rotary table differs per block (rope_type 'mixed')"
        elif getattr(vit.rope, "aug_active", False):
            why = "its rotary coordinates are augmented in training (drawn once per forward by timm)"
        elif vit.patch_drop is not None:
            why = "it drops patches (patch_drop_rate)"
        for blk in vit.blocks:
            if type(blk) is not EvaBlock or type(blk.attn) is not EvaAttention:
                why = why or f"its blocks are {type(blk).__name__} with {type(blk.attn).__name__}, not pre-norm EvaBlock"
            elif blk.attn.gate is not None:
                why = why or "its attention is gated"
        if why:
            raise RecipeError(f"model.backbone {backbone!r}: ufgir runs timm's Eva class with pre-norm EvaBlocks and "
                              f"one rotary table, and {why}; choose an EVA-02 or DINOv3 backbone")

    def embed(self, vit: nn.Module, x: torch.Tensor, cls_token: torch.Tensor | None = None,
              suffix: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> the tokens entering block 0, as timm's ``Eva.forward_features`` makes them (the
        rotary table it also returns is taken per block, `rope_table`). No suffix tokens: CLCA's carrier
        token comes with token reduction, which Eva blocks do not run (``reduces_tokens``)."""
        if suffix is not None:
            raise ValueError("suffix tokens need token reduction, which timm's Eva blocks do not run here")
        x = vit.patch_embed(x)                                 # (B, HW, D), or (B, H, W, D): dynamic size
        x = vit._pos_embed(x)[0]                               # (B, prefix + HW, D)
        return vit.norm_pre(stand_in_cls(vit, x, cls_token))

    @staticmethod
    def _rotate(blk: EvaBlock, table: torch.Tensor | None, queries: bool = True) -> Rotate | None:
        """Rotation of the patch rows of queries (unless ``queries`` is False: the CLS row alone) and keys."""
        if table is None:
            return None
        half = blk.attn.rotate_half

        def rotate(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (_rotate_tail(q, table, half) if queries else q), _rotate_tail(k, table, half)

        return rotate

    def attention(self, blk: nn.Module, h: torch.Tensor, grid: tuple[int, int],
                  probs: list[torch.Tensor] | None = None, query_only: int = 0,
                  key0: list[torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = project(blk.attn, h)
        return attend_heads(blk.attn, q, k, v, probs, query_only, key0,
                            rotate=self._rotate(blk, rope_table(self.vit, grid)))

    def cls_attention(self, blk: nn.Module, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = project(blk.attn, h, query_rows=1)          # q: (B, heads, 1, hd), the CLS row: no rotation
        return attend_heads(blk.attn, q, k, v, rotate=self._rotate(blk, rope_table(self.vit, grid), False))

    def scale_attn(self, blk: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return a if blk.gamma_1 is None else blk.gamma_1 * a

    def scale_mlp(self, blk: nn.Module, m: torch.Tensor) -> torch.Tensor:
        return m if blk.gamma_2 is None else blk.gamma_2 * m


def block_runner(vit: nn.Module) -> BlockRunner:
    """The runner of a backbone's blocks, by its class: timm's ``Eva`` or a plain ``VisionTransformer``."""
    return EvaRunner(vit) if isinstance(vit, Eva) else BlockRunner()


__all__ = ["EvaRunner", "block_runner", "crop_table", "project", "rope_table"]
