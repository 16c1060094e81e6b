"""`ufgir inspect`: the model a recipe builds, block by block, with its cost."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ._common import RecipeOpt, SetOpt, console, parse_sets


def inspect(
    recipe: RecipeOpt = "ila_pp",
    image_size: Annotated[int | None, typer.Option(help="Override model.image_size.")] = None,
    num_classes: Annotated[int, typer.Option(help="Head size when the recipe does not fix it.")] = 200,
    sets: SetOpt = None,
) -> None:
    """Per block: tokens, attached modules and trainable parameters; totals, MACs and FLOPs."""
    from ..recipe import load_recipe

    overrides = parse_sets(sets)
    overrides.setdefault("model", {})["weights"] = "none"  # structure and cost need no weights
    if image_size is not None:
        overrides["model"]["image_size"] = image_size
    r = load_recipe(recipe, overrides)

    import torch

    from ..analysis.cost import count_flops, count_params
    from ..model import build_model

    with torch.device("meta"):  # no storage, no init cost: inspect a ViT-L in a second
        model = build_model(r.model, r.model.num_classes or num_classes)
    table = Table(title=f"{r.model.backbone} · {r.model.method} · {r.model.image_size}px", title_justify="left")
    for col in ("block", "tokens in", "tokens out", "attached", "trainable params"):
        table.add_column(col, justify="right" if col != "attached" else "left")
    tokens_in = model.num_prefix_tokens + model.grids[0][0] * model.grids[0][1]
    for i, out in enumerate(model.tokens_per_block):
        parts, n = [], 0
        if model.adapters is not None:
            parts.append(model.plan.adapters)
            n += sum(p.numel() for p in model.adapters[i].parameters())
        if model.plan.prompts == "deep" or (model.plan.prompts == "shallow" and i == 0):
            parts.append(f"prompts x{model.prompt_len}")
            n += model.prompt_len * model.embed_dim
        if str(i) in model.ila:
            ila = model.ila[str(i)]
            parts.append("DS-ILA" if ila.downsample else "ILA")
            n += sum(p.numel() for p in ila.parameters())
        table.add_row(str(i), str(tokens_in), str(out), ", ".join(parts) or "-", f"{n:,}")
        tokens_in = out
    console.print(table)
    pc = count_params(model)
    flops = count_flops(model, r.model.image_size)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    console.print(
        f"parameters: total {pc.total:,} · trainable {pc.trainable:,} "
        f"(head {head:,}, CLS {model.embed_dim if model.vit.cls_token is not None else 0:,})\n"
        f"per image: {flops / 2e9:.2f} GMACs (multiply-adds) · {flops / 1e9:.2f} GFLOPs"
    )
