"""`ufgir inspect`: the model a recipe builds, block by block, with its cost."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ._common import RecipeOpt, SetOpt, console, parse_sets, print_eval_modes

#: How ``ufgir inspect`` names a token reduction (``model.token_reduction``).
_REDUCTION_TITLES = {"evit": "EViT", "tome": "ToMe"}


def _class_count(r, given: int | None) -> tuple[int, str]:
    """The head size to build and where it comes from, so that inspect counts what training will train."""
    from ..data.folder import dataset_counts

    if given is not None:
        return given, "--num-classes"
    if r.model.num_classes:
        return r.model.num_classes, "model.num_classes"
    name = r.data.dataset
    counts = dataset_counts(name, r.data.root)
    where = {"catalog": f"the {name} catalog entry", "disk": f"the {name} folder's dataset.json",
             "generator": f"the {name} dataset as `ufgir train` generates it"}
    if counts.num_classes:
        return counts.num_classes, where[counts.source]
    return 200, f"assumed: {name} is unknown here; pass --num-classes"


def _cls(model) -> str:
    cls = model.vit.cls_token
    if cls is None:
        return "no CLS token"
    return f"CLS {cls.numel():,}" if cls.requires_grad else "CLS token frozen"


def _blocks(indices: list[int]) -> str:
    """[1, 3] -> "blocks 1 and 3"; [3] -> "block 3"."""
    if len(indices) == 1:
        return f"block {indices[0]}"
    return f"blocks {', '.join(map(str, indices[:-1]))} and {indices[-1]}"


def _layout(model, spec) -> str:
    """What the method attaches where, on this model: an ILA method's positions as built (not the
    12-block positions its table entry names), else the method's description."""
    if not spec.has_ila:
        return spec.description
    parts = []
    for kind, name in (("down", "down-sampling ILA"), ("same", "same-resolution ILA")):
        at = [b.index for b in model.feature_info if b.ila == kind]
        if at:
            parts.append(f"{name} after {_blocks(at)}")
    if model.adapters is not None:
        parts.append(f"parallel adapters ({model.plan.adapters}) in every block")
    return f"{spec.display_name} on this {len(model.feature_info)}-block backbone: " + (" + ".join(parts) or "no ILA")


def _head_blocks(model) -> list:
    """Transformer blocks inside the head (an aggregator block), found by the backbone's block type."""
    kind = type(model.vit.blocks[0])
    return [m for m in model.get_classifier().modules() if isinstance(m, kind)]


def inspect(
    recipe: RecipeOpt = "ila_pp",
    image_size: Annotated[int | None, typer.Option(help="Override model.image_size.")] = None,
    num_classes: Annotated[int | None, typer.Option(
        min=1, show_default=False, help="Head size (default: the recipe's model.num_classes, else the dataset's).")] = None,
    sets: SetOpt = None,
) -> None:
    """Per block: tokens, attached modules and trainable parameters; totals, MACs and FLOPs."""
    from ..recipe import load_recipe

    overrides = parse_sets(sets)
    overrides.setdefault("model", {})["weights"] = "none"  # structure and cost need no weights
    if image_size is not None:
        overrides["model"]["image_size"] = image_size
    r = load_recipe(recipe, overrides)

    from ..analysis.cost import cost_summary
    from ..analysis.rollout import encoder_groups
    from ..methods import method_spec
    from ..model import meta_model

    classes, source = _class_count(r, num_classes)
    model = meta_model(r.model, classes)  # no storage, no init cost: inspect a ViT-L in a second
    spec = method_spec(r.model.method)
    table = Table(title=f"{r.model.backbone} · {spec.name} ({spec.family}) · {r.model.image_size}px",
                  title_justify="left")
    for col in ("block", "group", "grid", "tokens attended", "tokens out", "attached", "trainable params"):
        table.add_column(col, justify="left" if col == "attached" else "right")
    group_of = {i: f"{a}-{b - 1}" for a, b in encoder_groups(model.grids) for i in range(a, b)}
    notes = model.method.block_notes(model)  # what the method itself does after a block (SimTrans's injections)
    for b in model.feature_info:
        parts, n = [], 0
        if model.adapters is not None:
            parts.append(model.plan.adapters)
            n += sum(p.numel() for p in model.adapters[b.index].parameters())
        kind = model.plan.prompts
        if kind is not None and kind.shown_at(b.index):
            parts.append(f"{kind.label} x{model.prompt_len}")
            n += model.prompt_len * model.embed_dim
        inside = 0 if model.plan.train_backbone else \
            sum(p.numel() for p in model.vit.blocks[b.index].parameters() if p.requires_grad)
        if inside:  # what the method tunes inside the block itself (LoRA, SSF, BitFit)
            parts.append(model.method.block_label or "trainable backbone tensors")
            n += inside
        if b.ila is not None:
            parts.append(f"{'DS-ILA' if b.ila == 'down' else 'ILA'} {b.ila_kernel}x{b.ila_kernel}")
            n += sum(p.numel() for p in model.ila[str(b.index)].parameters())
        if model.reduction is not None and b.index in model.reduction.locs:
            parts.append(f"{_REDUCTION_TITLES[model.reduction.kind]} keep {model.reduction.keep_rate:g}")
        if b.index in notes:
            parts.append(notes[b.index])
        grid = "-" if b.grid is None else f"{b.grid[0]}x{b.grid[1]}" + (
            "" if b.out_grid == b.grid else f" -> {'tokens' if b.out_grid is None else f'{b.out_grid[0]}x{b.out_grid[1]}'}")
        table.add_row(str(b.index), group_of[b.index], grid, str(b.tokens_attended), str(b.tokens_out),
                      ", ".join(parts) or "-", f"{n:,}")
    extra = _head_blocks(model)
    for k, blk in enumerate(extra):  # GLSim's, TransFG's, FFVT's aggregator: a block of its own, not "head"
        table.add_row(str(len(model.feature_info) + k), "head", "-", "-", "-", "aggregator block (in the head)",
                      f"{sum(p.numel() for p in blk.parameters() if p.requires_grad):,}")
    console.print(table)
    console.print(_layout(model, spec), soft_wrap=True, markup=False)
    c = cost_summary(model, r.model.image_size)
    aggregator = sum(p.numel() for blk in extra for p in blk.parameters())
    head = sum(p.numel() for p in model.get_classifier().parameters()) - aggregator
    blocks = f"aggregator block {aggregator:,}; " if extra else ""
    console.print(
        f"parameters: total {c['params_total']:,} · trainable {c['params_trainable']:,} "
        f"({blocks}head {head:,} for {classes} classes, {source}; {_cls(model)})\n"
        f"per image: {c['macs'] / 1e9:.2f} GMACs (multiply-adds) · {c['flops'] / 1e9:.2f} GFLOPs"
    )
    print_eval_modes(c)
