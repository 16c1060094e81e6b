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
    backbones: Annotated[str | None, typer.Option(
        "--backbones", help="timm backbones, comma-separated: every row runs on each (model.backbone per sweep, above "
        "--set and below --set ROW:key=value); default: the recipes' own.")] = None,
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
        "--step-seconds", min=0.0,
        help="Seconds per training step for --dry-run and slurm's requeue count (default: from --bench).")] = None,
    bench: Annotated[Path, typer.Option("--bench", help="A `make bench` result whose step times --dry-run and slurm use.")]
        = Path("benchmarks/results/cpu.json"),
    launcher: Annotated[str, typer.Option("--launcher", help="local (here) or slurm (a job array through submitit).")] = "local",
    gpus: Annotated[str | None, typer.Option(
        "--gpus", help="local: GPU ids to spread each sweep's runs over, e.g. 0,1,2,3 (default: one run after another).")] = None,
    gpus_per_run: Annotated[int | None, typer.Option(
        "--gpus-per-run", min=1, help="GPUs of one run (default 1); more than 1 starts it through torchrun. "
        "slurm: the GPUs each job asks for (default: none, a CPU job).")] = None,
    partition: Annotated[str | None, typer.Option("--partition", help="slurm: the partition.")] = None,
    time: Annotated[int, typer.Option("--time", min=1, help="slurm: minutes per job; a job at its limit is requeued and resumes.")] = 1440,
    account: Annotated[str | None, typer.Option("--account", help="slurm: the account to charge.")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="slurm: submit and exit; `ufgir reproduce status` follows the runs.")] = False,
    gpu_type: Annotated[str | None, typer.Option("--gpu-type", help="slurm: the GPU type, e.g. a100 (--gres=gpu:TYPE:N).")] = None,
    cpus_per_task: Annotated[int | None, typer.Option(
        "--cpus-per-task", min=1, help="slurm: CPUs per job (default: the recipes' data.num_workers + 1, per GPU).")] = None,
    mem: Annotated[str | None, typer.Option("--mem", help="slurm: memory per job, e.g. 32G (default: the partition's).")] = None,
    qos: Annotated[str | None, typer.Option("--qos", help="slurm: the quality of service.")] = None,
    constraint: Annotated[str | None, typer.Option("--constraint", help="slurm: node features, e.g. 'a100|h100'.")] = None,
    sbatch: Annotated[list[str] | None, typer.Option(
        "--sbatch", help="slurm: any other sbatch option, KEY=VALUE or a bare flag (repeatable), e.g. mail-type=END.")] = None,
    max_requeues: Annotated[int | None, typer.Option(
        "--max-requeues", min=0, help="slurm: requeues at the time limit per job (default: from the planned hours and --time).")]
        = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the paper's protocol (`ufgir sweep`) for every method x dataset and write
    reproduce/<name>/table1.{md,csv,tex}: test top-1 mean ± sample std over seeds beside the paper's number.

    The same command again skips finished runs and resumes killed ones. `ufgir reproduce status [NAME]`
    lists every run as done, running, resumable, failed or pending.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..reproduce import make_grid

    _check_launcher(launcher, dry_run)
    plain, per_row = _row_sets(sets)
    grid = make_grid(_names(methods), _names(datasets) or [], image_size=image_size,
                     seeds=_numbers(seeds, int, "--seeds"), lrs=_numbers(lr, float, "--lr"),
                     overrides=plain, row_overrides=per_row, name=name, out=out, backbones=_names(backbones) or ())
    if dry_run:
        _dry_run(grid, step_seconds, bench)
        return
    axis = f" x {plural(len(grid.backbones), 'backbone')}" if grid.backbones else ""
    console.print(f"reproduce {grid.name}: {plural(len(grid.methods), 'method')}{axis} x {plural(len(grid.tasks), 'task')} x "
                  f"{plural(len(grid.seeds), 'seed')} · folder {grid.root}", soft_wrap=True)
    if launcher == "slurm":
        from ..reproduce import SlurmOptions

        opts = SlurmOptions(partition=partition, account=account, qos=qos, constraint=constraint, time_min=time,
                            gpus=gpus_per_run or 0, gpu_type=gpu_type, cpus_per_task=cpus_per_task, mem=mem,
                            max_requeues=max_requeues, sbatch=tuple(sbatch or ()))
        _slurm(grid, opts, no_wait, step_seconds, bench)
        return
    _local(grid, _names(gpus), gpus_per_run or 1, quiet)


def _dry_run(grid, step_seconds: float | None, bench: Path) -> None:
    """Build every distinct model of the grid on the meta device, then print the plan: runs and hours."""
    from ..reproduce import check_grid

    built = check_grid(grid)
    _print_plan(grid, step_seconds, bench)
    console.print(f"checked: {built} distinct model(s) of {len(grid.rows) * len(grid.tasks)} sweeps built "
                  "on the meta device", soft_wrap=True)


def _local(grid, gpu_ids: list[str] | None, gpus_per_run: int, quiet: bool) -> None:
    """Run the grid here; print each run as it starts and ends, then the table; exit non-zero when a
    sweep stopped on an error, 130 on Ctrl-C."""
    from ..engine.state import Interrupted
    from ..errors import TrainingError
    from ..reproduce import run_local
    from .progress import RichProgress

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
        raise TrainingError(f"{len(failed)} of {len(grid.rows) * len(grid.tasks)} sweeps of {grid.name} stopped on "
                            f"an error (listed under the table and in `ufgir reproduce status {grid.name}`); the "
                            "same command retries them")


def _check_launcher(launcher: str, dry_run: bool) -> None:
    """local or slurm; for slurm (unless a dry run), a one-line LaunchError where Slurm's commands are
    missing (a laptop), before anything is built or written."""
    import shutil

    from ..errors import LaunchError

    if launcher not in ("local", "slurm"):
        raise typer.BadParameter(f"{launcher!r} is not local or slurm", param_hint="--launcher")
    if launcher == "local" or dry_run:
        return
    missing = [tool for tool in ("sbatch", "sacct") if shutil.which(tool) is None]
    if missing:
        raise LaunchError(f"--launcher slurm: no Slurm here ({' and '.join(missing)} not on PATH); run the same "
                          "command on the cluster's login node, or use --launcher local")


def _slurm(grid, opts, no_wait: bool, step_seconds: float | None, bench: Path) -> None:
    """Submit the sweeps not finished and not held by a job Slurm still has; wait for all (or not)."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise typer.BadParameter("needs submitit: pip install 'ufgir[slurm]'", param_hint="--launcher") from None
    from ..reproduce import (
        check_grid,
        job_states,
        longest_sweep_hours,
        slurm_executor,
        submit,
        wait_and_tabulate,
    )
    from ..reproduce.grid import method_step_times
    from ..reproduce.slurm import active, attach, describe_request

    check_grid(grid)  # every model builds, before anything is submitted

    hours = longest_sweep_hours(grid, method_step_times(grid, step_seconds, bench))
    ex = slurm_executor(grid, opts, hours=hours)
    busy = active(job_states(grid.root))
    for (method, task), info in busy.items():
        console.print(f"{method} on {task}: job {info.job_id} is {info.kind}; not submitted again", soft_wrap=True,
                      markup=False)
    jobs = submit(grid, ex, gpus_per_run=max(opts.gpus, 1), skip=set(busy))
    if jobs:
        console.print(f"submitted {len(jobs)} job(s) as array {jobs[0].job_id.split('_')[0]}: "
                      f"{describe_request(ex.parameters, ex.max_num_timeout, hours)}; logs under "
                      f"{grid.root / 'submitit'}", soft_wrap=True, markup=False)
    elif not busy:
        console.print("nothing to submit: every sweep is finished", soft_wrap=True)
    if no_wait:
        console.print(f"follow: ufgir reproduce status {grid.name}; once every job is done, "
                      f"`ufgir reproduce table {grid.name}` writes {grid.root / 'table1.md'}", soft_wrap=True,
                      markup=False)
        return
    jobs += [attach(info) for info in busy.values()]
    console.print(f"table: {wait_and_tabulate(grid, jobs)}", soft_wrap=True)


def _print_plan(grid, step_seconds: float | None, bench: Path) -> None:
    from ..reproduce import method_step_times, plan_rows
    from ..reproduce.grid import split_row

    times = method_step_times(grid, step_seconds, bench)
    rows = plan_rows(grid, times)
    lrs = "each recipe's sweep.lrs (else the paper's)" if grid.lrs is None else ", ".join(f"{x:g}" for x in grid.lrs)
    console.print(f"plan {grid.name} ({grid.root}): phase 1 lr {lrs} on train, "
                  f"phase 2 seeds {', '.join(map(str, grid.seeds))} on train_val", soft_wrap=True)
    width = max((len(b) for b in grid.backbones), default=0)

    def who(method: str, backbone: str) -> str:  # the backbone column only with --backbones
        return f"{split_row(method)[0]:12} {backbone:{width}} " if width else f"{method:12} "

    console.print(f"{who('method', 'backbone')}{'task':14} {'runs':>4} {'epochs':>6} {'batch':>5} {'steps':>9} {'s/step':>7} "
                  f"{'hours':>8}  step time", markup=False)
    for r in rows:
        console.print(f"{who(r['method'], r['backbone'])}{r['task']:14} {r['runs']:>4} {r['epochs']:>6} {r['batch_size']:>5} "
                      f"{fmt(r['steps'], 'd'):>9} {fmt(r['step_s'], '.2f'):>7} {fmt(r['hours'], '.1f'):>8}  {r['step_how']}",
                      markup=False, soft_wrap=True)
    hours = [r["hours"] for r in rows]
    total = f"{sum(hours):.1f} h" if all(h is not None for h in hours) else "unknown (give --step-seconds)"
    console.print(f"total: {sum(r['runs'] for r in rows)} runs, {sum(r['steps'] or 0 for r in rows)} steps, "
                  f"{total} on one device", soft_wrap=True, markup=False)
    for b in grid.backbones:
        mine = [r for r in rows if split_row(r["method"])[1] == b]
        h = [r["hours"] for r in mine]
        console.print(f"backbone {b}: {sum(r['runs'] for r in mine)} runs, "
                      + (f"{sum(h):.1f} h" if all(x is not None for x in h) else "hours unknown"),
                      soft_wrap=True, markup=False)
    for m, t in times.items():
        console.print(f"step time {m}: {t.how}" + (f", {t.note}" if t.note else ""), soft_wrap=True, markup=False)
    unlisted = [r for r in rows if r["steps"] is None]
    if unlisted:
        console.print(f"steps unknown for {', '.join(sorted({r['task'] for r in unlisted}))}: no counts in the catalog "
                      "and not on disk (`ufgir download` it first)", soft_wrap=True, markup=False)


def _grid(name: str | None, out: Path):
    """The reproduction called ``name`` under ``out``, or the only one there."""
    from ..errors import RecipeError
    from ..reproduce import load_grid

    if name is None:
        found = sorted(p.parent.name for p in out.glob("*/grid.json"))
        if len(found) != 1:
            raise RecipeError(f"give a reproduction name; under {out}/: {', '.join(found) or 'none'}")
        name = found[0]
    return load_grid(name, out)


@app.command("status", cls=PlainCommand)
def status(
    name: Annotated[str | None, typer.Argument(help="Reproduction name (default: the only one under --out).")] = None,
    out: OutOpt = Path("reproduce"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
) -> None:
    """Every run of a reproduction: done, running (pid@host, step), resumable (step, why it stopped),
    failed (reason) or pending; one line per run, the status first. Sweeps submitted to Slurm also show
    their job as Slurm has it: queued, requeued, cancelled or failed (the cause and the job's log)."""
    from ..paths import STATUS_KINDS
    from ..reproduce import job_states, run_status, with_jobs
    from ..reproduce.slurm import JOB_KINDS

    grid = _grid(name, out)
    rows = with_jobs(run_status(grid), job_states(grid.root))
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        what = f"phase {r['phase']} " + (f"lr {r['lr']:g} " if r["lr"] is not None else "") + f"seed {r['seed']}"
        detail = f"  {r['detail']}" if r["detail"] != r["status"] else ""
        console.print(f"{r['status']:9} {r['method']:12} {r['task']:14} {what}{detail}", markup=False, soft_wrap=True)
    counts = Counter(r["status"] for r in rows)
    console.print(" · ".join([f"{counts[k]} {k}" for k in STATUS_KINDS] + [f"{counts[k]} {k}" for k in JOB_KINDS if counts[k]]),
                  soft_wrap=True)
    if rows and counts["done"] == len(rows) and not (grid.root / "table1.md").is_file():
        console.print(f"every run is done: `ufgir reproduce table {grid.name}` writes the table", soft_wrap=True,
                      markup=False)


@app.command("table", cls=PlainCommand)
def table(
    name: Annotated[str | None, typer.Argument(help="Reproduction name (default: the only one under --out).")] = None,
    out: OutOpt = Path("reproduce"),
) -> None:
    """Write reproduce/<name>/table1.{md,csv,tex} from the runs as they are now: after
    `--launcher slurm --no-wait`, once the jobs are done. A cell without finished seeds shows "-"."""
    from ..reproduce import job_states, table_rows, write_table
    from ..reproduce.slurm import active

    grid = _grid(name, out)
    path = write_table(grid)
    rows = table_rows(grid)
    full = sum(r["n"] == len(grid.seeds) for r in rows)
    console.print(f"table: {path} ({full} of {len(rows)} cells with every seed)", soft_wrap=True, markup=False)
    busy = active(job_states(grid.root))
    if busy:
        console.print(f"{len(busy)} job(s) still in Slurm ({', '.join(j.job_id for j in busy.values())}): run this again "
                      "once they are done", soft_wrap=True, markup=False)
