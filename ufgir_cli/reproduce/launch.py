"""Where the grid's sweeps run: here (``local``), or as a Slurm job array through submitit.

Each sweep is one unit of work: its phase 2 needs phase 1's choice, and ``run_sweep`` already skips
finished runs and resumes killed ones, so running a sweep again *is* the restart. A Slurm job is a
:class:`SweepJob`; when it nears its time limit submitit calls its ``checkpoint`` (the training run
keeps its last checkpoint on disk) and requeues it, and the requeued job runs the same sweep, which
resumes. A run that needs several GPUs starts through torchrun (the sweep's multi-GPU slot).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..engine.callbacks import Callback
from ..engine.state import Interrupted
from ..errors import TrainingError, UfgirError
from ..sweep import Run, Sweep, run_sweep
from ..sweep.runner import OnEvent
from .grid import Grid, check_grid, read_failures, write_failures, write_grid
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
            run_sweep(sweep, gpus=gpu_slots(gpus, gpus_per_run) if gpus else None, on_event=hear, callbacks=callbacks)
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
    """One array task: run (or continue) one sweep. Submitit requeues it at its time limit through
    ``checkpoint``; the run folders are the state, so the job resubmits itself unchanged."""

    def __init__(self, sweep: Sweep, gpus_per_run: int = 1):
        self.sweep, self.gpus_per_run = sweep, gpus_per_run

    def __call__(self) -> dict:
        slots = [",".join(str(i) for i in range(self.gpus_per_run))] if self.gpus_per_run > 1 else None
        report = run_sweep(self.sweep, gpus=slots)
        return report["test"]

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def slurm_executor(grid: Grid, *, partition: str | None, gpus_per_run: int, time_min: int,
                   account: str | None = None, cpus_per_task: int = 8, parallel: int | None = None):
    """A submitit executor for the cluster: one GPU node task per run, the job array's width capped."""
    import submitit

    ex = submitit.AutoExecutor(folder=grid.root / "submitit" / "%j", cluster="slurm")
    extra = {"slurm_account": account} if account else {}
    ex.update_parameters(name=f"ufgir-{grid.name}", timeout_min=time_min, gpus_per_node=gpus_per_run, nodes=1,
                         tasks_per_node=1, cpus_per_task=cpus_per_task, slurm_partition=partition,
                         slurm_array_parallelism=parallel or len(grid.methods) * len(grid.tasks), **extra)
    return ex


def submit(grid: Grid, executor, *, gpus_per_run: int = 1) -> list:
    """Submit every sweep not finished yet as one job array; returns the submitit jobs."""
    write_grid(grid)
    todo = [s for _, _, s in grid.sweeps() if not _finished(s)]
    if not todo:
        return []
    with executor.batch():
        jobs = [executor.submit(SweepJob(s, gpus_per_run)) for s in todo]
    return jobs


def _finished(sweep: Sweep) -> bool:
    from .table import seed_top1

    return len(seed_top1(sweep)) == len(sweep.seeds)


def wait_and_tabulate(grid: Grid, jobs: list) -> Path:
    """Wait for the jobs (a failed one is reported after the others), then write the table."""
    errors = []
    for job in jobs:
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - submitit re-raises the job's own error, of any type
            errors.append(f"job {job.job_id}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}")
    path = write_table(grid)
    if errors:
        raise TrainingError(f"{len(errors)} job(s) of {grid.name} failed; submit again to retry them:\n" + "\n".join(errors))
    return path
