"""`ufgir pretrain-backbone`: re-create the micro ViT that the CPU demo adapts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console


def pretrain_backbone(
    out: Annotated[Path | None, typer.Option(help="Folder for the .safetensors weights (default: the installed "
                                             "package's assets folder, where the micro ViT is loaded from; "
                                             "a relative path is taken from the current folder).")] = None,
    images: Annotated[int, typer.Option(help="Synthetic pretraining images.")] = 24_000,
    epochs: Annotated[int, typer.Option(help="Epochs over them.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for rendering and initialisation.")] = 0,
) -> None:
    """Pretrain ufgir_vit_micro_patch8_64 on synthetic leaf-mark attributes (tens of CPU minutes)."""
    from ..engine.pretrain import pretrain_backbone as run
    from ..model.vit import ASSETS

    path = run(out or ASSETS, images=images, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=console.print)
    console.print(f"backbone weights: {path}", soft_wrap=True, markup=False)
