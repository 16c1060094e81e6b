"""CLCA (Cross-Layer Cache Aggregation, Rios et al., ICASSP 2025) as the official code implements it
(reference/CLCA.md §3), around the backbone's token reduction (``model.token_reduction``, `model.reduction`).

- **Carrier (CLR) token:** a learned token appended after the patches, with a position row of its own
  (none on a backbone whose position embedding leaves out the class token), before the pre-norm. It starts
  as a copy of the CLS token; its position as N(0, 0.02²).
- **Cross-layer cache:** after every block before the last recovery, two tokens go into a cache: the mean
  of the local tokens (positions P … pool - 1: the prefix, the recovered tokens and, before the first
  recovery, the carrier left out) and the last token of the sequence (the carrier until the first
  reduction; later whatever sits last). After each reduction block and once more after block D - 2, the
  cache is appended to the sequence and emptied; ``pool`` becomes the length before appending.
- **CLA head:** the CLS token after each reduction block and after the last block, stacked (B, D, G):
  BatchNorm1d, a depthwise Conv1d over the G layers with 2 filters per channel, BatchNorm1d, GELU, a
  pointwise Conv1d to the classes. No final LayerNorm. The whole network trains.

What ufgir does differently (README, "CLCA"): the 1000-way head the official model builds and never uses
is not built (its checkpoints' ``head.*`` are dropped on import), and registers or shallow prompts count as
prefix tokens (protected like the CLS token; with the CLS alone this is the official rule).
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, RecipeNotice
from ...methods import MethodSpec
from ...recipe import ModelConfig
from .base import Method

#: Carrier tokens (the official ``num_clr``) and depthwise filters per channel in the head (``ifa_dws_conv_groups``).
NUM_CLR, DW_MULT = 1, 2
#: ImageNet's mean and std, which the official code normalises with for every backbone (CLIP's too).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: The official flags this implementation follows (the README's command); a checkpoint with others is refused.
_OFFICIAL = {"ifa_head": True, "ifa_dws_conv_groups": DW_MULT, "clc": True, "num_clr": NUM_CLR, "clc_include_gap": True,
             "clc_recover_at_last": True, "clc_pool_cls": False, "clc_pool_clr": False}
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class CLAHead(nn.Module):
    """The cross-layer aggregation head on the CLS tokens of G layers (B, D, G): BatchNorm1d(D), Conv1d(D, 2D,
    G, groups D) (output channel d·2 + j reads channel d), BatchNorm1d(2D), GELU, Conv1d(2D, C, 1).
    PyTorch's default inits, as the official code leaves them."""

    def __init__(self, dim: int, num_classes: int, layers: int, mult: int = DW_MULT):
        super().__init__()
        self.norm_in = nn.BatchNorm1d(dim)
        self.dwconv = nn.Conv1d(dim, mult * dim, layers, stride=layers, groups=dim)
        self.norm_mid = nn.BatchNorm1d(mult * dim)
        self.fc = nn.Conv1d(mult * dim, num_classes, 1)

    def stages(self, cls: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the first BatchNorm (B, D, G), the depthwise conv, the second BatchNorm and the GELU
        (B, 2D, 1 each)."""
        out = [self.norm_in(cls)]
        out.append(self.dwconv(out[-1]))
        out.append(self.norm_mid(out[-1]))
        out.append(F.gelu(out[-1]))
        return out

    def forward(self, cls: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.stages(cls)[-1]                                             # (B, 2D, 1)
        return x.flatten(1) if pre_logits else self.fc(x).flatten(1)        # (B, 2D) or (B, C)


class CLCA(Method):
    """The carrier token (``model.clr``, ``model.clr_pos``), the cache (stream edits) and the CLA head."""

    timm_head = False
    reads_intermediates = True
    min_train_batch = 2  # BatchNorm1d over (B, D, G): training statistics need two images
    edit_reads_maps = False
    upstream_head_keys = (("ifa_head.0.0.", "head.norm_in."), ("ifa_head.0.1.", "head.dwconv."),
                          ("ifa_head.0.2.", "head.norm_mid."), ("ifa_head.0.4.", "head.fc."))

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.locs = tuple(cfg.reduction_locs or ())
        self._record: list[dict] | None = None

    # ---- where -----------------------------------------------------------------------------
    def head_blocks(self, depth: int) -> tuple[int, ...]:
        """The blocks whose CLS token the head reads: the reduction blocks and the last (3, 6, 9, 11 of 12)."""
        return tuple(sorted({*self.locs, depth - 1}))

    def recovery_blocks(self, depth: int) -> tuple[int, ...]:
        """The blocks after which the cache is appended: the reduction blocks and D - 2 (3, 6, 9, 10 of 12)."""
        return tuple(sorted({*self.locs, max(depth - 2, 0)}))

    # ---- building -------------------------------------------------------------------------
    def build_head(self, vit, num_classes):
        return CLAHead(vit.embed_dim, num_classes, len(self.head_blocks(len(vit.blocks))))

    def extra_parameters(self, vit):
        out: dict[str, nn.Parameter] = {"clr": nn.Parameter(vit.cls_token.detach().clone())}  # (1, 1, D)
        if not vit.no_embed_class:
            out["clr_pos"] = nn.Parameter(torch.randn(1, 1, vit.embed_dim) * 0.02)
        return out

    def no_weight_decay(self, model) -> set[str]:
        return {n for n in ("clr", "clr_pos") if getattr(model, n, None) is not None}

    def suffix_tokens(self, model):
        pos = getattr(model, "clr_pos", None)
        return model.clr if pos is None else model.clr + pos                # (1, 1, D)

    def suffix_count(self, model) -> int:
        return NUM_CLR

    def tokens_added(self, model) -> dict[int, int]:
        depth = len(model.vit.blocks)
        recover = self.recovery_blocks(depth)
        out, since = {}, 0
        for i in range(depth):
            if i in recover:
                out[i], since = 2 * since, 0
            if i < recover[-1]:
                since += 1
        return out

    def block_notes(self, model) -> dict[int, str]:
        added = self.tokens_added(model)
        return {i: f"+{n} cached tokens" for i, n in added.items() if n}

    # ---- running --------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator[list[dict]]:
        """Inside it, every cache step appends what it did (block, GAP pool length, tokens recovered)."""
        self._record = []
        try:
            yield self._record
        finally:
            self._record = None

    def stream_edits(self, model):
        """After each block up to the last recovery: recover (append the cache) where due, then cache the
        GAP and the last token. A fresh cache per pass."""
        depth, P = len(model.vit.blocks), model.num_prefix_tokens
        recover = self.recovery_blocks(depth)
        state: dict[str, Any] = {"cache": [], "pool": None}
        return {i: partial(self._step, i, i in recover, i < recover[-1], P, state)
                for i in range(depth) if i in recover or i < recover[-1]}

    def _step(self, i: int, recovers: bool, caches: bool, P: int, state: dict, x: torch.Tensor,
              maps: torch.Tensor | None) -> torch.Tensor:
        recovered = 0
        if recovers:
            state["pool"] = x.shape[1]
            if state["cache"]:
                recovered = 2 * len(state["cache"])
                x = torch.cat([x, *state["cache"]], dim=1)                  # (B, N + 2k, D)
                state["cache"] = []
        elif state["pool"] is None:  # before the first recovery: the patches, the carrier left out
            state["pool"] = x.shape[1] - NUM_CLR
        if caches:
            gap = x[:, P:state["pool"]].mean(dim=1, keepdim=True)            # (B, 1, D)
            state["cache"].append(torch.cat([gap, x[:, -NUM_CLR:]], dim=1))  # (B, 2, D)
        if self._record is not None:
            self._record.append({"block": i, "recovered": recovered, "pool_len": state["pool"] - P if caches else None,
                                 "gap": gap[:, 0] if caches else None, "carrier": x[:, -1] if caches else None})
        return x

    def pools_cls(self, model) -> bool:
        return False

    def forward(self, model, x: torch.Tensor, eval_mode: str | None = None) -> torch.Tensor:
        self._mode(eval_mode)
        _, outs = model.encode(x, frozenset(self.head_blocks(len(model.vit.blocks))))
        return model.head(torch.stack([t[:, 0] for t in outs], dim=-1))    # (B, D, G)

    def forward_head(self, model, x, pre_logits=False, intermediates=None):
        if intermediates is None:
            raise ValueError("the CLCA head reads the CLS token of several blocks: call model(x), or pass "
                             "forward_head(x, intermediates=[each block's output tokens])")
        cls = torch.stack([intermediates[i][:, 0] for i in self.head_blocks(len(intermediates))], dim=-1)
        return model.head(cls, pre_logits)

    # ---- reference checkpoints ------------------------------------------------------------
    @classmethod
    def upstream_recipe(cls, config: argparse.Namespace) -> dict[str, Any]:
        """The recipe of the official ``train.py`` arguments (``args`` in its checkpoints): the backbone and
        token reduction from the model name (``evit_<timm name>``), keep rate (one for every location),
        reduction blocks, classes and size; its optimiser and schedule (``epochs`` counts the cosine, the
        cool-down epochs follow). Settings ufgir does not implement are refused in one line."""
        c = config
        kind, _, backbone = str(c.model).partition("_")
        rates = list(getattr(c, "keep_rate", None) or [1.0])
        odd = {k: getattr(c, k, v) for k, v in _OFFICIAL.items() if getattr(c, k, v) != v}
        if kind not in ("evit", "tome") or len(set(rates)) > 1 or odd:
            what = f"model {c.model!r}" if kind not in ("evit", "tome") else \
                f"keep rates {rates}" if len(set(rates)) > 1 else ", ".join(f"--{k} {v}" for k, v in odd.items())
            raise CheckpointError(f"CLCA checkpoint with {what}: ufgir implements EViT or ToMe with one keep rate and "
                                  "the README's CLCA flags (CLA head, 1 carrier, GAP, recovery at D-2)")
        cooldown = int(getattr(c, "cooldown_epochs", 0) or 0)
        return {
            "description": f"imported from CLCA's official code ({c.model})",
            "data": {"dataset": getattr(c, "dataset_name", None) or "unknown", "resize_ratio": 8 / 7,
                     "interpolation": "bicubic"},
            "model": {"backbone": backbone, "weights": "none", "image_size": int(c.input_size),
                      "num_classes": int(c.num_classes), "method": "clca", "token_reduction": kind,
                      "keep_rate": float(rates[0]), "reduction_locs": [int(i) for i in c.reduction_loc],
                      "drop": float(getattr(c, "drop", 0.0) or 0.0), "drop_path": float(getattr(c, "drop_path", 0.0) or 0.0),
                      "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "pos_embed_resize": "bicubic"},
            "optim": {"name": "adamw" if str(getattr(c, "opt", "adamw")).lower() == "adamw" else "sgd",
                      "lr": float(c.lr), "weight_decay": float(getattr(c, "weight_decay", 0.05)),
                      "clip_grad": float(getattr(c, "clip_grad", None) or 0.0)},
            "schedule": {"warmup_epochs": int(getattr(c, "warmup_epochs", 0) or 0), "cooldown_epochs": cooldown,
                         "warmup_lr": float(getattr(c, "warmup_lr", 1e-6)), "min_lr": float(getattr(c, "min_lr", 1e-5))},
            "train": {"epochs": int(c.epochs) + cooldown, "batch_size": int(c.batch_size), "seed": int(getattr(c, "seed", 1))},
            "eval": {"every": 0},
        }

    def upstream_rename(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official state dict (timm's names plus ``clr`` and ``ifa_head.*``) with the carrier's position
        (the last row of ``pos_embed``) split off before anything resamples the grid, and the unused
        1000-way ``head.*`` counted (both totals in a notice) and dropped."""
        out = dict(state)
        if "pos_embed" in out and "clr" in out:
            out["pos_embed"], out["clr_pos"] = out["pos_embed"][:, :-1], out["pos_embed"][:, -1:]
        unused = {k: t for k, t in out.items() if k.startswith("head.")}
        if unused:
            params = sum(t.numel() for k, t in state.items() if not k.endswith(_BN_BUFFERS))
            n = sum(t.numel() for t in unused.values())
            warnings.warn(RecipeNotice(f"the official model's 1000-way head, which its forward never uses, is not "
                                       f"built: {params - n:,} parameters here, {params:,} with it ({n:,} dropped)"),
                          stacklevel=2)
        return {k: t for k, t in out.items() if k not in unused}

    def map_upstream_key(self, key: str, state: dict[str, torch.Tensor]) -> str | None:
        """``ifa_head.*`` -> the head, ``clr``/``clr_pos`` stay, every other key is timm's, under ``vit.``."""
        for ref, ours in self.upstream_head_keys:
            if key.startswith(ref):
                return ours + key[len(ref):]
        return key if key in ("clr", "clr_pos") else "vit." + key


__all__ = ["CLAHead", "CLCA"]
