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
    from ..methods import method_spec
    from ..model import build_model

    with torch.device("meta"):  # no storage, no init cost: inspect a ViT-L in a second
        model = build_model(r.model, r.model.num_classes or num_classes)
    spec = method_spec(r.model.method)
    table = Table(title=f"{r.model.backbone} · {spec.name} ({spec.family}) · {r.model.image_size}px",
                  caption=spec.description, title_justify="left", caption_justify="left")
    for col in ("block", "grid", "tokens in", "tokens out", "attached", "trainable params"):
        table.add_column(col, justify="left" if col == "attached" else "right")
    info = model.feature_info
    tokens_in = info[0].num_prefix_tokens + info[0].grid[0] * info[0].grid[1]
    for b in info:
        parts, n = [], 0
        if model.adapters is not None:
            parts.append(model.plan.adapters)
            n += sum(p.numel() for p in model.adapters[b.index].parameters())
        if b.num_prompts or (model.plan.prompts == "shallow" and b.index == 0) or model.plan.prompts == "vqt":
            parts.append(f"{'query-only ' if model.plan.prompts == 'vqt' else ''}prompts x{model.prompt_len}")
            n += model.prompt_len * model.embed_dim
        if b.ila is not None:
            parts.append(f"{'DS-ILA' if b.ila == 'down' else 'ILA'} {b.ila_kernel}x{b.ila_kernel}")
            n += sum(p.numel() for p in model.ila[str(b.index)].parameters())
        grid = f"{b.grid[0]}x{b.grid[1]}" + (f" -> {b.out_grid[0]}x{b.out_grid[1]}" if b.out_grid != b.grid else "")
        table.add_row(str(b.index), grid, str(tokens_in), str(b.tokens_out), ", ".join(parts) or "-", f"{n:,}")
        tokens_in = b.tokens_out
    console.print(table)
    pc = count_params(model)
    flops = count_flops(model, r.model.image_size)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    console.print(
        f"parameters: total {pc.total:,} · trainable {pc.trainable:,} "
        f"(head {head:,}, CLS {model.embed_dim if model.vit.cls_token is not None else 0:,})\n"
        f"per image: {flops / 2e9:.2f} GMACs (multiply-adds) · {flops / 1e9:.2f} GFLOPs"
    )
