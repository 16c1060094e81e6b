"""Where a run is, and how it survives: training state, RNG capture/restore, stop signals, resume.

A resumed run must be bit-identical to one that ran straight through, so a checkpoint holds the
weights, the optimiser and scaler states, the `TrainState` counters and every rank's RNG. Restoring
happens in two places of the loop's order: optimiser and scaler right after they are built
(`restore_training`), the RNG last of all, once nothing else can draw from it (`restore_rng`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import shlex
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, RecipeError, TrainingError
from ..model.checkpoint import check_identity, checkpoint_payload, read_checkpoint, save_checkpoint
from ..model.precision import FrozenCast
from ..model.vit import UfgirViT
from ..paths import RunDir
from ..recipe import Recipe
from .dist import DistContext, all_gather_object
from .owner import RunOwner


@dataclass
class TrainState:
    """Where the loop is. Saved whole in every checkpoint, next to optimiser, scaler and RNG states."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch (0-based)
    consumed: int = 0  # samples of this rank's shard consumed in the current epoch
    loss_sum: float = 0.0  # sum of per-sample training losses so far this epoch: train/loss_epoch
    loss_n: int = 0  # logged at the epoch's end, so a resume mid-epoch must continue the sum
    log_loss_sum: float = 0.0  # the same since the previous log line: train/loss
    log_loss_n: int = 0
    best_top1: float | None = None  # best val/top1 so far (selection on val only; checkpoints/best.pt)
    last_top1: float | None = None  # the latest evaluation's top-1 on eval.split
    nonfinite_skipped: int = 0
    history: list = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, ts: dict) -> TrainState:
        return cls(**{f.name: ts[f.name] for f in dataclasses.fields(cls) if f.name in ts})

    def add_loss(self, loss: float, n: int) -> None:
        """Count a micro-batch's mean loss over its ``n`` samples into the epoch and log-line means."""
        self.loss_sum += loss * n
        self.loss_n += n
        self.log_loss_sum += loss * n
        self.log_loss_n += n

    def take_log_loss(self) -> float:
        """Mean per-sample loss since the previous log line; starts the next window."""
        mean = self.log_loss_sum / max(self.log_loss_n, 1)
        self.log_loss_sum, self.log_loss_n = 0.0, 0
        return mean

    def add_eval(self, top1: float, selecting: bool) -> bool:
        """Keep an evaluation's top-1 as the last one and, when ``selecting`` (on val; the paper's
        protocol reports the last epoch on test instead), as the best; True when it is a new best."""
        self.last_top1 = top1
        if selecting and (self.best_top1 is None or top1 > self.best_top1):
            self.best_top1 = top1
            return True
        return False

    def next_epoch(self) -> None:
        self.epoch, self.consumed, self.loss_sum, self.loss_n = self.epoch + 1, 0, 0.0, 0


# --------------------------------------------------------------------------------------------
# RNG


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def gathered_rng_states(dist: DistContext) -> list[dict]:
    """Every rank's `rng_state()`, in rank order. They travel as `torch.save` bytes read back with
    ``weights_only=True``: `all_gather_object` cannot unpickle tensors inside objects here."""
    if dist.world <= 1:
        return [rng_state()]
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in all_gather_object(buf.getvalue(), dist)]


# --------------------------------------------------------------------------------------------
# Signals


#: Signals that stop a run cleanly: finish the step, save, exit with 128 + the signal. SIGINT is Ctrl-C,
#: SIGTERM what schedulers send before they kill (pre-emption, ``scancel``, ``scontrol requeue``),
#: SIGUSR2 the warning Slurm sends ahead of a job's time limit (``sbatch --signal=USR2@90``, what
#: submitit asks for), so a job saves its exact step before it is requeued.
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR2", None)) if s is not None)


def is_stop_exit(returncode: int) -> bool:
    """True for the exit of a process that a stop signal ended: ``ufgir train``'s 128 + signal after
    saving, or death by the signal itself (a launcher such as torchrun that does not catch it)."""
    return any(returncode in (128 + s, -s) for s in STOP_SIGNALS)


class Interrupted(TrainingError):
    """A stop signal (`STOP_SIGNALS`): the current step finished, a checkpoint was written."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum, self.exit_code = signum, 128 + signum

    @classmethod
    def at(cls, signum: int | None, step: int, run_dir: Path) -> Interrupted:
        """The one-line stop message with the resume command. Ranks that saw no signal follow the
        one that did, so they report SIGTERM."""
        signum = signum or signal.SIGTERM
        return cls(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved. "
                   f"Resume with: ufgir train --resume {shlex.quote(str(run_dir))}", int(signum))


class StopRequested(Exception):
    """Breaks off work that a resume redoes anyway (an evaluation) once a stop was asked for."""


class StopFlag:
    """A stop signal (`STOP_SIGNALS`) asks the loop to stop after the current step; a second one stops
    at once. Installed in the main thread only (Python delivers signals there)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def raise_if_set(self) -> None:
        if self.signum is not None:
            raise StopRequested


# --------------------------------------------------------------------------------------------
# Checkpoints and resume


def read_resume_checkpoint(run_dir: Path, recipe: Recipe) -> dict:
    """The run's ``last.pt``, checked to hold training state for this recipe and work left to do, in a
    run that no live process is training (the one place that says whether a run folder can be resumed)."""
    run = RunDir(run_dir)
    status = run.status()
    if status.kind == "running":
        raise CheckpointError(f"run {run_dir} is {status}; wait for it to end or stop it (SIGTERM saves a checkpoint) "
                              "before resuming it here")
    path = run.last
    if not path.is_file():
        raise CheckpointError(
            f"run {run_dir} has no checkpoints/last.pt to resume (it stopped before its first checkpoint); "
            "start it again with --overwrite"
        )
    ckpt = read_checkpoint(path)
    ts = ckpt.get("train_state")
    if not ts:
        raise CheckpointError(f"{path} holds no training state (an imported or exported checkpoint); it cannot be resumed")
    check_identity(ckpt, recipe, str(path))
    if ts["epoch"] >= recipe.train.epochs:
        raise CheckpointError(
            f"run {run_dir} already finished its {recipe.train.epochs} epochs; nothing to resume "
            f"(evaluate it with `ufgir eval {shlex.quote(str(run_dir))}`, or train it longer with "
            f"`ufgir train --resume {shlex.quote(str(run_dir))} --set train.epochs=N`)"
        )
    return ckpt


#: What `ufgir train --resume RUN --set train.epochs=N` records of a longer run: the schedule over the new total.
EXTENDED_SCHEDULE = ("from step {step} on, the learning rate follows the schedule over the new total of {steps} "
                     "steps (where a run of {epochs} epochs from the start would be at step {step}); the steps before "
                     "followed the schedule over {old} epochs, so this run is not equal to one that was {epochs} "
                     "epochs long from the start")


def with_epochs(recipe: Recipe, epochs: int, run_dir: Path) -> Recipe:
    """The saved recipe with ``train.epochs`` raised to ``epochs``, for a resume that trains longer; the
    only key a resume may change (anything else would not be the run that was saved)."""
    if epochs < recipe.train.epochs:
        raise RecipeError(f"--resume {run_dir}: train.epochs={epochs} is fewer than the run's {recipe.train.epochs}; "
                          "a resume may extend a run, not shorten it")
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"epochs": epochs})})


def schedule_extension(ckpt: dict, recipe: Recipe, steps_per_epoch: int) -> dict | None:
    """The record of a resume with more epochs than the checkpoint was trained for (None when the same)."""
    old = int(ckpt["recipe"]["train"]["epochs"])
    if old == recipe.train.epochs:
        return None
    step = int(ckpt["train_state"]["step"])
    new, total = recipe.train.epochs, recipe.train.epochs * steps_per_epoch
    return {"at_step": step, "epochs_before": old, "epochs_after": new, "total_steps_after": total,
            "note": EXTENDED_SCHEDULE.format(step=step, steps=total, epochs=new, old=old)}


def record_extension(run_dir: Path, recipe: Recipe, extension: dict) -> None:
    """A longer resume, kept in the run: ``recipe.toml`` with the new ``train.epochs`` (what a later resume
    and `ufgir eval` read) and ``provenance.json``'s ``schedule_extensions`` (each one, in order)."""
    import json

    from ..io import atomic_write_json, atomic_write_text
    from ..recipe import dump_resolved

    run = RunDir(run_dir)
    atomic_write_text(run.recipe_file, dump_resolved(recipe))
    try:
        prov = json.loads(run.provenance_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        prov = {}
    prov["schedule_extensions"] = [*prov.get("schedule_extensions", []), extension]
    atomic_write_json(run.provenance_file, prov)


def restore_training(ckpt: dict, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> TrainState:
    """Optimiser and grad-scaler states and the loop counters of a resumed checkpoint. The RNG
    waits for `restore_rng`: building loaders and wrappers in between must not shift it."""
    ts = ckpt["train_state"]
    opt.load_state_dict(ts["optimizer"])
    if ts.get("scaler"):
        scaler.load_state_dict(ts["scaler"])
    return TrainState.from_checkpoint(ts)


def restore_rng(ckpt: dict, dist: DistContext, seed: int) -> None:
    """Each rank's saved RNG. Resumed on another number of ranks the data order is still exact
    (it is keyed by seed, epoch and index), but the dropout streams start afresh per rank."""
    ts = ckpt["train_state"]
    per_rank = ts.get("rng_ranks") or [ts["rng"]]
    if len(per_rank) == dist.world:
        set_rng_state(per_rank[dist.rank])
    else:
        set_rng_state(ts["rng"])
        torch.manual_seed(seed + 1000 * ts["step"] + dist.rank)


class Checkpointer:
    """Writes ``checkpoints/<tag>.pt`` with all an exact resume needs: rank 0 writes, every rank
    hands in its RNG. Built inside the frozen-weight cast, whose float32 originals it saves."""

    def __init__(self, run_dir: Path, model: UfgirViT, recipe: Recipe, opt: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, cast: FrozenCast, dist: DistContext, backbone_sha: str,
                 owner: RunOwner | None = None):
        self.run_dir, self.model, self.recipe, self.opt, self.scaler = run_dir, model, recipe, opt, scaler
        self.cast, self.dist, self.backbone_sha, self.owner = cast, dist, backbone_sha, owner
        self.last = RunDir(run_dir).last

    def save(self, tag: str, state: TrainState, metrics: dict | None = None) -> None:
        """Non-finite weights are never saved: the last good file stays."""
        bad = [k for k, t in self.model.trainable_state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            kept = f"{self.last} keeps the last good weights" if self.last.is_file() else "no checkpoint was written"
            raise TrainingError(f"weights turned non-finite ({bad[0]}) by step {state.step}; not saved, so {kept}. "
                                "Lower optim.lr or set optim.clip_grad")
        rngs = gathered_rng_states(self.dist)  # each rank's dropout stream, for an exact resume
        if not self.dist.is_main:
            return
        ts = {**dataclasses.asdict(state), "optimizer": self.opt.state_dict(),
              "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "rng": rngs[0],
              "rng_ranks": rngs if self.dist.world > 1 else None}
        try:
            with self.cast.originals():  # a full checkpoint holds the frozen weights as they are, not their bf16 copies
                payload = checkpoint_payload(self.model, self.recipe, train_state=ts, metrics=metrics,
                                             backbone_sha256=self.backbone_sha)
                save_checkpoint(RunDir(self.run_dir).checkpoint(tag), payload)
        except CheckpointError as e:
            then = f"resume with: ufgir train --resume {shlex.quote(str(self.run_dir))}" if self.last.is_file() \
                else "start again with --overwrite"
            raise CheckpointError(f"{e}; then {then}") from None
        if self.owner is not None:  # status.json: where a resume starts
            self.owner.saved(tag, state.step, state.epoch)
