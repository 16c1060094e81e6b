"""`ufgir train`: run a recipe into a run folder (or resume one)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ._common import DEVICE_HELP, QuietOpt, SetOpt, check_device, console, err_console, parse_sets


def _resume_epochs(sets: list[str] | None, flags) -> int | None:
    """With --resume: the one --set it takes (``train.epochs=N``, to train longer), or None; any other
    option (``flags``: (flag, value) pairs) is refused, since a resume continues the saved recipe."""
    from ..errors import RecipeError

    overrides = parse_sets(sets)
    epochs = (overrides.get("train") or {}).get("epochs") if overrides.keys() == {"train"} else None
    other_sets = bool(sets) and (epochs is None or overrides["train"].keys() != {"epochs"})
    given = [flag for flag, v in (*flags, ("--set", other_sets)) if v]
    if given:
        raise RecipeError(f"--resume continues a run in place with its saved recipe (only --set train.epochs=N "
                          f"may extend it); drop {', '.join(given)}")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
        raise RecipeError(f"--set train.epochs={epochs!r}: give a whole number of epochs, at least 1")
    return epochs


def train(
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="Recipe name or TOML path.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Shortcut for --set data.dataset=NAME.")] = None,
    sets: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder that holds run folders (default ./runs).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Run folder name (default <dataset>_<method>_<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue this run folder from checkpoints/last.pt, bit-exactly, with its saved recipe.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder of the same name.")] = False,
    skip_corrupt: Annotated[bool, typer.Option(
        "--skip-corrupt", help="Leave out missing or undecodable images (counted) instead of stopping; "
        "same as --set data.skip_corrupt=true.")] = False,
    device: Annotated[str | None, typer.Option("--device", help=DEVICE_HELP, show_default=False,
                                               callback=check_device)] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=0, show_default=False, help="torch CPU threads (0: the cores this process may use, less one "
        "per data-loader worker; the default). Same as --set train.threads=N.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a recipe: ViT + PETL method on a dataset folder; checkpoints, metrics.jsonl and TensorBoard.

    Ctrl-C or SIGTERM finish the current step, save a checkpoint and print the command that resumes it.
    """
    from ..errors import RecipeError
    from ..paths import RunDir, runs_dir
    from ..recipe import load_recipe

    epochs = None
    if resume is not None:
        epochs = _resume_epochs(sets, (("--recipe", recipe), ("--dataset", dataset), ("--out", out), ("--name", name),
                                       ("--overwrite", overwrite), ("--skip-corrupt", skip_corrupt),
                                       ("--device", device), ("--threads", threads is not None)))
        r, run_dir = None, resume
    else:
        if recipe is None:
            raise RecipeError("--recipe is required: a packaged name (see `ufgir recipes list`) or a TOML path")
        overrides = parse_sets(sets)
        if dataset:
            from ..data.catalog import catalog_name

            overrides.setdefault("data", {})["dataset"] = catalog_name(dataset) or dataset  # any case
        if skip_corrupt:
            overrides.setdefault("data", {})["skip_corrupt"] = True
        if device is not None:
            overrides.setdefault("train", {})["device"] = device
        if threads is not None:
            overrides.setdefault("train", {})["threads"] = threads
        r = load_recipe(recipe, overrides)
        from ..engine.train import default_run_name

        if name is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RecipeError("under torchrun pass --name, so that every rank uses the same run folder")
        run_dir = (out or runs_dir()) / (name or default_run_name(r))

    from ..engine.train import Interrupted, fit
    from ..engine.train import resume as resume_run
    from .progress import RichProgress

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 shows progress
    progress = RichProgress(quiet)
    try:
        shown = [progress] if main_rank else []
        summary = resume_run(run_dir, callbacks=shown, epochs=epochs) if r is None else \
            fit(r, run_dir, callbacks=shown, resume=False, overwrite=overwrite)
    except Interrupted as stop:
        # The live display redraws until stopped: stop it first, so that the resume command is the last
        # line on the screen (or in a log), on its own line.
        progress.close()
        err_console.print(str(stop), soft_wrap=True, markup=False)
        raise typer.Exit(stop.exit_code) from None
    finally:
        progress.close()  # after an error too: the terminal gets its cursor back
    if summary["skipped_images"]:
        console.print(f"skipped {summary['skipped_images']} unreadable images (listed in "
                      f"{RunDir(summary['run_dir']).provenance_file} under dataset.skipped_images)", soft_wrap=True)
    console.print(f"next: ufgir eval {summary['run_dir']}   ·   tensorboard --logdir {summary['run_dir']}",
                  soft_wrap=True, markup=False)
