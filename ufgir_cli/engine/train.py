"""The training loop: read it top to bottom.

fit() = validate recipe, dataset and images -> build the model (restore it on resume) -> make the
run folder -> loop over epochs (forward, backward, clip, step, log, checkpoint, evaluate) -> the last
epoch's evaluation into ``eval/<split>/`` (the files `ufgir eval` writes) -> summary.

Never lose a run:

- Everything the loop needs to go on (weights and buffers, optimiser, grad scaler, step, epoch,
  position inside the epoch, the running losses, the python/numpy/torch/CUDA RNG) goes into
  ``checkpoints/last.pt`` at every epoch end and every ``train.checkpoint_every`` steps, written
  atomically (`state.Checkpointer`). Augmentation is keyed per sample by (seed, epoch, index) and
  data-loader workers hold no other randomness, so a resumed run is bit-identical to an
  uninterrupted one.
- SIGINT/SIGTERM, and SIGUSR2 (Slurm's warning ahead of a time limit), finish the current step (or,
  in a single process, the current evaluation batch), save, and stop with exit code 130/143/140 and
  the resume command; SIGKILL at any moment leaves the last complete checkpoint.
- A non-finite loss or gradient stops training before the weights are touched, and a checkpoint is
  never written from non-finite weights, so the last good one survives.
- Bad input (recipe, dataset folder, images, checkpoint) fails before anything is written.

What is logged under which tag is written down in `callbacks`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.cost import peak_memory_mb
from ..cores import data_workers, intra_op_threads
from ..data.datasets import normalize
from ..data.integrity import dataset_notices
from ..data.loaders import make_loader, read_splits, with_num_classes
from ..errors import RecipeError, RunFolderError, TrainingError
from ..io import atomic_write_text, remove_stale_temps
from ..model.build import build_model
from ..model.checkpoint import load_into
from ..model.vit import UfgirViT
from ..paths import RunDir
from ..recipe import Recipe, dump_resolved, load_saved_recipe
from .callbacks import Callback, CallbackList, JsonlLogger, TensorBoardLogger
from .dist import barrier, broadcast_flag, cleanup
from .evaluate import EvalResult, evaluate
from .optim import build_optimizer, lr_at, set_lr, warmup_steps
from .owner import RunOwner
from .provenance import write_provenance
from .report import write_eval
from .runtime import Runtime
from .state import (
    Checkpointer,
    Interrupted,
    StopFlag,
    StopRequested,
    TrainState,
    read_resume_checkpoint,
    record_extension,
    restore_rng,
    restore_training,
    schedule_extension,
    seed_everything,
    with_epochs,
)

# --------------------------------------------------------------------------------------------
# Run folder


def default_run_name(recipe: Recipe) -> str:
    return f"{recipe.data.dataset}_{recipe.model.method}_{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new run needs an empty folder; ``overwrite`` may replace an earlier ufgir run, nothing else."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise RunFolderError(f"run folder {run_dir} exists; pick another --name, pass --overwrite, or --resume it")
    if (status := RunDir(run_dir).status()).kind == "running":
        raise RunFolderError(f"run folder {run_dir} is {status}; --overwrite never replaces a live run")
    if not RunDir(run_dir).is_run():
        raise TrainingError(f"--overwrite: {run_dir} is not a ufgir run folder (no recipe.toml); refusing to delete it")


def loggers_for(run_dir: Path, recipe: Recipe, resume_step: int | None) -> list[Callback]:
    """What rank 0 always writes: metrics.jsonl and, if enabled, TensorBoard. On resume both cut
    their history back to ``resume_step``, the checkpoint's step, which is trained again."""
    loggers: list[Callback] = [JsonlLogger(RunDir(run_dir).metrics_log, resume_step=resume_step)]
    if recipe.logging.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, resume_step=resume_step, recipe=recipe))
    return loggers


# --------------------------------------------------------------------------------------------
# Model


def model_for_training(recipe: Recipe, rt: Runtime, resume_ckpt: dict | None, run_dir: Path) -> tuple[UfgirViT, str]:
    """The model on its device (restored on resume) and its backbone's sha256. Every rank builds
    the same initial model; then each rank gets its own dropout stream."""
    model = build_model(recipe.model, recipe.model.num_classes)
    if rt.dist.rank:
        torch.manual_seed(recipe.train.seed + rt.dist.rank)
    backbone_sha = model.backbone_sha256()
    if resume_ckpt is not None:
        load_into(model, resume_ckpt, str(RunDir(run_dir).last), backbone_sha)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(rt.device)
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if recipe.train.sync_bn and rt.dist.world > 1 and rt.device.startswith("cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, backbone_sha


def check_batches(model: UfgirViT, recipe: Recipe, images: int, world: int) -> None:
    """Refuse, in one line, a training batch smaller than the method allows on one rank (a BatchNorm
    head needs two images): ``train.batch_size`` itself, or the last batch of an epoch."""
    least, bs = model.method.min_train_batch, recipe.train.batch_size
    per_rank = math.ceil(images / world)  # training shards are padded to equal length
    last = per_rank % bs or bs
    if least <= 1 or min(bs, last, per_rank) >= least:
        return
    why = (f"train.batch_size is {bs}" if bs < least else
           f"the last batch of each epoch would hold {min(last, per_rank)} ({per_rank} training images per rank, "
           f"train.batch_size {bs})")
    raise RecipeError(f"method {model.method.name!r} needs at least {least} images in every training batch on each "
                      f"rank (its head has BatchNorm) and {why}; choose another train.batch_size")


def forward_model(model: nn.Module, recipe: Recipe, rt: Runtime) -> nn.Module:
    """What the loop runs forward: DDP across ranks, compiled (on CUDA by default). Checkpoints and
    evaluation use the plain ``model``, which shares its parameters."""
    fwd = model
    if rt.dist.world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.dist.local_rank] if rt.device.startswith("cuda") else None)
    if recipe.train.compile if recipe.train.compile is not None else rt.device.startswith("cuda"):
        fwd = torch.compile(fwd)
    return fwd


# --------------------------------------------------------------------------------------------
# Steps and bad numbers


def grad_scaler(rt: Runtime) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA; a disabled (pass-through) scaler everywhere else."""
    return torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16" and rt.device.startswith("cuda"))


def apply_update(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """``scaler.step`` + ``scaler.update``; True when the update was skipped.

    With fp16 loss scaling the GradScaler skips an update whose gradients hold inf/NaN and lowers
    its scale: a lower scale after ``update`` is how a skip shows through the public API. Without a
    scaler the loop has already stopped on non-finite gradients, so nothing is ever skipped.
    """
    before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return before is not None and scaler.get_scale() < before


def nonfinite_error(what: str, value: float, state: TrainState, lr: float, ckpt_path: Path,
                    fp16_scaling: bool) -> TrainingError:
    """One line: what went non-finite, at which step and lr, which checkpoint is good, what to do."""
    kept = f"{ckpt_path} holds the last good weights" if ckpt_path.is_file() else "no checkpoint was written yet"
    hint = ("set train.skip_nonfinite=true to let the fp16 loss scaler skip such steps, or use train.precision=bf16"
            if fp16_scaling else "lower optim.lr, set optim.clip_grad, or use train.precision=fp32")
    return TrainingError(f"{what} is {value} at step {state.step + 1} (epoch {state.epoch + 1}, lr {lr:.3g}); "
                         f"training stopped and {kept}. To go on: {hint}")


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class Loop:
    """What the epochs work with, built once by `fit`: the runtime, the model (``forward`` is what
    runs forward: DDP, compiled; checkpoints and evaluation use ``model``), the optimiser and loss
    scaler, the loaders and the step arithmetic, and where the run's records go."""

    recipe: Recipe
    rt: Runtime
    model: UfgirViT
    forward: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_loader: Any
    eval_loader: Any
    cbs: CallbackList
    ckpt: Checkpointer | None = None
    stop: StopFlag | None = None

    def __post_init__(self) -> None:
        bs, sampler = self.recipe.train.batch_size, self.train_loader.sampler
        self.micro_per_epoch = math.ceil(sampler.epoch_size / bs)  # micro-batches per epoch
        self.accum = self.recipe.train.grad_accum
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.accum)
        self.total_steps = self.recipe.train.epochs * self.steps_per_epoch
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # fp16 loss scaling overflows by design (the scaler backs off and skips the step): skipping is the
        # default there; train.skip_nonfinite=false stops at the first one instead.
        self.fp16_scaling = self.scaler.is_enabled()
        self.may_skip = self.fp16_scaling and self.recipe.train.skip_nonfinite is not False

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.recipe.optim.lr, self.recipe.schedule, self.steps_per_epoch)


def train_one_epoch(loop: Loop, state: TrainState) -> tuple[float, int]:
    """The rest of epoch ``state.epoch`` (from ``state.consumed`` on a resume): forward, the method's
    loss, backward, and every ``train.grad_accum`` micro-batches one clipped optimiser step with its
    log line and checkpoint cadence. A stop signal saves and raises `Interrupted` after the step.
    Returns (the time and the images since the last log line), for the epoch's record."""
    recipe, rt, opt = loop.recipe, loop.rt, loop.opt
    bs = recipe.train.batch_size
    loop.train_loader.sampler.set_epoch(state.epoch, start=state.consumed)
    micro = state.consumed // bs  # micro-batches of this epoch already done
    loop.cbs.on_epoch_start(state.epoch, loop.steps_per_epoch, micro // loop.accum)
    loop.forward.train()
    data_cfg = loop.model.data_config()
    t_log, img_log = time.time(), 0
    step_loss, step_n = 0.0, 0  # this optimiser step's micro-batches, for train/loss_step
    opt.zero_grad(set_to_none=True)
    for x, y, _ in loop.train_loader:
        x = normalize(x.to(rt.device, non_blocking=True), data_cfg)  # uint8 (B, 3, S, S) -> float
        y = y.to(rt.device, non_blocking=True)
        if recipe.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = loop.lr(state.step)
        set_lr(opt, lr)
        with rt.autocast():
            loss = loop.forward(x, y, loop.criterion).loss  # the method's own training loss (CE by default)
        loss_ok = bool(torch.isfinite(loss))
        if not loss_ok and not loop.may_skip:
            raise nonfinite_error("loss", loss.item(), state, lr, loop.ckpt.last, loop.fp16_scaling)
        loop.scaler.scale(loss / loop.accum).backward()  # a non-finite loss gives non-finite grads: skipped below
        micro += 1
        state.consumed = micro * bs  # sampler keys of this rank's shard used so far
        if loss_ok:
            state.add_loss(loss.item(), len(y))
            step_loss, step_n = step_loss + loss.item() * len(y), step_n + len(y)
        img_log += len(y) * rt.dist.world
        if micro % loop.accum and micro < loop.micro_per_epoch:
            continue  # accumulate train.grad_accum micro-batches per step

        loop.scaler.unscale_(opt)
        gnorm = float(torch.nn.utils.clip_grad_norm_(loop.trainable, recipe.optim.clip_grad or float("inf")))
        if not math.isfinite(gnorm) and not loop.may_skip:
            raise nonfinite_error("gradient norm", gnorm, state, lr, loop.ckpt.last, loop.fp16_scaling)
        state.nonfinite_skipped += apply_update(opt, loop.scaler)
        state.step += 1
        loop.cbs.on_step(state.step, {"train/loss_step": step_loss / step_n if step_n else float("nan"),
                                      "train/lr": lr, "train/grad_norm": gnorm})
        step_loss, step_n = 0.0, 0
        # The epoch's last step is logged and saved with the epoch record (`end_epoch`); a stop
        # asked for there is saved before evaluation (resume then evaluates).
        end_of_epoch = micro >= loop.micro_per_epoch
        if not end_of_epoch and state.step % recipe.logging.log_every == 0:
            now = time.time()
            loop.cbs.on_log({"step": state.step, "epoch": state.epoch + micro / loop.micro_per_epoch, "time": now,
                             "train/loss": state.take_log_loss(), "train/lr": lr, "train/grad_norm": gnorm,
                             "train/images_per_s": img_log / max(now - t_log, 1e-9)})
            t_log, img_log = now, 0
        stopping = broadcast_flag(loop.stop.signum is not None, rt.dist)
        every = recipe.train.checkpoint_every
        if stopping or (not end_of_epoch and every and state.step % every == 0):
            loop.ckpt.save("last", state)
        if stopping:
            raise Interrupted.at(loop.stop.signum, state.step, loop.ckpt.run_dir)
    return t_log, img_log


def end_epoch(loop: Loop, state: TrainState, t_log: float, img_log: int) -> EvalResult | None:
    """After an epoch: evaluate when due, log the epoch's record, then checkpoint. Logging first
    means a kill in between loses nothing: the resume re-runs from the previous checkpoint and cuts
    the log. Returns the evaluation, if one ran."""
    recipe, done, now = loop.recipe, state.epoch + 1, time.time()
    evals, result = {}, None
    if done == recipe.train.epochs or (recipe.eval.every and done % recipe.eval.every == 0):
        try:
            evals, result = evaluate_epoch(loop)
        except StopRequested:  # the state is still that of the epoch's last step: the resume evaluates
            loop.ckpt.save("last", state)
            raise Interrupted.at(loop.stop.signum, state.step, loop.ckpt.run_dir) from None
        if state.add_eval(evals[f"{recipe.eval.split}/top1"], selecting=recipe.eval.split == "val"):
            loop.ckpt.save("best", state, {"val/top1": state.best_top1, "epoch": done})
    record = {"step": state.step, "epoch": float(done), "time": now, "train/loss": state.take_log_loss(),
              "train/loss_epoch": state.loss_sum / max(state.loss_n, 1), "train/lr": loop.lr(state.step - 1),
              "train/images_per_s": img_log / max(now - t_log, 1e-9), **evals}
    state.next_epoch()
    state.history.append({k: v for k, v in record.items() if k != "time"})
    loop.cbs.on_log(record)
    loop.ckpt.save("last", state, {k: v for k, v in record.items() if "/" in k})
    loop.cbs.on_epoch_end(state.epoch, record)
    if broadcast_flag(loop.stop.signum is not None, loop.rt.dist):  # under torchrun, a signal during evaluation
        raise Interrupted.at(loop.stop.signum, state.step, loop.ckpt.run_dir)
    return result


@contextlib.contextmanager
def _torch_flags_restored():
    """``train.deterministic`` and ``train.threads`` switch process-wide torch settings; a caller that trains from Python
    (a notebook, a sweep) gets its own settings back afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_num_threads())
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.set_num_threads(saved[4])


def fit(
    recipe: Recipe,
    run_dir: Path,
    *,
    callbacks: list[Callback] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train ``recipe`` into ``run_dir`` (or continue it with ``resume``). Returns the summary."""
    with _torch_flags_restored():
        return _fit(recipe, run_dir, callbacks=callbacks, resume=resume, overwrite=overwrite)


def _fit(recipe: Recipe, run_dir: Path, *, callbacks: list[Callback] | None, resume: bool, overwrite: bool) -> dict:
    rt = Runtime.for_training(recipe)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = intra_op_threads(recipe.train.threads, data_workers(recipe.data.num_workers, local_world), local_world)
    torch.set_num_threads(threads)
    t_start = time.time()

    # 1. Run folder or checkpoint to resume, data, images: all validated before anything is written.
    resume_ckpt = read_resume_checkpoint(run_dir, recipe) if resume else None
    if not resume:
        check_new_run_dir(run_dir, overwrite)
    train_split, eval_split, skipped = read_splits(recipe)
    recipe = with_num_classes(recipe, train_split.num_classes)
    seed_everything(recipe.train.seed, recipe.train.deterministic)

    # 2. Model, optimiser, scaler, counters (restored on resume; the RNG comes last, in 5).
    model, backbone_sha = model_for_training(recipe, rt, resume_ckpt, run_dir)
    check_batches(model, recipe, len(train_split.samples), rt.dist.world)
    recipe = recipe.with_model(model.cfg, model.data_config())  # what the build derived from the backbone, saved
    opt, scaler = build_optimizer(model, recipe.optim), grad_scaler(rt)
    state = restore_training(resume_ckpt, opt, scaler) if resume_ckpt is not None else TrainState()

    # 3. Run folder (rank 0 writes): new, or resumed (see `prepare_run_dir`).
    loggers = prepare_run_dir(run_dir, recipe, rt, state, resume=resume, backbone_sha=backbone_sha, threads=threads,
                              split=train_split, skipped=skipped)

    # 4. Loaders and schedule.
    bs = recipe.train.batch_size
    loop = Loop(recipe, rt, model, forward_model(model, recipe, rt), opt, scaler,
                torch.nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing),
                make_loader(train_split, recipe, train=True, batch_size=bs, rank=rt.dist.rank, world=rt.dist.world),
                make_loader(eval_split, recipe, train=False, batch_size=recipe.eval.batch_size or bs,
                            rank=rt.dist.rank, world=rt.dist.world),
                CallbackList([*(callbacks or []), *loggers]))
    extension = schedule_extension(resume_ckpt, recipe, loop.steps_per_epoch) if resume_ckpt is not None else None
    if extension is not None and rt.is_main:  # a resume with more epochs: the new total, recorded
        record_extension(run_dir, recipe, extension)
    params = {"params_total": sum(p.numel() for p in model.parameters()),
              "params_trainable": sum(p.numel() for p in loop.trainable)}
    loop.cbs.on_train_start({
        "run_dir": str(run_dir), "device": rt.device, "precision": rt.precision, "threads": threads,
        "epochs": recipe.train.epochs, "steps_per_epoch": loop.steps_per_epoch, "total_steps": loop.total_steps,
        "start_step": state.step, "resumed": resume_ckpt is not None, "extension": extension, **params, "train_images": len(train_split.samples),
        "eval_images": len(eval_split.samples), "world": rt.dist.world, "skipped_images": len(skipped),
        # e.g. test images also in train_val, allowed at download
        "warnings": dataset_notices(train_split.root) + schedule_warnings(recipe, loop.total_steps, loop.steps_per_epoch)})

    # 5. Loop. The RNG is restored last, so that nothing above can shift it.
    if resume_ckpt is not None:
        restore_rng(resume_ckpt, rt.dist, recipe.train.seed)
    final_eval: EvalResult | None = None
    with contextlib.ExitStack() as stack:
        loop.stop = stack.enter_context(StopFlag())
        owner = stack.enter_context(RunOwner(run_dir, state, rt.is_main))  # status.json: owner, heartbeat, how it ended
        cast = stack.enter_context(rt.weights_cast(model))
        for lg in loggers:
            stack.callback(lg.close)
        loop.ckpt = Checkpointer(run_dir, model, recipe, opt, scaler, cast, rt.dist, backbone_sha, owner)
        while state.epoch < recipe.train.epochs:
            t_log, img_log = train_one_epoch(loop, state)
            final_eval = end_epoch(loop, state, t_log, img_log) or final_eval

    # 6. The last epoch's evaluation, written as `ufgir eval --checkpoint last` would; the summary.
    barrier(rt.dist)
    if rt.is_main and final_eval is not None:
        write_eval(run_dir, eval_split, final_eval, checkpoint="last", precision=rt.precision)
    summary = summarize(run_dir, recipe, model, state, rt, params=params, skipped=skipped, time_s=time.time() - t_start)
    loop.cbs.on_train_end(summary)
    cleanup(rt.dist)
    return summary


def prepare_run_dir(run_dir: Path, recipe: Recipe, rt: Runtime, state: TrainState, *, resume: bool,
                    backbone_sha: str, threads: int, split, skipped: list[str]) -> list[Callback]:
    """Rank 0 makes the run folder (recipe, provenance) or, resuming, drops the temp files a killed
    writer left; its loggers cut their history back to the checkpoint's step. Other ranks log nothing."""
    if not rt.is_main:
        return []
    run = RunDir(run_dir)
    if resume:
        remove_stale_temps(run_dir)
        remove_stale_temps(run.checkpoints_dir)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # --overwrite of an earlier run (checked before anything was built)
        run.checkpoints_dir.mkdir(parents=True)
        atomic_write_text(run.recipe_file, dump_resolved(recipe))
        write_provenance(run_dir, recipe, backbone_sha, device=rt.device, precision=rt.precision, threads=threads,
                         split=split, skipped=skipped)
    return loggers_for(run_dir, recipe, state.step if resume else None)


def schedule_warnings(recipe: Recipe, total_steps: int, steps_per_epoch: int | None = None) -> list[str]:
    s = recipe.schedule
    key = "warmup_steps" if s.warmup_epochs is None else "warmup_epochs"
    if warmup_steps(s, steps_per_epoch) >= total_steps:
        return [f"schedule.{key}={getattr(s, key)} is not shorter than the whole run "
                f"({total_steps} steps): the learning rate never reaches optim.lr; lower it with "
                f"--set schedule.{key}=N"]
    return []


def evaluate_epoch(loop: Loop) -> tuple[dict, EvalResult]:
    """The epoch's evaluation on eval.split (sharded across ranks): its record tags, and the full
    result (gathered on every rank) that the last epoch writes to ``eval/<split>/``.

    A stop signal breaks a single process's evaluation off after the current batch
    (`StopRequested`); ranks gather their results at the end, so under torchrun they finish it.
    """
    split, cbs = loop.recipe.eval.split, loop.cbs
    cbs.on_eval_start(split, len(loop.eval_loader))

    def on_batch(n: int) -> None:
        cbs.on_eval_batch(n)
        if loop.rt.dist.world == 1:
            loop.stop.raise_if_set()

    result = evaluate(loop.model, loop.eval_loader, loop.rt, num_classes=loop.recipe.model.num_classes, on_batch=on_batch)
    return {f"{split}/{k}": result.metrics[k] for k in ("top1", "top5", "per_class_mean", "loss")}, result


def summarize(run_dir: Path, recipe: Recipe, model: UfgirViT, state: TrainState, rt: Runtime, *, params: dict,
              skipped: list[str], time_s: float) -> dict:
    """What fit() returns and the CLI prints: the last evaluation, the best one when selecting on
    val, and what the run cost."""
    return {
        "run_dir": str(run_dir), "split": recipe.eval.split, "final_top1": state.last_top1,
        # checkpoints written before best and last were kept apart hold the last result as best
        "best_top1": state.best_top1 if recipe.eval.split == "val" else None,
        "time_s": time_s, "peak_memory_mb": peak_memory_mb(rt.device), **params, "macs": macs_per_image(model, recipe),
        "steps": state.step, "nonfinite_skipped": state.nonfinite_skipped, "skipped_images": len(skipped),
        "last": state.history[-1], "device": rt.device, "precision": rt.precision,
    }


def macs_per_image(model: UfgirViT, recipe: Recipe) -> int:
    """Multiply-adds of one forward at the recipe's image size, the number `inspect` shows."""
    from ..analysis.cost import count_flops

    return count_flops(model, recipe.model.image_size) // 2


def resume(run_dir: Path, *, callbacks: list[Callback] | None = None, epochs: int | None = None) -> dict:
    """Continue a run folder in place with its saved recipe (`ufgir train --resume`, a sweep's
    killed run): the one way to resume; `read_resume_checkpoint` says whether it can be. ``epochs``
    more than the recipe's trains longer (`with_epochs`; the schedule then follows the new total)."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise RecipeError(f"--resume {run_dir}: no such run folder; give the folder that holds recipe.toml")
    if not run.is_run():
        raise RecipeError(f"--resume {run_dir}: not a run folder (no recipe.toml); give the folder `ufgir train` made")
    recipe = load_saved_recipe(run.recipe_file)
    if epochs is not None:
        recipe = with_epochs(recipe, epochs, run.root)
    return fit(recipe, run.root, callbacks=callbacks, resume=True)


__all__ = ["Interrupted", "TrainState", "apply_update", "default_run_name", "fit"]
