"""The training loop: read it top to bottom.

fit() = validate recipe, dataset and images -> build the model (restore it on resume) -> make the
run folder -> loop over epochs (forward, backward, clip, step, log, checkpoint, evaluate) -> summary.

Never lose a run:

- Everything the loop needs to go on (weights and buffers, optimiser, grad scaler, step, epoch,
  position inside the epoch, the epoch's running loss, the python/numpy/torch/CUDA RNG) goes into
  ``checkpoints/last.pt`` at every epoch end and every ``train.checkpoint_every`` steps, written
  atomically. Augmentation is keyed per sample by (seed, epoch, index) and data-loader workers hold
  no other randomness, so a resumed run is bit-identical to an uninterrupted one.
- SIGINT/SIGTERM finish the current step, save, and stop with exit code 130/143 and the resume
  command; SIGKILL at any moment leaves the last complete checkpoint.
- A non-finite loss or gradient stops training before the weights are touched, and a checkpoint is
  never written from non-finite weights, so the last good one survives.
- Bad input (recipe, dataset folder, images, checkpoint) fails before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import shlex
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import EpochSampler, normalize
from ..data.loaders import make_loader, read_splits, with_num_classes
from ..errors import CheckpointError, TrainingError
from ..io import atomic_write_text, remove_stale_temps
from ..model.checkpoint import check_identity, checkpoint_payload, load_into, read_checkpoint, save_checkpoint
from ..model.precision import autocast, frozen_weights_cast, resolve_device, resolve_precision
from ..model.vit import build_model
from ..recipe import Recipe, dump_resolved
from .callbacks import Callback, JsonlLogger, TensorBoardLogger
from .dist import DistContext, all_gather_object, barrier, broadcast_flag, cleanup, init_distributed
from .evaluate import evaluate
from .optim import build_optimizer, lr_at, set_lr
from .provenance import write_provenance


class Interrupted(TrainingError):
    """SIGINT/SIGTERM: the current step finished, a checkpoint was written."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.exit_code = 128 + signum


# --------------------------------------------------------------------------------------------
# Run folder


def default_run_name(recipe: Recipe) -> str:
    return f"{recipe.data.dataset}_{recipe.model.method}_{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new run needs an empty folder; ``overwrite`` may replace an earlier ufgir run, nothing else."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise TrainingError(f"run folder {run_dir} exists; pick another --name, pass --overwrite, or --resume it")
    if not (run_dir / "recipe.toml").is_file():
        raise TrainingError(f"--overwrite: {run_dir} is not a ufgir run folder (no recipe.toml); refusing to delete it")


def read_resume_checkpoint(run_dir: Path, recipe: Recipe) -> dict:
    """The run's ``last.pt``, checked to hold training state for this recipe and work left to do."""
    path = run_dir / "checkpoints" / "last.pt"
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
            f"(evaluate it with `ufgir eval {shlex.quote(str(run_dir))}`)"
        )
    return ckpt


# --------------------------------------------------------------------------------------------
# RNG state (resume)


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


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# --------------------------------------------------------------------------------------------
# Signals


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second one stops at once.
    Installed in the main thread only (Python delivers signals there)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------
# Steps and bad numbers


def grad_scaler(device: str, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA; a disabled (pass-through) scaler everywhere else."""
    return torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.startswith("cuda"))


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
class TrainState:
    """Where the loop is. Saved whole in every checkpoint, next to optimiser, scaler and RNG states."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch (0-based)
    consumed: int = 0  # samples of this rank's shard consumed in the current epoch
    loss_sum: float = 0.0  # sum of per-sample training losses so far this epoch: the epoch's mean
    loss_n: int = 0  # loss is logged at its end, so a resume mid-epoch must continue the sum
    best_top1: float | None = None
    nonfinite_skipped: int = 0
    history: list = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, ts: dict) -> TrainState:
        return cls(**{f.name: ts[f.name] for f in dataclasses.fields(cls) if f.name in ts})


@contextlib.contextmanager
def _torch_flags_restored():
    """``train.deterministic`` switches process-wide torch flags; a caller that trains from Python
    (a notebook, a sweep) gets its own settings back afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


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
    callbacks = list(callbacks or [])
    device = resolve_device(recipe.train.device)
    dist = init_distributed(device)
    if device == "cuda" and dist.world > 1:
        device = f"cuda:{dist.local_rank}"
    precision = resolve_precision(recipe.train.precision, device)
    t_start = time.time()

    # 1. Run folder or checkpoint to resume, data, images: all validated before anything is written.
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if resume:
        resume_ckpt = read_resume_checkpoint(run_dir, recipe)
    else:
        check_new_run_dir(run_dir, overwrite)
        resume_ckpt = None
    train_split, eval_split, skipped = read_splits(recipe)
    recipe = with_num_classes(recipe, train_split.num_classes)

    seed_everything(recipe.train.seed, recipe.train.deterministic)

    # 2. Model, optimiser, scaler (restored on resume). Every rank builds the same initial model;
    # then each rank gets its own dropout stream.
    model = build_model(recipe.model, recipe.model.num_classes)
    if dist.rank:
        torch.manual_seed(recipe.train.seed + dist.rank)
    backbone_sha = model.backbone_sha256()
    data_cfg = model.data_config()
    mean, std = data_cfg["mean"], data_cfg["std"]
    if resume_ckpt is not None:
        load_into(model, resume_ckpt, str(ckpt_path), backbone_sha)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if recipe.train.sync_bn and dist.world > 1 and device.startswith("cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = build_optimizer(model, recipe.optim)
    scaler = grad_scaler(device, precision)
    state = TrainState()
    if resume_ckpt is not None:
        ts = resume_ckpt["train_state"]
        opt.load_state_dict(ts["optimizer"])
        if ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        state = TrainState.from_checkpoint(ts)
    fwd_model = model
    if dist.world > 1:
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    compile_ = recipe.train.compile if recipe.train.compile is not None else device.startswith("cuda")
    if compile_:
        fwd_model = torch.compile(fwd_model)

    # 3. Run folder (rank 0 writes). A resumed run keeps its recipe and provenance, drops the temp
    # files a killed writer left, and cuts its logs back to the checkpoint's step.
    loggers: list[Callback] = []
    if dist.is_main:
        if resume:
            remove_stale_temps(run_dir)
            remove_stale_temps(run_dir / "checkpoints")
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # --overwrite of an earlier run (checked above)
            (run_dir / "checkpoints").mkdir(parents=True)
            atomic_write_text(run_dir / "recipe.toml", dump_resolved(recipe))
            write_provenance(run_dir, recipe, backbone_sha, device=device, precision=precision, split=train_split,
                             skipped=skipped)
        resume_step = state.step if resume else None
        loggers.append(JsonlLogger(run_dir / "metrics.jsonl", resume_step=resume_step))
        if recipe.logging.tensorboard:
            loggers.append(TensorBoardLogger(run_dir, resume_step=resume_step))
        callbacks += loggers

    # 4. Loaders and schedule.
    bs = recipe.train.batch_size
    train_loader = make_loader(train_split, recipe, train=True, batch_size=bs, rank=dist.rank, world=dist.world)
    eval_loader = make_loader(eval_split, recipe, train=False, batch_size=recipe.eval.batch_size or bs,
                              rank=dist.rank, world=dist.world)
    sampler: EpochSampler = train_loader.sampler
    micro_per_epoch = math.ceil(sampler.epoch_size / bs)
    accum = recipe.train.grad_accum
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = recipe.train.epochs * steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fp16_scaling = scaler.is_enabled()
    # fp16 loss scaling overflows by design (the scaler backs off and skips the step): skipping is the
    # default there; train.skip_nonfinite=false stops at the first one instead.
    skip = recipe.train.skip_nonfinite
    may_skip = fp16_scaling and (skip is None or skip)
    info = {"run_dir": str(run_dir), "device": device, "precision": precision, "epochs": recipe.train.epochs,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "start_step": state.step,
            "params_total": n_params, "params_trainable": n_train, "train_images": len(train_split.samples),
            "eval_images": len(eval_split.samples), "world": dist.world, "skipped_images": len(skipped)}
    for cb in callbacks:
        cb.on_train_start(info)

    def save(tag: str, metrics: dict | None = None) -> None:
        """Checkpoint (rank 0 writes). Non-finite weights are never saved: the last good file stays."""
        bad = [k for k, t in model.trainable_state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            kept = f"{ckpt_path} keeps the last good weights" if ckpt_path.is_file() else "no checkpoint was written"
            raise TrainingError(f"weights turned non-finite ({bad[0]}) by step {state.step}; not saved, so {kept}. "
                                "Lower optim.lr or set optim.clip_grad")
        rngs = gathered_rng_states(dist)  # each rank's dropout stream, for an exact resume
        if not dist.is_main:
            return
        ts = {**dataclasses.asdict(state), "optimizer": opt.state_dict(),
              "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs[0],
              "rng_ranks": rngs if dist.world > 1 else None}
        try:
            with cast.originals():  # a full checkpoint holds the frozen weights as they are, not their bf16 copies
                payload = checkpoint_payload(model, recipe, train_state=ts, metrics=metrics,
                                             backbone_sha256=backbone_sha)
                save_checkpoint(run_dir / "checkpoints" / f"{tag}.pt", payload)
        except CheckpointError as e:
            then = f"resume with: ufgir train --resume {shlex.quote(str(run_dir))}" if ckpt_path.is_file() \
                else "start again with --overwrite"
            raise CheckpointError(f"{e}; then {then}") from None

    def interrupted(signum: int | None) -> Interrupted:
        signum = signum or signal.SIGTERM  # ranks that saw no signal follow the one that did
        return Interrupted(
            f"interrupted by {signal.Signals(signum).name} at step {state.step}; checkpoint saved. "
            f"Resume with: ufgir train --resume {shlex.quote(str(run_dir))}", int(signum))

    # 5. Loop. The RNG is restored last, so that nothing above can shift it.
    if resume_ckpt is not None:
        ts = resume_ckpt["train_state"]
        per_rank = ts.get("rng_ranks") or [ts["rng"]]
        if len(per_rank) == dist.world:
            set_rng_state(per_rank[dist.rank])
        else:  # resumed on another number of ranks: data order is exact, dropout streams start afresh
            set_rng_state(ts["rng"])
            torch.manual_seed(recipe.train.seed + 1000 * state.step + dist.rank)
    eval_result = None
    last_record: dict = {}
    loss_f = torch.nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing)
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(StopFlag())
        cast = stack.enter_context(frozen_weights_cast(model, precision))  # read by save()
        for lg in loggers:
            stack.callback(lg.close)
        while state.epoch < recipe.train.epochs:
            epoch = state.epoch
            sampler.set_epoch(epoch, start=state.consumed)
            micro = state.consumed // bs  # micro-batches of this epoch already done
            for cb in callbacks:
                cb.on_epoch_start(epoch, steps_per_epoch, micro // accum)
            fwd_model.train()
            t_log, img_log = time.time(), 0
            opt.zero_grad(set_to_none=True)
            for x, y, _ in train_loader:
                x = normalize(x.to(device, non_blocking=True), mean, std)  # uint8 (B, 3, S, S) -> float
                y = y.to(device, non_blocking=True)
                if recipe.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = lr_at(state.step, total_steps, recipe.optim.lr, recipe.schedule)
                set_lr(opt, lr)
                with autocast(device, precision):
                    logits = fwd_model(x)
                loss = loss_f(logits.float(), y)
                loss_ok = bool(torch.isfinite(loss))
                if not loss_ok and not may_skip:
                    raise nonfinite_error("loss", loss.item(), state, lr, ckpt_path, fp16_scaling)
                scaler.scale(loss / accum).backward()  # a non-finite loss gives non-finite grads: skipped below
                micro += 1
                state.consumed = micro * bs  # sampler keys of this rank's shard used so far
                if loss_ok:
                    state.loss_sum += loss.item() * len(y)
                    state.loss_n += len(y)
                img_log += len(y) * dist.world
                if micro % accum and micro < micro_per_epoch:
                    continue  # accumulate train.grad_accum micro-batches per step

                scaler.unscale_(opt)
                gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, recipe.optim.clip_grad or float("inf")))
                if not math.isfinite(gnorm) and not may_skip:
                    raise nonfinite_error("gradient norm", gnorm, state, lr, ckpt_path, fp16_scaling)
                state.nonfinite_skipped += apply_update(opt, scaler)
                state.step += 1
                logs = {"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": gnorm}
                for cb in callbacks:
                    cb.on_step(state.step, logs)

                # The epoch's last step is logged and saved with the epoch record below; a stop
                # asked for there is saved before evaluation (resume then evaluates).
                end_of_epoch = micro >= micro_per_epoch
                if not end_of_epoch and state.step % recipe.logging.log_every == 0:
                    now = time.time()
                    rec = {"step": state.step, "epoch": epoch + micro / micro_per_epoch, "time": now,
                           "train/loss": state.loss_sum / max(state.loss_n, 1), "train/lr": lr,
                           "train/grad_norm": gnorm, "train/images_per_s": img_log / max(now - t_log, 1e-9)}
                    t_log, img_log = now, 0
                    for cb in callbacks:
                        cb.on_log(rec)
                stopping = broadcast_flag(stop.signum is not None, dist)
                every = recipe.train.checkpoint_every
                if stopping or (not end_of_epoch and every and state.step % every == 0):
                    save("last")
                if stopping:
                    raise interrupted(stop.signum)

            # End of epoch: evaluate when due, log, then checkpoint. Logging first means a kill in
            # between loses nothing: the resume re-runs from the previous checkpoint and cuts the log.
            done = epoch + 1
            now = time.time()
            record = {"step": state.step, "epoch": float(done), "time": now,
                      "train/loss": state.loss_sum / max(state.loss_n, 1),
                      "train/lr": lr_at(state.step - 1, total_steps, recipe.optim.lr, recipe.schedule),
                      "train/images_per_s": img_log / max(now - t_log, 1e-9)}
            if done == recipe.train.epochs or (recipe.eval.every and done % recipe.eval.every == 0):
                split = recipe.eval.split
                for cb in callbacks:
                    cb.on_eval_start(split, len(eval_loader))
                on_b = (lambda n: [cb.on_eval_batch(n) for cb in callbacks]) if callbacks else None
                eval_result = evaluate(model, eval_loader, device=device, precision=precision, mean=mean, std=std,
                                       num_classes=recipe.model.num_classes, dist=dist, on_batch=on_b)
                for k in ("top1", "top5", "per_class_mean", "loss"):
                    record[f"{split}/{k}"] = eval_result.metrics[k]
                if split == "val" and (state.best_top1 is None or eval_result.metrics["top1"] > state.best_top1):
                    state.best_top1 = eval_result.metrics["top1"]
                    save("best", {"val/top1": state.best_top1, "epoch": done})
                elif split != "val":
                    state.best_top1 = eval_result.metrics["top1"]  # the paper protocol reports the final epoch
            state.epoch, state.consumed, state.loss_sum, state.loss_n = done, 0, 0.0, 0
            state.history.append({k: v for k, v in record.items() if k != "time"})
            for cb in callbacks:
                cb.on_log(record)
            save("last", {k: v for k, v in record.items() if "/" in k})
            last_record = record
            for cb in callbacks:
                cb.on_epoch_end(state.epoch, record)
            if broadcast_flag(stop.signum is not None, dist):  # a signal during evaluation
                raise interrupted(stop.signum)

    barrier(dist)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _cpu_peak_mb()
    from ..analysis.cost import count_flops

    macs = count_flops(model, recipe.model.image_size) // 2
    summary = {
        "run_dir": str(run_dir), "split": recipe.eval.split,
        "final_top1": eval_result.metrics["top1"] if eval_result else None,
        "best_top1": state.best_top1, "time_s": time.time() - t_start, "peak_memory_mb": peak,
        "params_trainable": n_train, "params_total": n_params, "macs": macs, "steps": state.step,
        "nonfinite_skipped": state.nonfinite_skipped, "skipped_images": len(skipped), "last": last_record,
        "device": device, "precision": precision,
    }
    for cb in callbacks:
        cb.on_train_end(summary)
    cleanup(dist)
    return summary


def _cpu_peak_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


__all__ = ["Interrupted", "TrainState", "apply_update", "default_run_name", "fit"]
