"""`ufgir reproduce`: the paper's Table 1 as a grid of ``ufgir sweep`` runs, mean +- std over seeds.

``reproduce/<name>/`` holds ``grid.json`` (what was asked), one sweep folder per (method, task) under
``sweeps/`` and ``table1.{md,csv,tex}``, rewritten after every sweep. The sweeps run here (`run_local`)
or as a Slurm job array through submitit (`submit`; ``jobs.json`` records which job runs which sweep);
either way the same command continues a grid.
"""

from __future__ import annotations

from .grid import (
                   PAPER_METHODS,
                   TABLE1_DATASETS,
                   Grid,
                   StepTime,
                   check_grid,
                   load_grid,
                   make_grid,
                   method_step_times,
                   plan_rows,
                   run_status,
                   step_time,
)
from .launch import SweepJob, longest_sweep_hours, run_local, slurm_executor, submit, wait_and_tabulate
from .slurm import SlurmOptions, job_states, with_jobs
from .table import table_rows, write_table

__all__ = ["PAPER_METHODS", "TABLE1_DATASETS", "Grid", "SlurmOptions", "StepTime", "SweepJob", "check_grid", "job_states",
           "load_grid", "longest_sweep_hours", "make_grid", "method_step_times", "plan_rows", "run_local", "run_status",
           "slurm_executor", "step_time", "submit", "table_rows", "wait_and_tabulate", "with_jobs", "write_table"]
