"""`ufgir reproduce`: the paper's Table 1 as a grid of ``ufgir sweep`` runs, mean +- std over seeds.

``reproduce/<name>/`` holds ``grid.json`` (what was asked), one sweep folder per (method, task) under
``sweeps/`` and ``table1.{md,csv,tex}``, rewritten after every sweep. The sweeps run here (`run_local`)
or as a Slurm job array through submitit (`submit`); either way the same command continues a grid.
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
                   plan_rows,
                   run_status,
                   step_time,
)
from .launch import SweepJob, run_local, slurm_executor, submit, wait_and_tabulate
from .table import table_rows, write_table

__all__ = ["PAPER_METHODS", "TABLE1_DATASETS", "Grid", "StepTime", "SweepJob", "check_grid", "load_grid", "make_grid",
           "plan_rows", "run_local", "step_time",
           "run_status", "slurm_executor", "submit", "table_rows", "wait_and_tabulate", "write_table"]
