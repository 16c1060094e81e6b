"""A method's row of the table (``ufgir_cli/methods.py``) -> the backbone modules the model builds.

:class:`MethodPlan` is the row resolved against one recipe (ILA positions come from the recipe,
which took the row's defaults): which parallel adapters, which prompts, which ILAs, what trains.
`UfgirViT` builds the blocks' modules from it; the method object (``model/methods/``) does the rest.
The module kinds a row may name are the builders the model has (``adapters.ADAPTERS``,
``prompts.PROMPT_KINDS``); a row naming another kind fails here, at build time, with the list.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import RecipeError
from ...methods import Part, method_spec
from ...recipe import ModelConfig
from ..adapters import ADAPTERS
from ..prompts import PROMPT_KINDS, PromptKind


@dataclass(frozen=True)
class MethodPlan:
    adapters: str | None  # a key of adapters.ADAPTERS: parallel adapters in every block
    prompts: PromptKind | None
    ila_locs: tuple[int, ...]  # same-resolution ILA after these blocks
    ila_ds_locs: tuple[int, ...]  # down-sampling ILA after these blocks
    trains: tuple[Part, ...] = ("head", "cls")  # what trains (see methods.Part)

    @property
    def train_backbone(self) -> bool:
        """Full fine-tuning: every parameter trains."""
        return "all" in self.trains

    @property
    def ila_positions(self) -> tuple[int, ...]:
        return tuple(sorted(self.ila_locs + self.ila_ds_locs))


def method_plan(cfg: ModelConfig) -> MethodPlan:
    spec = method_spec(cfg.method)
    for slot, kind, known in (("adapter", spec.adapter, tuple(ADAPTERS)), ("prompts", spec.prompts, tuple(PROMPT_KINDS))):
        if kind is not None and kind not in known:
            raise RecipeError(f"method {spec.name!r} asks for {slot} {kind!r}, which the model cannot build "
                              f"(known: {', '.join(known)})")
    return MethodPlan(
        adapters=spec.adapter,
        prompts=PROMPT_KINDS[spec.prompts] if spec.prompts else None,
        ila_locs=tuple(cfg.ila_locs or ()),
        ila_ds_locs=tuple(cfg.ila_ds_locs or ()),
        trains=("all",) if cfg.train_backbone else spec.trains,
    )
