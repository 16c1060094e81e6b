"""A method's row of the table (``ufgir_cli/methods.py``) -> what the model builds.

:class:`MethodPlan` is the row resolved against one recipe (ILA positions come from the recipe,
which took the row's defaults). The model builder reads only the plan. The module kinds a row may
name are the builders the model has (``adapters.ADAPTERS``, the prompt kinds UfgirViT inserts); a
row naming another kind fails here, at build time, with the list of kinds that exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError
from ..methods import Part, method_spec
from ..recipe import ModelConfig
from .adapters import ADAPTERS
from .heads import HEADS

#: Prompt kinds UfgirViT inserts: once before block 0, per block, or per block as queries only (VQT).
PROMPT_KINDS = ("shallow", "deep", "vqt")


@dataclass(frozen=True)
class MethodPlan:
    adapters: str | None  # "adapter" | "convpass" | None: parallel adapters in every block
    prompts: str | None  # "shallow" | "deep" | None
    ila_locs: tuple[int, ...]  # same-resolution ILA after these blocks
    ila_ds_locs: tuple[int, ...]  # down-sampling ILA after these blocks
    trains: tuple[Part, ...] = ("head", "cls")  # what trains (see methods.Part)
    head: str = "linear"  # "linear" (timm's head on the CLS token) or a head of model/heads.py
    selector: str | None = None  # aggregator heads: "psm" (TransFG) or "maws" (FFVT)

    @property
    def train_backbone(self) -> bool:
        """Full fine-tuning: every parameter trains."""
        return "all" in self.trains

    @property
    def ila_positions(self) -> tuple[int, ...]:
        return tuple(sorted(self.ila_locs + self.ila_ds_locs))


def method_plan(cfg: ModelConfig) -> MethodPlan:
    spec = method_spec(cfg.method)
    slots = (("adapter", spec.adapter, tuple(ADAPTERS)), ("prompts", spec.prompts, PROMPT_KINDS),
             ("head", spec.head, ("linear", *HEADS)))
    for slot, kind, known in slots:
        if kind is not None and kind not in known:
            raise RecipeError(f"method {spec.name!r} asks for {slot} {kind!r}, which the model cannot build "
                              f"(known: {', '.join(known)})")
    return MethodPlan(
        adapters=spec.adapter,
        prompts=spec.prompts,
        ila_locs=tuple(cfg.ila_locs or ()),
        ila_ds_locs=tuple(cfg.ila_ds_locs or ()),
        trains=("all",) if cfg.train_backbone else spec.trains,
        head=spec.head,
        selector=spec.selector,
    )
