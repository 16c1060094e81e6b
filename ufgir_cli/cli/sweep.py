"""`ufgir sweep`: the paper's learning-rate sweep on val, then the chosen rate per seed on test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..io import plural
from ._common import QuietOpt, RecipeOpt, SetOpt, console, fmt, parse_sets


def _numbers(text: str | None, kind: type, flag: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated {kind.__name__} values", param_hint=flag) from None


def sweep(
    recipe: RecipeOpt,
    dataset: Annotated[str | None, typer.Option(help="Shortcut for --set data.dataset=NAME.")] = None,
    lr: Annotated[str | None, typer.Option(
        "--lr", help="Learning rates of phase 1, comma-separated (default: the recipe's sweep.lrs, else the paper's "
        "0.3,0.1,0.03,0.01,0.003).")] = None,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="Seeds of phase 2, comma-separated; phase 1 trains with the first (default 1,10,100).")] = None,
    sets: SetOpt = None,
    backbones: Annotated[str | None, typer.Option(
        "--backbones", help="timm backbones, comma-separated: one sweep per backbone, one after another "
        "(model.backbone above --set; default: the recipe's own).")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Sweep folder name (default from recipe, dataset and --set: the same command continues it; "
        "with several --backbones, NAME_BACKBONE).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder that holds sweep folders.")] = Path("sweeps"),
    gpus: Annotated[str | None, typer.Option(
        "--gpus", help="Run one run per listed GPU at a time, e.g. 0,1,2,3 (default: one run after another).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Phase 1 trains each learning rate on train and evaluates the last epoch on val; phase 2 trains
    the best one (ties: the smaller) on train_val once per seed and evaluates on test.

    Writes sweeps/<name>/{plan.json,sweep.json,summary.md}; run folders go under sweeps/<name>/runs/.
    The same command again skips finished runs and resumes killed ones from their checkpoints.
    """
    from ..errors import RecipeError
    from ..recipe import load_recipe
    from ..sweep import DEFAULT_SEEDS, check_models, make_sweep

    overrides = parse_sets(sets)
    if dataset:
        from ..data.catalog import catalog_name

        overrides.setdefault("data", {})["dataset"] = catalog_name(dataset) or dataset  # any case
    gpu_ids = [g.strip() for g in gpus.split(",") if g.strip()] if gpus is not None else None
    if gpu_ids is not None and (not gpu_ids or len(set(gpu_ids)) != len(gpu_ids)):
        raise typer.BadParameter(f"{gpus!r}: expected distinct GPU ids such as 0,1,2,3", param_hint="--gpus")
    axis = [b.strip() for b in backbones.split(",") if b.strip()] if backbones is not None else []
    if axis and "backbone" in (overrides.get("model") or {}):
        raise RecipeError("--set model.backbone and --backbones: give the backbones in one place")
    if backbones is not None and (not axis or len(set(axis)) != len(axis)):
        raise RecipeError(f"--backbones {backbones!r}: give distinct timm names")
    # Every sweep is checked (its recipe loads on its backbone) before the first one trains.
    todo = [make_sweep(recipe, {**overrides, "model": {**(overrides.get("model") or {}), "backbone": b}} if b else overrides,
                       lrs=_numbers(lr, float, "--lr"), seeds=_numbers(seeds, int, "--seeds") or DEFAULT_SEEDS,
                       name=f"{name}_{b}" if name and len(axis) > 1 else name, out=out) for b in axis or [None]]
    if len(todo) > 1:  # every backbone's model builds (meta device) before the first sweep trains
        check_models([(f"sweep {s.name} (recipe {s.recipe})", load_recipe(s.recipe, s.overrides)) for s in todo])
    for s in todo:
        _run_one(s, gpu_ids, quiet, checked=len(todo) > 1)


def _run_one(s, gpu_ids: list[str] | None, quiet: bool, checked: bool) -> None:
    """Run one sweep, printing each run as it starts and ends, then the chosen rate and the test top-1."""
    from ..sweep import RULE, run_sweep
    from .progress import RichProgress

    console.print(f"sweep {s.name}: lr {', '.join(f'{x:g}' for x in s.lrs)} · seeds "
                  f"{', '.join(map(str, s.seeds))} · chosen by {RULE} · folder {s.root}", soft_wrap=True)

    def on_event(kind: str, run, info: dict) -> None:
        where = f" on gpu {info['gpu']} · log {info['log']}" if "gpu" in info else ""
        if kind == "started":
            what = {"train": "training", "resume": "resuming", "evaluate": "evaluating"}[info["action"]]
            was = f" (was {info['status']})" if info.get("status") not in (None, "pending") else ""
            console.print(f"started  {run.label}: {what} {run.run_dir}{was}{where}", soft_wrap=True, markup=False)
        elif kind == "skipped":
            console.print(f"skipped  {run.label}: {run.metrics_file} exists", soft_wrap=True)
        elif kind == "finished":
            top1 = json.loads(run.metrics_file.read_text())["top1"] if run.metrics_file.is_file() else None
            console.print(f"finished {run.label}: {run.split} top-1 {fmt(top1, '.2f')} % in {info['time_s']:.0f} s{where}",
                          soft_wrap=True)
        else:
            console.print(f"failed   {run.label}: {info['error']}", soft_wrap=True, markup=False)

    shown: list[RichProgress] = []

    def callbacks(run) -> list:
        shown.append(RichProgress(quiet))
        return shown[-1:]

    try:
        report = run_sweep(s, gpus=gpu_ids, on_event=on_event, callbacks=callbacks, checked=checked)
    finally:
        for p in shown:
            p.progress.stop()  # after an error or a stop signal too: the terminal gets its cursor back
    t = report["test"]["top1"]
    console.print(f"chosen lr {report['chosen_lr']:g}: {report['chosen_because']}. Test top-1 "
                  f"{fmt(t['mean'], '.2f')} ± {fmt(t['std'], '.2f')} % over {plural(t['n'], 'seed')}", soft_wrap=True)
    console.print(f"summary: {s.root / 'summary.md'}", soft_wrap=True)
