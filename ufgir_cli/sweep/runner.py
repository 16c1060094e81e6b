"""Running a sweep's runs: each one skipped, evaluated, resumed or trained, as its folder says.

Without ``gpus`` the runs go one after another in this process: no interpreter and torch start per
run, the run's own progress display (the callbacks the caller hands in) shows live, and a stop
signal reaches `fit`, which saves its checkpoint. With ``gpus`` each GPU is a slot that runs one
``ufgir train`` (or ``ufgir eval``) subprocess at a time with ``CUDA_VISIBLE_DEVICES`` set to it,
its output in ``logs/<run>.log``: the very command a user would type, so a slot needs no code of
its own. A slot of several GPUs ("0,1") trains through torchrun, one process per GPU. The children run in their own session; a signal to the sweep is passed on to each once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..engine.callbacks import Callback
from ..engine.report import eval_run
from ..engine.state import Interrupted, StopFlag, is_stop_exit
from ..engine.train import fit, resume
from ..errors import TrainingError
from ..io import atomic_write_text
from ..model.checkpoint import read_checkpoint
from ..recipe import dump_resolved
from .plan import Run, Sweep

#: on_event(kind, run, info): kind is "skipped", "started", "finished" or "failed".
OnEvent = Callable[[str, Run, dict], None]
POLL_S = 0.2


def action_for(run: Run) -> str:
    """What a run's folder still needs, from its status (`RunDir.status`): "skip" (done), "evaluate"
    (trained, stopped before writing its final evaluation), "resume" (a checkpoint part way: stopped,
    owner gone, or failed and tried again) or "train" (pending). A run that another live process
    trains is an error: two writers would ruin its folder."""
    status = run.status()
    if status.kind == "done":
        return "skip"
    if status.kind == "running":
        raise TrainingError(f"{run.label} ({run.run_dir}) is {status}; wait for it to end or stop it, then run "
                            "the sweep again")
    if not run.folder.last.is_file():
        return "train"
    epoch = (read_checkpoint(run.folder.last).get("train_state") or {}).get("epoch", 0)
    return "evaluate" if epoch >= run.recipe.train.epochs else "resume"


def _stopped(signum: int, sweep: Sweep) -> Interrupted:
    return Interrupted(f"sweep {sweep.name} stopped by {signal.Signals(signum).name}; finished runs are kept and "
                       "stopped ones saved their checkpoints: run the same `ufgir sweep` command to continue", signum)


def run_in_process(sweep: Sweep, runs: list[Run], on_event: OnEvent,
                   callbacks: Callable[[Run], list[Callback]]) -> None:
    """Runs one after another. A run that fails to train is reported and the sweep goes on (a
    diverging learning rate is a result, not a reason to stop); any other error stops the sweep."""
    for run in runs:
        action = action_for(run)
        if action == "skip":
            on_event("skipped", run, {})
            continue
        on_event("started", run, {"action": action, "status": str(run.status())})
        t0 = time.time()
        try:
            if action == "evaluate":
                eval_run(run.run_dir, run.split, checkpoint="last")
            elif action == "resume":
                resume(run.run_dir, callbacks=callbacks(run))
            else:
                fit(run.recipe, run.run_dir, callbacks=callbacks(run), overwrite=run.run_dir.exists())
        except Interrupted as e:
            raise _stopped(e.exit_code - 128, sweep) from None
        except TrainingError as e:
            on_event("failed", run, {"error": str(e), "time_s": time.time() - t0})
            continue
        on_event("finished", run, {"time_s": time.time() - t0})


def child_command(sweep: Sweep, run: Run, action: str, nproc: int = 1) -> list[str]:
    """The ``ufgir`` command line that does ``action`` for ``run`` in a subprocess; training on
    ``nproc`` > 1 GPUs starts through torchrun."""
    ufgir = [sys.executable, "-m", "ufgir_cli"]
    if action == "evaluate":
        return [*ufgir, "eval", str(run.run_dir), "--split", run.split, "--checkpoint", "last"]
    if nproc > 1:
        ufgir = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "ufgir_cli"]
    if action == "resume":
        return [*ufgir, "train", "--resume", str(run.run_dir), "--quiet"]
    recipe_file = sweep.root / "recipes" / f"{run.run_dir.name}.toml"
    atomic_write_text(recipe_file, dump_resolved(run.recipe))
    return [*ufgir, "train", "--recipe", str(recipe_file), "--out", str(run.run_dir.parent), "--name",
            run.run_dir.name, "--quiet", *(["--overwrite"] if run.run_dir.exists() else [])]


def run_on_gpus(sweep: Sweep, runs: list[Run], gpus: list[str], on_event: OnEvent) -> None:
    """One subprocess per GPU at a time; a failed run is reported and the sweep goes on. A child that
    exits with bad input (exit code 2: recipe, data, checkpoint) would fail on every run, so the
    sweep stops scheduling and reports it once the running children are done."""
    todo = []
    for run in runs:
        action = action_for(run)
        if action == "skip":
            on_event("skipped", run, {})
        else:
            todo.append((run, action))
    bad_input = None
    running: dict[str, tuple[Run, subprocess.Popen, float, Path]] = {}
    with StopFlag() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(_terminate, running)  # on any exit: no child outlives the sweep unnoticed
        forwarded = False
        while todo or running:
            for gpu in gpus:
                if gpu in running or not todo or stop.signum is not None or bad_input:
                    continue
                run, action = todo.pop(0)
                before = str(run.status())  # as the run stood: the child rewrites it once it starts
                log = sweep.root / "logs" / f"{run.run_dir.name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a", encoding="utf-8") as f:
                    child = subprocess.Popen(child_command(sweep, run, action, nproc=len(gpu.split(","))), stdout=f, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
                running[gpu] = (run, child, time.time(), log)
                on_event("started", run, {"action": action, "status": before, "gpu": gpu, "log": str(log)})
            if stop.signum is not None and not forwarded:
                for _, child, _, _ in running.values():
                    child.send_signal(stop.signum)
                forwarded = True
            time.sleep(POLL_S)
            for gpu, (run, child, t0, log) in list(running.items()):
                rc = child.poll()
                if rc is None:
                    continue
                del running[gpu]
                info = {"gpu": gpu, "log": str(log), "time_s": time.time() - t0}
                if rc == 0:
                    on_event("finished", run, info)
                elif not is_stop_exit(rc):  # a stopped child saved its checkpoint: not a failure
                    on_event("failed", run, {**info, "error": f"exit code {rc}, see {log}"})
                    bad_input = bad_input or (f"{run.label} stopped on bad input (exit code {rc}); see {log}"
                                              if rc == 2 else None)
            if stop.signum is not None and not running:
                raise _stopped(stop.signum, sweep)
    if bad_input:
        raise TrainingError(bad_input)


def _terminate(running: dict) -> None:
    for _, child, _, _ in running.values():
        if child.poll() is None:
            child.terminate()  # SIGTERM: the child saves a checkpoint and stops
    for _, child, _, _ in running.values():
        child.wait()
