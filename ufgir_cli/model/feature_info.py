"""One block's geometry, as ``UfgirViT.feature_info`` lists it, and timm's ``indices`` convention.

Every tool that needs to know what a block attends over or outputs (inspect, metrics, rollout, cost)
reads these records rather than computing it again.
"""

from __future__ import annotations

from typing import NamedTuple


class BlockInfo(NamedTuple):
    """One block's geometry (timm's ``feature_info`` entry plus what ILA and prompts change)."""

    index: int
    module: str  # its module name in the model
    num_chs: int  # channels of its output tokens
    reduction: int  # input pixels per patch-grid step (the patch size; a valid conv keeps it)
    grid: tuple[int, int] | None  # patch grid it attends over; None past a token reduction
    num_prefix_tokens: int  # CLS/register tokens + shallow prompts, before the patches
    num_prompts: int  # deep prompts attended over by this block only
    tokens_attended: int  # sequence length of its attention: prefix + prompts + grid
    ila: str | None  # the ILA after it: None, "same" (same resolution) or "down" (down-sampling)
    ila_kernel: int | None
    out_grid: tuple[int, int] | None  # patch grid of its output, after the ILA; None past a token reduction
    tokens_out: int  # sequence length of its output, after the ILA

    def __getitem__(self, key):  # timm's feature_info entries are dicts: info[i]["num_chs"]
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default)


def take_indices(n: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """timm's ``indices`` convention: None = all blocks, an int = the last n, a sequence = those
    (negative from the end)."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: take the last 1 to {n} blocks")
        return list(range(n - indices, n))
    out = [i + n if i < 0 else i for i in indices]
    if any(not 0 <= i < n for i in out):
        raise ValueError(f"indices {list(indices)} name a block outside 0-{n - 1}")
    return sorted(out)


def check_output_fmt(info: list[BlockInfo], take: list[int], output_fmt: str) -> list[int]:
    """``take`` when ``forward_intermediates`` can give those blocks in ``output_fmt``: NLC always, NCHW only
    where the block's output has a patch grid (none past a token reduction); else ValueError."""
    if output_fmt not in ("NLC", "NCHW"):
        raise ValueError(f"output_fmt {output_fmt!r} is not one of NLC, NCHW")
    if output_fmt == "NCHW" and any(info[i].out_grid is None for i in take):
        raise ValueError("forward_intermediates(output_fmt='NCHW'): past a token reduction the tokens have no "
                         "patch grid; use output_fmt='NLC'")
    return take
