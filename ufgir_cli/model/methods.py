"""Which modules each method adds, and where. Pure data: no torch, no timm.

One :class:`MethodPlan` per method of reference/ILA.md section 3. The model builder reads only the
plan, so a new method is a new row here plus, at most, a new module.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..recipe import ModelConfig


@dataclass(frozen=True)
class MethodPlan:
    adapters: str | None  # "adapter" | "convpass" | None: parallel adapters in every block
    prompts: str | None  # "shallow" | "deep" | None
    ila_locs: tuple[int, ...]  # same-resolution ILA after these blocks
    ila_ds_locs: tuple[int, ...]  # down-sampling ILA after these blocks
    train_backbone: bool  # full fine-tuning

    @property
    def ila_positions(self) -> tuple[int, ...]:
        return tuple(sorted(self.ila_locs + self.ila_ds_locs))


_ADAPTERS = {"adapter": "adapter", "convpass": "convpass", "ila_pp": "adapter"}
_PROMPTS = {"vpt_shallow": "shallow", "vpt_deep": "deep"}


def method_plan(cfg: ModelConfig) -> MethodPlan:
    return MethodPlan(
        adapters=_ADAPTERS.get(cfg.method),
        prompts=_PROMPTS.get(cfg.method),
        ila_locs=tuple(cfg.ila_locs or ()),
        ila_ds_locs=tuple(cfg.ila_ds_locs or ()),
        train_backbone=cfg.method == "full",
    )
