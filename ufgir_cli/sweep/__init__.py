"""`ufgir sweep`: the paper's learning-rate protocol and seeds in one resumable command.

``sweeps/<name>/`` holds ``plan.json`` (what runs), ``sweep.json`` and ``summary.md`` (what came
out, rewritten after every run) and the run folders under ``runs/``. A run whose final evaluation
exists is skipped, a killed one resumes from its checkpoint, so the same command continues a sweep.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from ..engine.callbacks import Callback
from ..errors import TrainingError
from ..recipe import load_recipe
from .plan import (
    DEFAULT_SEEDS,
    PAPER_LRS,
    RULE,
    Run,
    Sweep,
    check_models,
    make_sweep,
    phase1_runs,
    phase2_runs,
    write_plan,
)
from .runner import OnEvent, run_in_process, run_on_gpus
from .summary import choose_lr, write_report


def run_sweep(sweep: Sweep, *, gpus: list[str] | None = None, on_event: OnEvent | None = None,
              callbacks: Callable[[Run], list[Callback]] | None = None, checked: bool = False) -> dict:
    """Run both phases (only what is not done yet) and return the report that ``sweep.json`` holds.

    ``on_event(kind, run, info)`` hears of every run started, finished, failed or skipped;
    ``callbacks(run)`` gives the training callbacks of a run trained in this process. The model is
    built on the meta device first (`check_models`) unless the caller did so (``checked``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError("ufgir sweep starts its own runs; run it without torchrun (--gpus spreads runs over GPUs)")
    failed: dict[str, str] = {}  # key -> error, of this command's failed runs
    phase1, phase2 = phase1_runs(sweep), []
    if not checked:
        check_models([(f"sweep {sweep.name} (recipe {sweep.recipe})", load_recipe(sweep.recipe, sweep.overrides))])

    def event(kind: str, run: Run, info: dict) -> None:
        if kind == "failed":
            failed[run.key] = info["error"]
        if kind in ("finished", "failed"):  # sweep.json and summary.md always show what is done
            write_report(sweep, phase1, phase2, failed)
        if on_event is not None:
            on_event(kind, run, info)

    def run_all(runs: list[Run]) -> None:
        if gpus:
            run_on_gpus(sweep, runs, gpus, event)
        else:
            run_in_process(sweep, runs, event, callbacks or (lambda run: []))

    with _locked(sweep):
        write_plan(sweep, phase1, phase2, None)
        run_all(phase1)
        choice = choose_lr(phase1)
        if choice is None:
            write_report(sweep, phase1, phase2, failed)
            raise TrainingError(f"no learning rate finished phase 1 of sweep {sweep.name}; see {sweep.root / 'sweep.json'}")
        phase2 = phase2_runs(sweep, choice[0])
        write_plan(sweep, phase1, phase2, choice[0])
        run_all(phase2)
        report = write_report(sweep, phase1, phase2, failed)
    if failed:
        raise TrainingError(f"{len(failed)} run(s) of sweep {sweep.name} failed (listed in {sweep.root / 'sweep.json'}); "
                            "the same command retries them")
    return report


@contextlib.contextmanager
def _locked(sweep: Sweep) -> Iterator[None]:
    """One process per sweep folder: a second command on the same sweep would train the same runs."""
    sweep.root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the user keeps to one command per sweep
        yield
        return
    with open(sweep.root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(f"sweep {sweep.root} is being run by another ufgir sweep command") from None
        yield


__all__ = ["DEFAULT_SEEDS", "PAPER_LRS", "RULE", "Run", "Sweep", "check_models", "make_sweep", "run_sweep"]
