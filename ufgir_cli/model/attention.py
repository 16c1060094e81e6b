"""Attention for timm ``Attention`` modules, run by UfgirViT's own block loop. Pure torch.

Why not timm's forward: the maps must be available on request (attention rollout, CKA), the last
block can run for the CLS query alone, and the CPU bf16 training path differs (see `_attend`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: Rotates the (normed) queries and keys by their positions (a rope backbone's; see ``model/eva.py``).
Rotate = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def explicit_is_faster(q: torch.Tensor) -> bool:
    """Whether attention over queries ``q`` should take the explicit path although nothing asks for the
    maps: bf16 training on a CPU, where the flash-attention backward is about 2.7x slower than two bf16
    matmuls (ViT-B/16, batch 8, measured)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            probs: list[torch.Tensor] | None, key0: list[torch.Tensor] | None = None,
            rotate: Rotate | None = None) -> torch.Tensor:
    """Softmax attention over (B, heads, N, hd) tensors: fused SDPA, or the explicit path when
    ``probs`` asks for the maps (the one place they are taken; see the ``tap`` of ``UfgirViT.encode``),
    or when it is the faster one (:func:`explicit_is_faster`: CPU bf16 training); the forward and every
    other device/precision use SDPA. ``key0`` receives the pre-softmax logits of every query against
    the first key, (B, heads, Nq) (FFVT's selection needs them; the maps cannot give them back).
    ``rotate`` turns the normed queries and keys by their positions (rotary embeddings), as timm does."""
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rotate is not None:
        q, k = rotate(q, k)
    if probs is None and key0 is None and not explicit_is_faster(q):
        drop = attn.attn_drop.p if attn.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    a = (q * attn.scale) @ k.transpose(-2, -1)                            # (B, heads, Nq, N)
    if key0 is not None:
        key0.append(a[..., 0])                                             # (B, heads, Nq)
    a = a.softmax(dim=-1)
    if probs is not None:
        probs.append(a)
    return attn.attn_drop(a) @ v


def autocast_input(h: torch.Tensor) -> torch.Tensor:
    """In inference, a LayerNorm output cast once to the autocast dtype. Why: under CPU autocast the
    norm runs in float32, and each consumer (attention or MLP, plus its parallel adapter) would cast
    it again; the values are the same either way. Not when it needs a gradient: the branches'
    gradients would then be summed in bf16 instead of float32."""
    device = h.device.type
    if h.dtype == torch.float32 and not h.requires_grad and device in ("cpu", "cuda") \
            and torch.is_autocast_enabled(device):
        return h.to(torch.get_autocast_dtype(device))
    return h


def merge_heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B, nh, N, hd = x.shape
    x = x.transpose(1, 2).reshape(B, N, nh * hd)                          # (B, N, D)
    x = getattr(attn, "norm", nn.Identity())(x)
    return attn.proj(x)


def explicit_attention(attn: nn.Module, x: torch.Tensor, probs: list[torch.Tensor] | None = None,
                       query_only: int = 0, key0: list[torch.Tensor] | None = None) -> torch.Tensor:
    """timm ``Attention`` forward, able to hand out the attention maps (see `_attend`).

    The first ``query_only`` rows only ask (VQT's prompts): they are never keys or values, so the
    other rows attend exactly as without them, and the maps handed out are those rows' (square)."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
    return attend_heads(attn, *qkv.unbind(0), probs, query_only, key0)


def attend_heads(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 probs: list[torch.Tensor] | None = None, query_only: int = 0,
                 key0: list[torch.Tensor] | None = None, rotate: Rotate | None = None) -> torch.Tensor:
    """Projected queries, keys and values (B, heads, N, hd) -> the attention's output (B, N, D), through
    ``attn``'s norms, inner norm and output projection: `explicit_attention` once the projections are
    made (a backbone whose projections differ makes its own; see ``model/eva.py``)."""
    if not query_only:
        return merge_heads(attn, _attend(attn, q, k, v, probs, key0, rotate))
    k, v = k[:, :, query_only:], v[:, :, query_only:]                      # (B, heads, N - query_only, hd)
    maps: list[torch.Tensor] | None = [] if probs is not None else None
    out = _attend(attn, q, k, v, maps, rotate=rotate)
    if probs is not None:
        probs.append(maps[0][:, :, query_only:])                           # (B, heads, N - q, N - q)
    return merge_heads(attn, out)


def cls_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention output for the first token only: its query against every key and value.

    Why: the classifier reads the CLS token alone, so in the last block every other row of the
    query, the output projection and the MLP is computed and thrown away (6.6 % of ViT-B/16's
    multiply-adds at 224 px, 4.6 % of ILA++'s).

    A plain ``nn.Linear`` qkv is applied here by its weight: the query rows for the CLS token alone,
    keys and values for every token. Any other qkv module (peft's LoRA layer, SSF's wrapper, whose
    ``.weight`` is the frozen base weight without the adapter) is called on every token instead,
    so that its adapter runs and trains; the rest of the block still runs for the CLS row alone."""
    B, N, C = x.shape
    if type(attn.qkv) is not nn.Linear:
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
        q, k, v = qkv.unbind(0)
        return merge_heads(attn, _attend(attn, q[:, :, :1], k, v, None))
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[:, :1], w[:C], None if b is None else b[:C])           # (B, 1, D)
    kv = F.linear(x, w[C:], None if b is None else b[C:])                 # (B, N, 2D)
    q = q.reshape(B, 1, attn.num_heads, -1).transpose(1, 2)               # (B, heads, 1, hd)
    k, v = kv.reshape(B, N, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, N, hd)
    return merge_heads(attn, _attend(attn, q, k, v, None))


__all__ = ["attend_heads", "autocast_input", "cls_attention", "explicit_attention", "explicit_is_faster", "merge_heads"]


def rollout_factor(attn: torch.Tensor) -> torch.Tensor:
    """A head-fused attention map (..., S, S) -> its factor in attention rollout: identity added (the
    residual path), rows renormalised."""
    attn = attn + torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    return attn / attn.sum(dim=-1, keepdim=True)


def cls_row_through(mats: list[torch.Tensor], row0_chain: bool) -> torch.Tensor:
    """Row 0 (the CLS query) of mats[-1] @ ... @ mats[0], over the patch columns: (..., S, S) -> (..., S - 1).
    ``row0_chain`` carries that row through the matrices (S^2 per block) instead of multiplying them
    (S^3 per block, what the reference computes): the same values up to float rounding."""
    m = mats[-1][..., :1, :] if row0_chain else mats[-1]
    for a in reversed(mats[:-1]):
        m = m @ a
    return m[..., 0, 1:]
