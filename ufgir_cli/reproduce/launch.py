"""Where the grid's sweeps run: here (``local``), or as a Slurm job array through submitit.

Each sweep is one unit of work: its phase 2 needs phase 1's choice, and ``run_sweep`` already skips
finished runs and resumes killed ones, so running a sweep again *is* the restart. A Slurm job is a
:class:`SweepJob`. Near its time limit the training run saves its exact step and submitit requeues
the job; a pre-empted job saves the same way and Slurm requeues it; either way the requeued job runs
the same sweep, which resumes (`slurm` has the details). A run that needs several GPUs starts
through torchrun (the sweep's multi-GPU slot) on the GPUs Slurm assigned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..engine.callbacks import Callback
from ..engine.state import Interrupted
from ..errors import LaunchError, TrainingError, UfgirError
from ..sweep import Run, Sweep, run_sweep
from ..sweep.runner import OnEvent
from .grid import (
    Grid,
    StepTime,
    check_grid,
    plan_rows,
    read_failures,
    sweep_recipe,
    write_failures,
    write_grid,
)
from .slurm import (
    CANCELLED_BEFORE_START,
    JobSignals,
    JobStopped,
    SlurmOptions,
    assigned_gpus,
    default_cpus,
    failure_line,
    planned_requeues,
    record_jobs,
    recorded_jobs,
    refused_as_one_line,
    sbatch_parameters,
    slurm_states,
    vanished,
)
from .table import write_table


def gpu_slots(gpus: list[str], per_run: int) -> list[str]:
    """Split GPU ids into slots of ``per_run`` (``CUDA_VISIBLE_DEVICES`` values: "0,1", "2,3")."""
    if per_run < 1 or len(gpus) < per_run:
        raise TrainingError(f"--gpus-per-run {per_run} needs at least that many GPUs in --gpus ({len(gpus)} given)")
    return [",".join(gpus[i:i + per_run]) for i in range(0, len(gpus) - per_run + 1, per_run)]


def run_local(grid: Grid, *, gpus: list[str] | None = None, gpus_per_run: int = 1,
              on_event: Callable[[str, str, Sweep, Run | None, dict], None] | None = None,
              callbacks: Callable[[Run], list[Callback]] | None = None) -> tuple[Path, dict[str, str]]:
    """Run every sweep here, one after another (each spreads its runs over the GPU slots), rewriting
    the table after each. A sweep that stops on an error is recorded (``failures.json``, listed under
    the table, "failed" in ``status``) and the grid goes on; a stop signal ends the command (the run it
    stopped saved its checkpoint). Returns the table and the failures ("row task" -> why)."""
    check_grid(grid)  # every model builds, before anything is written or trained
    write_grid(grid)
    failed = read_failures(grid)
    for method, task, sweep in grid.sweeps():
        hear: OnEvent | None = None
        if on_event is not None:
            def hear(kind, run, info, method=method, task=task, sweep=sweep):
                on_event(kind, f"{method} {task}", sweep, run, info)
        cell = f"{method} {task}"
        try:
            run_sweep(sweep, gpus=gpu_slots(gpus, gpus_per_run) if gpus else None, on_event=hear, callbacks=callbacks,
                      checked=True)  # check_grid built every model above
            failed.pop(cell, None)
        except Interrupted:
            raise
        except UfgirError as e:
            failed[cell] = str(e)
            if on_event is not None:
                on_event("sweep_failed", cell, sweep, None, {"error": str(e)})
        write_failures(grid, failed)
        write_table(grid)
    return grid.root / "table1.md", failed


class SweepJob:
    """One array task: run (or continue) one sweep. Stopped by Slurm (time limit, pre-emption), the
    run saves its step and the job ends as `JobSignals.stop` says: requeued through ``checkpoint`` at
    the time limit; without a result on SIGTERM, which Slurm requeues. The run folders are the state,
    so the job resubmits itself unchanged."""

    def __init__(self, sweep: Sweep, gpus_per_run: int = 1):
        self.sweep, self.gpus_per_run = sweep, gpus_per_run

    def __call__(self) -> dict:
        with JobSignals() as signals:
            try:
                report = run_sweep(self.sweep, gpus=assigned_gpus(self.gpus_per_run))
            except Interrupted as e:  # a run saved its step and stopped
                signals.stop(e.signum)
            except JobStopped as e:  # between runs: nothing unsaved
                signals.stop(e.signum)
        return report["test"]

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def longest_sweep_hours(grid: Grid, step_times: dict[str, StepTime]) -> float | None:
    """The planned hours of the grid's longest sweep (one job runs one sweep); None when unknown."""
    hours = [r["hours"] for r in plan_rows(grid, step_times)]
    return None if any(h is None for h in hours) or not hours else max(hours)


def slurm_executor(grid: Grid, opts: SlurmOptions, *, hours: float | None = None):
    """A submitit ``SlurmExecutor`` for the grid's job array: what each job asks for
    (`slurm.sbatch_parameters`; CPUs per task from the recipes' data loaders unless given) and how
    many time-outs it may have (``opts.max_requeues``, else from ``hours``: `slurm.planned_requeues`)."""
    import submitit

    workers = max(sweep_recipe(grid.sweep(r, grid.tasks[0])).data.num_workers for r in grid.rows)
    params = sbatch_parameters(opts, name=f"ufgir-{grid.name}", n_jobs=len(grid.rows) * len(grid.tasks),
                               cpus_per_task=opts.cpus_per_task or default_cpus(workers, opts.gpus))
    requeues = opts.max_requeues if opts.max_requeues is not None else \
        planned_requeues(hours, opts.time_min, opts.signal_delay_s)
    try:
        ex = submitit.SlurmExecutor(folder=grid.root / "submitit" / "%j", max_num_timeout=requeues)
    except RuntimeError as e:  # no srun on this machine
        raise LaunchError(f"--launcher slurm: {e}") from None
    with refused_as_one_line():
        ex.update_parameters(**params)
    return ex


def submit(grid: Grid, executor, *, gpus_per_run: int = 1, skip: set | frozenset = frozenset()) -> list:
    """Submit every sweep not finished yet, and not in ``skip`` ((method, task) of sweeps whose job
    Slurm still holds), as one job array; records the jobs in ``jobs.json``; returns them. A submission
    Slurm refuses is one line (`LaunchError`)."""
    write_grid(grid)
    todo = [(m, t, s) for m, t, s in grid.sweeps() if not _finished(s) and (m, t) not in skip]
    if not todo:
        return []
    with refused_as_one_line(), executor.batch():
        jobs = [executor.submit(SweepJob(s, gpus_per_run)) for _, _, s in todo]
    record_jobs(grid.root, [(m, t, job) for (m, t, _), job in zip(todo, jobs, strict=True)])
    return jobs


def _finished(sweep: Sweep) -> bool:
    from .table import seed_top1

    return len(seed_top1(sweep)) == len(sweep.seeds)


def wait_and_tabulate(grid: Grid, jobs: list, poll_s: float = 2.0, vanished_every_s: float = 60.0) -> Path:
    """Wait for the jobs, through requeues (a requeued job is not done), then write the table; a job
    that failed or was cancelled (also before it started: `slurm.vanished`, asked every
    ``vanished_every_s``) is reported after the others with its cause and log. Ctrl-C stops the
    waiting, not the jobs."""
    labels = {r["job_id"]: f"{r['method']} on {r['task']}" for r in recorded_jobs(grid.root)}
    slurm_ids = [job.job_id for job in jobs if type(job).__name__ == "SlurmJob"]
    errors, left, next_ask = [], list(jobs), time.time() + vanished_every_s
    try:
        while left:
            states = {}
            if slurm_ids and time.time() >= next_ask:
                states, next_ask = slurm_states(slurm_ids), time.time() + vanished_every_s
            for job in list(left):
                label = labels.get(job.job_id, "a sweep")
                if job.done():
                    left.remove(job)
                    try:
                        job.result()
                    except Exception:  # noqa: BLE001 - submitit re-raises the job's own error, of any type
                        errors.append(failure_line(job, label))
                elif vanished(job.job_id, states):
                    left.remove(job)
                    errors.append(f"job {job.job_id} ({label}): cancelled {CANCELLED_BEFORE_START}")
            if left:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        import signal

        raise Interrupted(f"stopped waiting; the jobs go on in Slurm. Follow them with `ufgir reproduce status "
                          f"{grid.name}`, and once they are done write the table with `ufgir reproduce table "
                          f"{grid.name}`", signal.SIGINT) from None
    path = write_table(grid)
    if errors:
        raise TrainingError(f"{len(errors)} job(s) of {grid.name} failed; submit again to retry them "
                            f"(the table holds what finished):\n" + "\n".join(errors))
    return path
