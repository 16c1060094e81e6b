"""`ufgir train`: run a recipe into a run folder (or resume one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import QuietOpt, SetOpt, console, parse_sets


def train(
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="Recipe name or TOML path.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Shortcut for --set data.dataset=NAME.")] = None,
    sets: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder that holds run folders (default ./runs).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Run folder name (default <dataset>_<method>_<time>).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run folder from checkpoints/last.pt.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder of the same name.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a recipe: ViT + PETL method on a dataset folder; checkpoints, metrics.jsonl and TensorBoard."""
    from ..errors import RecipeError
    from ..paths import runs_dir
    from ..recipe import load_recipe, load_saved_recipe

    if resume is not None:
        if recipe or dataset or sets:
            raise RecipeError("--resume continues a run with its saved recipe; drop --recipe/--dataset/--set")
        if not (resume / "recipe.toml").is_file():
            raise RecipeError(f"--resume {resume}: not a run folder (no recipe.toml)")
        r = load_saved_recipe(resume / "recipe.toml")
        run_dir = resume
    else:
        if recipe is None:
            raise RecipeError("--recipe is required: a packaged name (see `ufgir recipes list`) or a TOML path")
        overrides = parse_sets(sets)
        if dataset:
            overrides.setdefault("data", {})["dataset"] = dataset
        r = load_recipe(recipe, overrides)
        from ..engine.train import default_run_name

        run_dir = (out or runs_dir()) / (name or default_run_name(r))

    from ..engine.train import fit
    from .progress import RichProgress

    summary = fit(r, run_dir, callbacks=[RichProgress(quiet)], resume=resume is not None, overwrite=overwrite)
    console.print(f"next: ufgir eval {summary['run_dir']}   ·   tensorboard --logdir {summary['run_dir']}")
