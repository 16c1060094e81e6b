"""`ufgir visualize tokens`: which patches survive each token reduction (``model.token_reduction``), one panel
per reduction, from what the reductions record (`TokenReduction.recording`).

Every patch that enters the first reduction is followed through the reductions by the position of the token
that holds it: EViT keeps some tokens and fuses the rest into one (a patch in the fused token is dropped: drawn
dimmed); ToMe merges tokens (a patch merged with others is drawn in its group's colour, the patches still on
their own as they are). Past down-sampling ILAs the patches are those of the grid that enters the first
reduction, each drawn over its share of the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.datasets import normalize
from ..errors import OptionError
from ..model.checkpoint import load_model
from .report import Panels, Selected, _captions, load_images, run_title

#: ToMe's merged groups cycle through these colours (RGB 0-255, matplotlib's tab20), in token order.
GROUP_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
                 (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
                 (219, 219, 141), (158, 218, 229))
DIM = 0.25  # what a dropped patch keeps of its brightness


def follow_evit(where: torch.Tensor, did: dict, prefix: int) -> torch.Tensor:
    """Positions (B, n0) of the tokens holding each patch (-1: dropped) after one EViT reduction: a kept candidate
    c goes to prefix + its rank; every other one into the fused token (dropped)."""
    kept = did["kept"]                                                      # (B, k) candidate indices
    n = int(did["scores"].shape[1])
    new = torch.full((where.shape[0], n), -1, dtype=torch.long)
    new.scatter_(1, kept.cpu(), prefix + torch.arange(kept.shape[1]).expand_as(kept).contiguous())
    alive = where >= prefix
    cand = (where - prefix).clamp(0, n - 1)
    return torch.where(alive, new.gather(1, cand), torch.full_like(where, -1))


def follow_tome(where: torch.Tensor, did: dict, prefix: int, length: int) -> torch.Tensor:
    """Positions (B, n0) after one ToMe merge of a ``length``-token sequence: A tokens (even positions) left
    unmerged keep their order, then the B tokens (odd); a merged A token goes where its B token does."""
    if did.get("r", 0) == 0:
        return where
    unm, src, dst = did["unm"].cpu(), did["src"].cpu(), did["dst"].cpu()
    B = where.shape[0]
    na, a_prefix, b_prefix = (length + 1) // 2, (prefix + 1) // 2, prefix // 2
    n_unm = unm.shape[1] - a_prefix
    new = torch.full((B, length), -1, dtype=torch.long)                    # old position -> new position
    b_pos = torch.arange(length // 2)
    new[:, 1::2] = prefix + n_unm + (b_pos - b_prefix)                     # every B token
    a_new = torch.full((B, na), -1, dtype=torch.long)
    a_new.scatter_(1, unm, prefix + torch.arange(unm.shape[1]).expand_as(unm).contiguous() - a_prefix)
    a_new.scatter_(1, src, prefix + n_unm + (dst - b_prefix))              # merged into their B token
    new[:, ::2] = a_new
    alive = where >= 0
    return torch.where(alive, new.gather(1, where.clamp(0, length - 1)), where)


def _draw(shown: np.ndarray, where: torch.Tensor, grid: tuple[int, int], kind: str) -> np.ndarray:
    """The images (B, S, S, 3) uint8 with each patch dimmed (dropped) or tinted by its merged group."""
    out = shown.astype(np.float32).copy()
    B, H, W, _ = out.shape
    gh, gw = grid
    rows = (np.arange(H) * gh // H)[:, None]
    cols = (np.arange(W) * gw // W)[None, :]
    cell = rows * gw + cols                                                 # (H, W): the patch under each pixel
    for b in range(B):
        w = where[b].numpy()
        per_pixel = w[cell]                                                 # (H, W)
        if kind == "evit":
            out[b][per_pixel < 0] *= DIM
            continue
        pos, counts = np.unique(w[w >= 0], return_counts=True)
        for colour_i, p in enumerate(pos[counts > 1]):
            mask = per_pixel == p
            out[b][mask] = 0.45 * out[b][mask] + 0.55 * np.array(GROUP_COLOURS[colour_i % len(GROUP_COLOURS)])
    return out.clip(0, 255).astype(np.uint8)


def token_panels(model: nn.Module, x: torch.Tensor) -> Panels:
    """The image, then per reduction the patches that survive it, for uint8 images ``x`` (B, 3, S, S) as the
    eval transform gives them."""
    red = model.reduction
    if red is None or not red.locs:
        raise OptionError("visualize tokens shows what a token reduction keeps, and this run has none "
                          "(model.token_reduction unset); try `ufgir visualize rollout`")
    device = next(model.parameters()).device
    xn = normalize(x.to(device), model.data_config())
    with torch.no_grad(), red.recording() as did:
        preds = model(xn).argmax(dim=1).tolist()
    P = model.num_prefix_tokens
    grid = red.grid_entering(model)
    n0 = grid[0] * grid[1]
    shown = x.permute(0, 2, 3, 1).cpu().numpy()
    where = (P + torch.arange(n0)).expand(x.shape[0], -1).clone()           # (B, n0): the token holding each patch
    lengths = [model.feature_info[d["block"]].tokens_attended for d in did]
    panels = [("image", shown, [[] for _ in preds])]
    for d, length in zip(did, lengths, strict=True):
        if red.kind == "evit":
            where = where if "kept" not in d else follow_evit(where, d, P)
            label = f"block {d['block']}: {d['tokens_out'] - P} left"
        else:
            where = follow_tome(where, d, P, length)
            label = f"block {d['block']}: {d.get('r', 0)} merged"
        panels.append((label, _draw(shown, where, grid, red.kind), [[] for _ in preds]))
    what = "patches EViT keeps (the rest dimmed; tokens left after each)" if red.kind == "evit" else \
        "tokens ToMe merges (a colour per merged group; merges at each)"
    return Panels(panels, what, preds)


def token_selections(path: Path, *, split: str = "test", images: Sequence[Path] | None = None, count: int = 8,
                     per_class: int = 1, checkpoint: str = "auto", device: str = "auto") -> Selected:
    """Which patches survive each token reduction over a run's images (:func:`token_panels`)."""
    loaded = load_model(path, checkpoint, device)
    imgs = load_images(loaded.recipe, split, images, count, per_class, loaded.class_names)
    shown = token_panels(loaded.model, imgs.x)
    return Selected(shown.panels, _captions(shown.preds, imgs), imgs.stems, run_title(loaded.recipe), shown.what,
                    imgs.classes)


__all__ = ["follow_evit", "follow_tome", "token_panels", "token_selections"]
