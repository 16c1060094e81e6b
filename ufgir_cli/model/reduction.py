"""Token reduction inside the backbone (``model.token_reduction``): EViT and ToMe as CLCA's code runs
them (reference/CLCA.md §3.2, §4.1), pure torch.

Both act inside a block, between the attention residual and the MLP, after each block of
``model.reduction_locs`` (default: blocks ⌊iD/4⌋, i = 1, 2, 3: 3, 6, 9 of 12):

- **EViT** keeps the k = ⌈ρ (N - P)⌉ tokens the CLS token attends to most (its attention row, post-softmax,
  averaged over heads), in descending score order, and fuses the others into one token appended last: their
  sum weighted by those attention weights, not renormalised;
- **ToMe** merges r tokens by bipartite soft matching of the keys averaged over heads (A = even
  positions, B = odd ones, each A token's most similar B token, the r best pairs merge), a size-weighted
  average; every later block adds log(size) of each key to its attention logits (proportional
  attention). r comes from the keep rate: target_j = ⌊N_p ρ^(j+1)⌋ patches after the j-th merge, capped at
  half the unprotected tokens; N_p counts the patches entering the first reduction (after any down-sampling ILA).

The P prefix tokens (CLS, registers, shallow prompts) are protected: never scored, kept, fused or
merged, and they stay in front. With P = 1 this is exactly CLCA's rule. Attention stays timm's fused
path (SDPA, the size bias as an additive mask); the CLS row EViT scores with is computed beside it,
from the same queries and keys. Past a reduction the tokens have no patch grid: `geometry` gives token
counts only, so a method's ILAs (`ila_pp_evit`) all come before the first reduction.

A :class:`TokenReduction` holds settings only; `TokenReduction.start` gives the per-pass state
(:class:`ReducedPass`: the ToMe sizes, what was kept or merged) that `UfgirViT.encode` runs its blocks through.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import RecipeError
from ..recipe import ModelConfig
from .attention import autocast_input, explicit_is_faster, merge_heads
from .feature_info import BlockInfo

#: A block's post-softmax attention receiver, as `UfgirViT.encode` takes it.
Tap = Callable[[torch.Tensor, "torch.Tensor | None"], None]


def evit_keep(keep_rate: float, n: int) -> int:
    """EViT's keep count of ``n`` candidate tokens: ⌈ρ n⌉ in double precision, as CLCA's code computes it."""
    return math.ceil(keep_rate * n)


def tome_requested(keep_rate: float, patches: int, merges: int) -> list[int]:
    """ToMe's merge counts asked for: target_j = ⌊N_p ρ^(j+1)⌋ (cumulative over the patch count only),
    r_j = target_(j-1) - target_j with target_(-1) = N_p. 224 px, ρ 0.1: [177, 18, 1]."""
    targets = [patches] + [math.floor(patches * keep_rate ** (j + 1)) for j in range(merges)]
    return [targets[j] - targets[j + 1] for j in range(merges)]


def attend(attn: nn.Module, h: torch.Tensor, bias: torch.Tensor | None = None, *, want_cls: bool = False,
           want_metric: bool = False, maps: list[torch.Tensor] | None = None,
           key0: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """timm ``Attention`` on (B, N, D) tokens with an additive per-key ``bias`` (B, N) (ToMe's log sizes),
    fused (SDPA, the bias as its float mask) unless ``maps`` or ``key0`` ask for the explicit path, or it is
    the faster one (CPU bf16 training, :func:`~.attention.explicit_is_faster`).
    Returns the output (B, N, D) and what was asked: ``cls`` (B, heads, N), the CLS query's post-softmax
    row; ``metric`` (B, N, head_dim), the keys averaged over heads."""
    B, N, C = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if bias is None else bias[:, None, None, :].to(q.dtype)     # (B, 1, 1, N)
    extras: dict[str, torch.Tensor] = {}
    if want_metric:
        extras["metric"] = k.mean(dim=1)                                    # (B, N, hd)
    if maps is None and key0 is None and not explicit_is_faster(q):
        drop = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        if want_cls:  # the CLS query's row beside SDPA, element-wise (one row: no matmul worth counting)
            a0 = ((q[:, :, :1] * attn.scale) * k).sum(dim=-1)               # (B, heads, N)
            extras["cls"] = (a0 if mask is None else a0 + mask[:, :, 0]).softmax(dim=-1)
        return merge_heads(attn, out), extras
    a = (q * attn.scale) @ k.transpose(-2, -1)                              # (B, heads, N, N)
    if key0 is not None:
        key0.append(a[..., 0])
    a = (a if mask is None else a + mask).softmax(dim=-1)
    if maps is not None:
        maps.append(a)
    extras["cls"] = a[:, :, 0]
    return merge_heads(attn, attn.attn_drop(a) @ v), extras


def evit_reduce(x: torch.Tensor, cls_row: torch.Tensor, prefix: int, keep_rate: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """EViT on (B, N, D) tokens with the CLS attention row (B, heads, N): [prefix, the kept tokens by
    descending score, the fused token], (B, P + k + 1, D); or ``x`` unchanged when every candidate is kept.
    Also what it did: ``scores`` (B, n), ``kept`` (B, k) and ``dropped`` (B, n - k, ascending) positions
    among the n = N - P candidates, ``fused`` (B, D)."""
    B, N, D = x.shape
    n = N - prefix
    k = evit_keep(keep_rate, n)
    if k >= n:
        return x, None
    scores = cls_row[:, :, prefix:].float().mean(dim=1)                     # (B, n)
    _, kept = scores.topk(k, dim=1, largest=True, sorted=True)              # (B, k), by descending score
    cand = x[:, prefix:]                                                    # (B, n, D)
    kept_tokens = cand.gather(1, kept[..., None].expand(-1, -1, D))         # (B, k, D)
    weights = scores.scatter(1, kept, 0.0).to(x.dtype)                      # (B, n): the dropped ones' scores
    fused = (cand * weights[..., None]).sum(dim=1, keepdim=True)            # (B, 1, D), not renormalised
    out = torch.cat([x[:, :prefix], kept_tokens, fused], dim=1)             # (B, P + k + 1, D)
    is_kept = torch.zeros_like(scores, dtype=torch.bool).scatter(1, kept, True)
    dropped = torch.argsort(is_kept.to(torch.int8), dim=1, stable=True)[:, : n - k]  # ascending positions
    return out, {"scores": scores, "kept": kept, "dropped": dropped, "fused": fused[:, 0]}


def tome_merge(x: torch.Tensor, sizes: torch.Tensor | None, metric: torch.Tensor, prefix: int, r: int
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """ToMe's bipartite soft matching and size-weighted merge of (B, N, D) tokens with sizes (B, N, 1)
    (None: all 1) and the metric (B, N, c): r = min(r, (N - P) // 2) A tokens (even positions) merge into
    their most similar B token (odd positions). Prefix tokens are neither sources nor destinations and
    stay in front; then the unmerged A tokens (ascending), then every B token. Returns the tokens, the
    sizes and what it did: ``r``, ``unm`` (B, ·) / ``src`` (B, r) A indices, ``dst`` (B, r) B indices."""
    B, N, D = x.shape
    r = min(r, (N - prefix) // 2)
    if sizes is None:
        sizes = torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
    if r <= 0:
        return x, sizes, {"r": 0}
    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True)
        scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)                   # (B, nA, nB)
        na, nb = scores.shape[1:]
        a_prefix, b_prefix = (prefix + 1) // 2, prefix // 2                 # prefix tokens among A and B
        scores[:, :a_prefix] = -math.inf
        scores[:, :, :b_prefix] = -math.inf
        best, best_b = scores.max(dim=-1)                                   # (B, nA)
        order = best.argsort(dim=-1, descending=True)                       # (B, nA)
        unm = order[:, r:].sort(dim=-1).values                              # (B, nA - r), ascending
        src = order[:, :r]                                                  # (B, r), by descending score
        dst = best_b.gather(1, src)                                         # (B, r)

    def merge(t: torch.Tensor) -> torch.Tensor:                             # (B, N, c) -> (B, N - r, c), summed
        c = t.shape[-1]
        a, b = t[:, ::2], t[:, 1::2]
        kept = a.gather(1, unm[..., None].expand(-1, -1, c))
        moved = a.gather(1, src[..., None].expand(-1, -1, c))
        b = b.scatter_reduce(1, dst[..., None].expand(-1, -1, c), moved, reduce="sum")
        return torch.cat([t[:, :prefix], kept[:, a_prefix:], b[:, b_prefix:]], dim=1)

    summed, new_sizes = merge(x * sizes), merge(sizes)
    return summed / new_sizes, new_sizes, {"r": r, "unm": unm, "src": src, "dst": dst}


class TokenReduction:
    """The recipe's token reduction (settings only): ``kind`` "evit" or "tome", keep rate, blocks."""

    def __init__(self, kind: str, keep_rate: float, locs: tuple[int, ...]):
        self.kind, self.keep_rate, self.locs = kind, keep_rate, tuple(locs)
        self._record: list[dict] | None = None

    @classmethod
    def of(cls, cfg: ModelConfig, depth: int) -> TokenReduction | None:
        """The model config's reduction on a ``depth``-block backbone (None without); blocks outside it are a
        RecipeError (a backbone whose name did not tell its depth is checked here, at build)."""
        if cfg.token_reduction is None:
            return None
        locs = tuple(cfg.reduction_locs or ())
        if any(i >= depth for i in locs):
            raise RecipeError(f"model.reduction_locs {list(locs)} names a block outside the {depth}-block backbone "
                              f"{cfg.backbone!r}")
        return cls(cfg.token_reduction, cfg.keep_rate, locs)

    def __repr__(self) -> str:
        return f"TokenReduction({self.kind!r}, keep_rate={self.keep_rate}, locs={list(self.locs)})"

    def merges_requested(self, patches: int) -> list[int]:
        """ToMe's r per reduction block as asked for (before the half cap)."""
        return tome_requested(self.keep_rate, patches, len(self.locs))

    def tokens_after(self, j: int, n: int, prefix: int, patches: int) -> int:
        """Sequence length after the ``j``-th reduction of ``n`` tokens."""
        if self.kind == "evit":
            k = evit_keep(self.keep_rate, n - prefix)
            return n if k >= n - prefix else prefix + k + 1
        return n - min(self.merges_requested(patches)[j], (n - prefix) // 2)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[dict]]:
        """Inside it, every reduction appends what it did (block, kept/dropped or merged indices) to the
        list it yields: tests and ``ufgir inspect`` read it."""
        self._record = []
        try:
            yield self._record
        finally:
            self._record = None

    def start(self, model: nn.Module) -> ReducedPass:
        return ReducedPass(self, model)

    def grid_entering(self, model: nn.Module) -> tuple[int, int]:
        """The patch grid that enters the first reduction: the backbone's, after the down-sampling ILAs before it.
        ILAs run only before the first reduction (`MethodSpec.reduction_refusal`)."""
        g = tuple(model.vit.patch_embed.grid_size)
        first = min(self.locs, default=len(model.vit.blocks))
        for i in range(first):
            if str(i) in model.ila:
                g = model.ila[str(i)].out_grid(g)
        return g

    def patches_entering(self, model: nn.Module) -> int:
        """The patches that enter the first reduction (ToMe's N_p)."""
        g = self.grid_entering(model)
        return g[0] * g[1]

    def geometry(self, model: nn.Module, info: list[BlockInfo]) -> list[BlockInfo]:
        """``feature_info`` with the reductions and the method's appended tokens (`Method.suffix_count`,
        `Method.tokens_added`): token counts per block; no grid from a reduction on. The ILAs before the first
        reduction change the count as ``info`` says."""
        P = model.num_prefix_tokens
        patches = self.patches_entering(model)
        added = model.method.tokens_added(model)
        n = info[0].tokens_attended + model.method.suffix_count(model)
        out, j, grid = [], 0, info[0].grid
        for b in info:
            attended = n
            if b.index in self.locs:
                n = self.tokens_after(j, n, P, patches)
                j += 1
            elif b.ila is not None:  # before the first reduction: the grid it leaves
                n += b.tokens_out - b.tokens_attended
            n += added.get(b.index, 0)
            out_grid = b.out_grid if grid is not None and b.index not in self.locs and n == b.tokens_out else None
            out.append(b._replace(grid=grid, tokens_attended=attended, out_grid=out_grid, tokens_out=n))
            grid = out_grid
        return out


class ReducedPass:
    """One pass through the backbone with token reduction: runs each block (its reduction inside), keeps the
    ToMe sizes between blocks (recovered or appended tokens enter with size 1)."""

    def __init__(self, reduction: TokenReduction, model: nn.Module):
        self.reduction, self.model = reduction, model
        self.sizes: torch.Tensor | None = None                              # (B, N, 1) once ToMe merged
        self.j = 0

    def block(self, b: BlockInfo, x: torch.Tensor, edit: Callable | None, tap: Tap | None,
              tap_key0: bool) -> torch.Tensor:
        """Block ``b`` (its reduction inside), then the method's ``edit`` of its output."""
        model = self.model
        maps: list[torch.Tensor] = []
        want_maps = edit is not None and model.method.edit_reads_maps

        def keep(a: torch.Tensor, k0: torch.Tensor | None) -> None:
            maps.append(a)
            if tap is not None:
                tap(a, k0)

        t = keep if want_maps else tap
        if b.index in self.reduction.locs or self.sizes is not None:  # never recomputed: it keeps state
            x = self._reduced_block(b, x, t, tap_key0)
        elif model.grad_checkpointing and model.training and t is None:
            x = checkpoint(model._block, b.index, x, b.grid, use_reentrant=False)
        else:
            x = model._block(b.index, x, b.grid, tap=t, tap_key0=tap_key0)
        if edit is not None:
            x = edit(x, maps[0] if want_maps else None)
        if self.sizes is not None and x.shape[1] > self.sizes.shape[1]:    # appended tokens: size 1
            extra = self.sizes.new_ones(x.shape[0], x.shape[1] - self.sizes.shape[1], 1)
            self.sizes = torch.cat([self.sizes, extra], dim=1)
        return x

    def _reduced_block(self, b: BlockInfo, x: torch.Tensor, tap: Tap | None, tap_key0: bool) -> torch.Tensor:
        """`UfgirViT._block` for a block that reduces or attends with sizes: attention (with the log-size
        bias), its residual, the reduction, then the MLP residual. Parallel adapters run as in ``_block``."""
        model, red = self.model, self.reduction
        blk, P, i = model.vit.blocks[b.index], model.num_prefix_tokens, b.index
        ad = model.adapters[i] if model.adapters is not None else None
        reduce = i in red.locs
        h = autocast_input(blk.norm1(x))
        bias = None if self.sizes is None else self.sizes[..., 0].float().log()  # (B, N)
        maps: list[torch.Tensor] | None = [] if tap is not None else None
        key0: list[torch.Tensor] | None = [] if tap is not None and tap_key0 else None
        a, extras = attend(blk.attn, h, bias, want_cls=reduce and red.kind == "evit",
                           want_metric=reduce and red.kind == "tome", maps=maps, key0=key0)
        if tap is not None:
            tap(maps[0], key0[0] if key0 is not None else None)
        a = model.drop(blk.ls1(a))
        if ad is not None:
            a = a + ad.attn(h, None, P)
        x = x + blk.drop_path1(a)
        if reduce:
            x = self._reduce(i, x, extras)
        h = autocast_input(blk.norm2(x))
        m = model.drop(blk.ls2(blk.mlp(h)))
        if ad is not None:
            m = m + ad.mlp(h, None, P)
        return x + blk.drop_path2(m)

    def _reduce(self, i: int, x: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        red, P = self.reduction, self.model.num_prefix_tokens
        if red.kind == "evit":
            x, did = evit_reduce(x, extras["cls"], P, red.keep_rate)
        else:
            asked = red.merges_requested(red.patches_entering(self.model))[self.j]
            x, self.sizes, did = tome_merge(x, self.sizes, extras["metric"], P, asked)
            did = {**did, "requested": asked}
        self.j += 1
        if red._record is not None:
            red._record.append({"block": i, "kind": red.kind, "tokens_out": x.shape[1], **(did or {})})
        return x


__all__ = ["ReducedPass", "TokenReduction", "attend", "evit_keep", "evit_reduce", "tome_merge", "tome_requested"]
