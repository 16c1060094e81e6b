"""`ufgir inspect`: the model a recipe builds, block by block, with its cost."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ._common import RecipeOpt, SetOpt, console, parse_sets, print_eval_modes


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
                  caption=spec.description, title_justify="left", caption_justify="left")
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
        if b.index in notes:
            parts.append(notes[b.index])
        grid = f"{b.grid[0]}x{b.grid[1]}" + (f" -> {b.out_grid[0]}x{b.out_grid[1]}" if b.out_grid != b.grid else "")
        table.add_row(str(b.index), group_of[b.index], grid, str(b.tokens_attended), str(b.tokens_out),
                      ", ".join(parts) or "-", f"{n:,}")
    console.print(table)
    c = cost_summary(model, r.model.image_size)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    console.print(
        f"parameters: total {c['params_total']:,} · trainable {c['params_trainable']:,} "
        f"(head {head:,} for {classes} classes, {source}; {_cls(model)})\n"
        f"per image: {c['macs'] / 1e9:.2f} GMACs (multiply-adds) · {c['flops'] / 1e9:.2f} GFLOPs"
    )
    print_eval_modes(c)
