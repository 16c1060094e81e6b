"""`ufgir reproduce`: the paper's Table 1 (every method x dataset, seeds) here or on a Slurm cluster."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from ..io import plural
from ._common import PlainCommand, PlainGroup, QuietOpt, console, fmt, parse_sets

app = typer.Typer(cls=PlainGroup, invoke_without_command=True, add_completion=False, rich_markup_mode="rich")

OutOpt = Annotated[Path, typer.Option("--out", help="Folder that holds reproduction folders.")]


def _names(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text is not None else None


def _row_sets(sets: list[str] | None) -> tuple[dict, dict]:
    """``--set key=value`` for every row and ``--set ROW:key=value`` for one row (it wins over the plain
    one there), each parsed as `parse_sets` does."""
    plain, per_row = [], {}
    for item in sets or []:
        key = item.partition("=")[0]
        row, sep, rest = key.partition(":")
        if sep:
            per_row.setdefault(row.strip(), []).append(rest + item[len(key):])
        else:
            plain.append(item)
    return parse_sets(plain), {row: parse_sets(items) for row, items in per_row.items()}


def _numbers(text: str | None, kind: type, flag: str) -> list | None:
    try:
        return [kind(x) for x in _names(text)] if text is not None else None
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated {kind.__name__} values", param_hint=flag) from None


@app.callback()
def reproduce(
    ctx: typer.Context,
    methods: Annotated[str | None, typer.Option(
        "--methods", help="Rows, comma-separated: methods or packaged recipes such as transfg_ft (default: every "
        "method with a number in the paper's Table 1).")] = None,
    datasets: Annotated[str, typer.Option("--datasets", help="Datasets, comma-separated; soyageing adds its rounds.")]
        = "cotton80,soyageing,soygene,soyglobal,soylocal",
    image_size: Annotated[int, typer.Option("--image-size", min=16, help="Image size of every run (the paper's: 448).")] = 448,
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds of each sweep's phase 2, comma-separated.")] = "1,10,100",
    lr: Annotated[str | None, typer.Option(
        "--lr", help="Learning rates of every sweep's phase 1 (default: each recipe's sweep.lrs, else the paper's "
        "0.3,0.1,0.03,0.01,0.003).")] = None,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a recipe key in every row, e.g. --set train.epochs=5; ROW:key=value for one "
        "row only, e.g. --set ila_pp:model.ila_ds_locs=[1,3] (repeatable).")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Folder name under --out (default table1_<size>: the same command continues it).")] = None,
    out: OutOpt = Path("reproduce"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (runs, epochs, steps, hours) and exit.")] = False,
    step_seconds: Annotated[float | None, typer.Option(
        "--step-seconds", min=0.0, help="Seconds per training step for --dry-run (default: from --bench).")] = None,
    bench: Annotated[Path, typer.Option("--bench", help="A `make bench` result whose step times --dry-run uses.")]
        = Path("benchmarks/results/cpu.json"),
    launcher: Annotated[str, typer.Option("--launcher", help="local (here) or slurm (a job array through submitit).")] = "local",
    gpus: Annotated[str | None, typer.Option(
        "--gpus", help="local: GPU ids to spread each sweep's runs over, e.g. 0,1,2,3 (default: one run after another).")] = None,
    gpus_per_run: Annotated[int, typer.Option("--gpus-per-run", min=1, help="GPUs of one run; more than 1 starts it through torchrun.")] = 1,
    partition: Annotated[str | None, typer.Option("--partition", help="slurm: the partition.")] = None,
    time: Annotated[int, typer.Option("--time", min=1, help="slurm: minutes per job; a job at its limit is requeued and resumes.")] = 1440,
    account: Annotated[str | None, typer.Option("--account", help="slurm: the account to charge.")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="slurm: submit and exit; `ufgir reproduce status` follows the runs.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the paper's protocol (`ufgir sweep`) for every method x dataset and write
    reproduce/<name>/table1.{md,csv,tex}: test top-1 mean ± sample std over seeds beside the paper's number.

    The same command again skips finished runs and resumes killed ones. `ufgir reproduce status [NAME]`
    lists every run as done, running, resumable, failed or pending.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..reproduce import check_grid, make_grid

    if launcher not in ("local", "slurm"):
        raise typer.BadParameter(f"{launcher!r} is not local or slurm", param_hint="--launcher")
    plain, per_row = _row_sets(sets)
    grid = make_grid(_names(methods), _names(datasets) or [], image_size=image_size,
                     seeds=_numbers(seeds, int, "--seeds"), lrs=_numbers(lr, float, "--lr"),
                     overrides=plain, row_overrides=per_row, name=name, out=out)
    if dry_run:
        built = check_grid(grid)
        _print_plan(grid, step_seconds, bench)
        console.print(f"checked: {built} distinct model(s) of {len(grid.methods) * len(grid.tasks)} sweeps built "
                      "on the meta device", soft_wrap=True)
        return
    console.print(f"reproduce {grid.name}: {plural(len(grid.methods), 'method')} x {plural(len(grid.tasks), 'task')} x "
                  f"{plural(len(grid.seeds), 'seed')} · folder {grid.root}", soft_wrap=True)
    if launcher == "slurm":
        _slurm(grid, partition, gpus_per_run, time, account, no_wait)
        return
    from ..engine.state import Interrupted
    from ..errors import TrainingError
    from ..reproduce import run_local
    from .progress import RichProgress

    gpu_ids = _names(gpus)

    def on_event(kind: str, cell: str, sweep, run, info: dict) -> None:
        if kind == "sweep_failed":
            console.print(f"failed   {cell}: {info['error']}", soft_wrap=True, markup=False)
        elif kind in ("started", "finished", "failed"):
            extra = f": {info['error']}" if kind == "failed" else ""
            console.print(f"{kind:8} {cell} {run.label}{extra}", soft_wrap=True, markup=False)

    shown: list = []

    def callbacks(run) -> list:
        shown.append(RichProgress(quiet))
        return shown[-1:]

    try:
        table, failed = run_local(grid, gpus=gpu_ids, gpus_per_run=gpus_per_run, on_event=on_event, callbacks=callbacks)
    except Interrupted as stop:
        raise Interrupted(f"reproduce {grid.name} stopped by {signal.Signals(stop.signum).name}; finished runs are "
                          "kept and the stopped one saved its checkpoint: the same command continues it", stop.signum) from None
    finally:
        for p in shown:
            p.progress.stop()
    console.print(f"table: {table}", soft_wrap=True)
    if failed:
        raise TrainingError(f"{len(failed)} of {len(grid.methods) * len(grid.tasks)} sweeps of {grid.name} stopped on "
                            f"an error (listed under the table and in `ufgir reproduce status {grid.name}`); the "
                            "same command retries them")


def _slurm(grid, partition, gpus_per_run, time, account, no_wait) -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise typer.BadParameter("needs submitit: pip install 'ufgir[slurm]'", param_hint="--launcher") from None
    from ..reproduce import check_grid, slurm_executor, submit, wait_and_tabulate

    check_grid(grid)  # every model builds, before anything is submitted

    jobs = submit(grid, slurm_executor(grid, partition=partition, gpus_per_run=gpus_per_run, time_min=time,
                                       account=account), gpus_per_run=gpus_per_run)
    console.print(f"submitted {len(jobs)} job(s){': ' + jobs[0].job_id.split('_')[0] if jobs else ''}; "
                  f"logs under {grid.root / 'submitit'}", soft_wrap=True)
    if no_wait:
        console.print(f"follow: ufgir reproduce status {grid.name}", soft_wrap=True)
        return
    console.print(f"table: {wait_and_tabulate(grid, jobs)}", soft_wrap=True)


def _print_plan(grid, step_seconds: float | None, bench: Path) -> None:
    from ..reproduce import StepTime, plan_rows, step_time

    times = {m: StepTime(step_seconds, "given", "--step-seconds") if step_seconds is not None else step_time(grid, m, bench)
             for m in grid.methods}
    rows = plan_rows(grid, times)
    lrs = "each recipe's sweep.lrs (else the paper's)" if grid.lrs is None else ", ".join(f"{x:g}" for x in grid.lrs)
    console.print(f"plan {grid.name} ({grid.root}): phase 1 lr {lrs} on train, "
                  f"phase 2 seeds {', '.join(map(str, grid.seeds))} on train_val", soft_wrap=True)
    console.print(f"{'method':12} {'task':14} {'runs':>4} {'epochs':>6} {'batch':>5} {'steps':>9} {'s/step':>7} "
                  f"{'hours':>8}  step time", markup=False)
    for r in rows:
        console.print(f"{r['method']:12} {r['task']:14} {r['runs']:>4} {r['epochs']:>6} {r['batch_size']:>5} "
                      f"{fmt(r['steps'], 'd'):>9} {fmt(r['step_s'], '.2f'):>7} {fmt(r['hours'], '.1f'):>8}  {r['step_how']}",
                      markup=False, soft_wrap=True)
    hours = [r["hours"] for r in rows]
    total = f"{sum(hours):.1f} h" if all(h is not None for h in hours) else "unknown (give --step-seconds)"
    console.print(f"total: {sum(r['runs'] for r in rows)} runs, {sum(r['steps'] or 0 for r in rows)} steps, "
                  f"{total} on one device", soft_wrap=True, markup=False)
    for m, t in times.items():
        console.print(f"step time {m}: {t.how}" + (f", {t.note}" if t.note else ""), soft_wrap=True, markup=False)
    unlisted = [r for r in rows if r["steps"] is None]
    if unlisted:
        console.print(f"steps unknown for {', '.join(sorted({r['task'] for r in unlisted}))}: no counts in the catalog "
                      "and not on disk (`ufgir download` it first)", soft_wrap=True, markup=False)


@app.command("status", cls=PlainCommand)
def status(
    name: Annotated[str | None, typer.Argument(help="Reproduction name (default: the only one under --out).")] = None,
    out: OutOpt = Path("reproduce"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
) -> None:
    """Every run of a reproduction: done, running (pid@host, step), resumable (step, why it stopped),
    failed (reason) or pending; one line per run, the status first."""
    from ..errors import RecipeError
    from ..paths import STATUS_KINDS
    from ..reproduce import load_grid, run_status

    if name is None:
        found = sorted(p.parent.name for p in out.glob("*/grid.json"))
        if len(found) != 1:
            raise RecipeError(f"give a reproduction name; under {out}/: {', '.join(found) or 'none'}")
        name = found[0]
    rows = run_status(load_grid(name, out))
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        what = f"phase {r['phase']} " + (f"lr {r['lr']:g} " if r["lr"] is not None else "") + f"seed {r['seed']}"
        detail = f"  {r['detail']}" if r["detail"] != r["status"] else ""
        console.print(f"{r['status']:9} {r['method']:12} {r['task']:14} {what}{detail}", markup=False, soft_wrap=True)
    counts = Counter(r["status"] for r in rows)
    console.print(" · ".join(f"{counts[k]} {k}" for k in STATUS_KINDS), soft_wrap=True)
