"""The run folder as a type: its layout, its status (done, running, resumable, failed, pending) from the
files alone, the owner record a training run keeps (pid, host, heartbeat) and how each status reads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ufgir_cli.engine.callbacks import Callback
from ufgir_cli.engine.owner import RunOwner
from ufgir_cli.engine.report import eval_run
from ufgir_cli.engine.state import TrainState
from ufgir_cli.engine.train import fit, resume
from ufgir_cli.errors import CheckpointError, RunFolderError, TrainingError
from ufgir_cli.model.checkpoint import load_model, read_checkpoint
from ufgir_cli.paths import (
    HEARTBEAT_EVERY_S,
    HEARTBEAT_STALE_S,
    RunDir,
    RunStatus,
    process_started,
    this_host,
)
from ufgir_cli.recipe import load_recipe


def tiny(root: Path, **train) -> dict:
    """Micro ViT at 64 px, random init, fp32: 3 steps an epoch on the small synthetic set."""
    return {"model": {"weights": "none"}, "data": {"root": str(root), "num_workers": 0},
            "train": {"epochs": 2, "batch_size": 8, "precision": "fp32", "threads": 1, **train},
            "eval": {"every": 0}, "schedule": {"warmup_steps": 1}, "logging": {"tensorboard": False}}


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped): no process of that pid lives now."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def write_status(run: RunDir, **record) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    run.status_file.write_text(json.dumps(record))


def owned(run: RunDir, pid: int, host: str, heartbeat: float, saved_step: int | None = 40,
          started: float | None = None) -> None:
    """What a training owner leaves while it runs (and what SIGKILL leaves): state running; by default
    started when the process ``pid`` did (a dead one's: 100 s before its last heartbeat)."""
    if started is None:
        started = (process_started(pid) if host == this_host() else None) or heartbeat - 100
    write_status(run, state="running", pid=pid, host=host, started=started,
                 heartbeat=heartbeat, step=42, epoch=3, saved_step=saved_step, saved_epoch=3)


def with_checkpoint(run: RunDir) -> RunDir:
    run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    run.last.write_bytes(b"")  # status looks at which files exist, never into them
    return run


# ---- layout -------------------------------------------------------------------------------------


def test_the_layout_is_named_in_one_place(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.recipe_file == tmp_path / "r" / "recipe.toml"
    assert (run.last, run.best) == (tmp_path / "r/checkpoints/last.pt", tmp_path / "r/checkpoints/best.pt")
    assert run.metrics_log == tmp_path / "r" / "metrics.jsonl" and run.status_file == tmp_path / "r" / "status.json"
    assert run.provenance_file == tmp_path / "r" / "provenance.json"
    assert run.eval_metrics("test") == tmp_path / "r" / "eval" / "test" / "metrics.json"
    assert run.analysis("visualize", "rollout_test") == tmp_path / "r" / "analysis" / "visualize" / "rollout_test"
    assert run.export("model.onnx") == tmp_path / "r" / "export" / "model.onnx"
    assert RunDir.of(run.last) == run and RunDir.of(run.export("adapter.safetensors")) == run
    # a checkpoint that is not the run's own is evaluated beside the run's results, never over them
    other = tmp_path / "elsewhere" / "last.pt"
    foreign = run.eval_dir_for("test", other)
    assert foreign.parent.parent == run.eval_root / "other" and foreign.name == "test"
    assert foreign.parent.name.startswith("last_") and foreign != run.eval_dir("test")
    assert run.eval_dir_for("test", run.best) == run.eval_dir("test")
    exported = run.eval_dir_for("val", run.export("model.safetensors"))  # never over the run's own results
    assert exported == run.export_eval_dir("val", "model.safetensors") == run.root / "eval/export/model.safetensors/val"
    assert run.foreign_eval_dir("test", tmp_path / "a" / "x.pt") != run.foreign_eval_dir("test", tmp_path / "b" / "x.pt")


# ---- status from files alone --------------------------------------------------------------------


def test_pending_and_legacy_runs_are_judged_from_their_files(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.status() == RunStatus("pending") and str(run.status()) == "pending"
    run.root.mkdir()
    run.recipe_file.write_text('[eval]\nsplit = "val"\n')
    assert run.status().kind == "pending"
    with_checkpoint(run)  # a run made before status.json: a checkpoint, nothing else known
    assert str(run.status()) == "resumable (step ?, stopped, reason unknown)"
    run.eval_metrics("test").parent.mkdir(parents=True)
    run.eval_metrics("test").write_text("{}")
    assert run.status().kind == "resumable"  # its recipe evaluates on val: test's file does not finish it
    assert run.status("test").kind == "done"
    run.eval_metrics("val").parent.mkdir(parents=True)
    run.eval_metrics("val").write_text("{}")
    assert run.status().kind == "done" and str(run.status()) == "done"


def test_failed_names_the_runs_own_reason(tmp_path):
    run = with_checkpoint(RunDir(tmp_path / "r"))
    write_status(run, state="failed", pid=1, host=this_host(), heartbeat=time.time(), saved_step=7, saved_epoch=1,
                 reason="loss is nan at step 8 (epoch 2, lr 0.1); training stopped")
    s = run.status()
    assert (s.kind, s.step, s.reason) == ("failed", 7, "loss is nan at step 8 (epoch 2, lr 0.1); training stopped")
    assert str(s) == "failed (loss is nan at step 8 (epoch 2, lr 0.1); training stopped)"


def test_a_live_owner_on_this_host_is_running(tmp_path):
    run = with_checkpoint(RunDir(tmp_path / "r"))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        owned(run, sleeper.pid, this_host(), heartbeat=time.time() - 10 * HEARTBEAT_STALE_S)  # its pid decides here
        s = run.status()
        assert (s.kind, s.step, s.owner) == ("running", 42, f"{sleeper.pid}@{this_host()}")
        assert str(s) == f"running (pid {sleeper.pid}@{this_host()}, step 42)"
    finally:
        sleeper.kill()
        sleeper.wait()
    s = run.status()  # the same record once its process has gone: SIGKILL leaves exactly this
    assert (s.kind, s.step, s.reason) == ("resumable", 40, "owner gone")
    assert str(s) == "resumable (step 40, owner gone)"


@pytest.mark.skipif(process_started(os.getpid()) is None, reason="needs /proc for a process's start time")
def test_a_pid_reused_by_a_later_process_is_not_the_owner(tmp_path):
    """The owner died long ago and its pid now belongs to a process that started after it: not running."""
    run = with_checkpoint(RunDir(tmp_path / "r"))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        mine = process_started(sleeper.pid)
        owned(run, sleeper.pid, this_host(), heartbeat=mine - 3600, started=mine - 7200)  # recorded two hours before
        assert str(run.status()) == "resumable (step 40, owner gone)"
        owned(run, sleeper.pid, this_host(), heartbeat=mine - 3600, started=mine - 1)  # its own record
        assert run.status().kind == "running"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_pid_on_this_host_is_resumable_or_pending(tmp_path):
    run = RunDir(tmp_path / "r")
    owned(run, dead_pid(), this_host(), heartbeat=time.time(), saved_step=None)
    assert str(run.status()) == "pending (owner gone before its first checkpoint)"
    with_checkpoint(run)
    owned(run, dead_pid(), this_host(), heartbeat=time.time())
    assert str(run.status()) == "resumable (step 40, owner gone)"


def test_another_host_runs_while_its_heartbeat_is_fresh(tmp_path, monkeypatch):
    """A Slurm node seen from the login node: only the file system is shared, so the heartbeat decides."""
    run = with_checkpoint(RunDir(tmp_path / "r"))
    now = 1_700_000_000.0
    owned(run, os.getpid(), "node17", heartbeat=now - HEARTBEAT_EVERY_S)
    s = run.status(now=now)
    assert (s.kind, s.owner, s.heartbeat_age_s) == ("running", f"{os.getpid()}@node17", HEARTBEAT_EVERY_S)
    assert run.status(now=now + HEARTBEAT_STALE_S + 1).kind == "resumable"
    assert str(run.status(now=now + HEARTBEAT_STALE_S + 1)) == "resumable (step 40, owner gone)"
    # this host is another one too: a pid alive here says nothing about node17
    monkeypatch.setattr("ufgir_cli.paths.this_host", lambda: "login1")
    monkeypatch.setattr("ufgir_cli.paths.time.time", lambda: now + HEARTBEAT_STALE_S + 1)
    assert run.status().kind == "resumable"
    monkeypatch.setattr("ufgir_cli.paths.time.time", lambda: now)
    assert run.status().kind == "running"


def test_the_owner_beats_and_says_how_it_ended(tmp_path):
    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    state = TrainState(step=5, epoch=1)
    with RunOwner(run.root, state, every_s=0.01) as owner:
        first = run.read_status()
        assert (first["state"], first["pid"], first["host"], first["step"]) == ("running", os.getpid(), this_host(), 5)
        state.step = 6
        deadline = time.time() + 10
        while run.read_status()["step"] != 6:  # the heartbeat thread picks the loop's step up
            assert time.time() < deadline
            time.sleep(0.01)
        assert run.read_status()["heartbeat"] > first["heartbeat"]
        owner.saved("last", 6, 1)
        assert str(run.status()) == f"running (pid {os.getpid()}@{this_host()}, step 6)"
    assert run.read_status()["state"] == "done" and run.read_status()["saved_step"] == 6
    with pytest.raises(TrainingError), RunOwner(run.root, state, every_s=0.01):
        raise TrainingError("weights turned non-finite\nsecond line")
    assert (run.read_status()["state"], run.read_status()["reason"]) == ("failed", "weights turned non-finite")
    with RunOwner(run.root, state, is_main=False):  # ranks other than 0 write nothing
        assert run.read_status()["state"] == "failed"


# ---- a real run: stopped by SIGTERM, resumed, done; failed; a foreign checkpoint's evaluation ----


class SigtermAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, step, logs):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_run_stopped_by_sigterm_is_resumable_then_done(small_synthetic, tmp_path):
    run = RunDir(tmp_path / "r")
    recipe = load_recipe("quickstart", tiny(small_synthetic))
    with pytest.raises(TrainingError, match="interrupted by SIGTERM at step 2"):
        fit(recipe, run.root, callbacks=[SigtermAt(2)])
    s = run.status()
    assert (s.kind, s.step, s.epoch, s.reason) == ("resumable", 2, 0, "stopped by SIGTERM")
    assert read_checkpoint(run.last)["train_state"]["step"] == s.step
    assert str(s) == "resumable (step 2, stopped by SIGTERM)" and s.owner == f"{os.getpid()}@{this_host()}"
    summary = resume(run.root)
    s = run.status()
    assert (s.kind, s.step) == ("done", summary["steps"]) and run.read_status()["saved_step"] == summary["steps"] == 6
    # evaluating a checkpoint that is not the run's own leaves the run's own results as they are
    own = run.eval_metrics("test").read_text()
    other = tmp_path / "elsewhere" / "model.pt"
    other.parent.mkdir()
    shutil.copy(run.last, other)
    metrics, out, _ = eval_run(run.root, "test", checkpoint=str(other), device="cpu", num_workers=0)
    assert out == run.foreign_eval_dir("test", other) and json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["checkpoint"] == str(other) and run.eval_metrics("test").read_text() == own
    loaded = load_model(run)  # the one loader takes the type too
    assert (loaded.file, loaded.tag, loaded.run) == (run.last, "last", run)


def test_a_failing_run_records_its_reason(small_synthetic, tmp_path):
    class Boom(Callback):
        def on_step(self, step, logs):
            if step == 2:
                raise TrainingError("loss exploded at step 2; lower optim.lr")

    run = RunDir(tmp_path / "r")
    with pytest.raises(TrainingError):
        fit(load_recipe("quickstart", tiny(small_synthetic, checkpoint_every=1)), run.root, callbacks=[Boom()])
    s = run.status()
    assert (s.kind, s.step, s.reason) == ("failed", 1, "loss exploded at step 2; lower optim.lr")


def test_a_live_run_is_neither_resumed_nor_overwritten(small_synthetic, tmp_path):
    run = with_checkpoint(RunDir(tmp_path / "r"))
    recipe = load_recipe("quickstart", tiny(small_synthetic))
    run.recipe_file.write_text("")
    owned(run, os.getpid(), this_host(), heartbeat=time.time())
    with pytest.raises(CheckpointError, match=r"is running \(pid \d+@.*, step 42\); wait for it"):
        fit(recipe, run.root, resume=True)
    with pytest.raises(RunFolderError, match="--overwrite never replaces a live run"):
        fit(recipe, run.root, overwrite=True)
    assert run.last.read_bytes() == b""
