"""The training loop: read it top to bottom.

fit() = resolve data and recipe -> build model -> make the run folder -> loop over epochs
(forward, backward, clip, step, log, checkpoint, evaluate) -> summary. Everything the loop needs
to continue after an interruption (weights, optimiser, scaler, step, position in the epoch, RNG)
goes into ``checkpoints/last.pt``; augmentation is keyed per sample, so resuming is exact.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.datasets import EpochSampler, ImageFolderSplit, Preprocess, collate, normalize, seed_worker
from ..data.folder import SplitFile, read_split
from ..errors import RecipeError, TrainingError
from ..io import atomic_write_text
from ..model.checkpoint import checkpoint_payload, read_checkpoint, save_checkpoint
from ..model.vit import UfgirViT, build_model
from ..recipe import Recipe, dump_resolved
from .amp import autocast, resolve_device, resolve_precision
from .callbacks import Callback, JsonlLogger, TensorBoardLogger
from .dist import DistContext, barrier, broadcast_flag, cleanup, init_distributed
from .evaluate import evaluate
from .optim import build_optimizer, lr_at, set_lr


class Interrupted(TrainingError):
    """SIGINT/SIGTERM: the current step finished, a checkpoint was written."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.exit_code = 128 + signum


# --------------------------------------------------------------------------------------------
# Data


def dataset_root(recipe: Recipe) -> Path:
    from ..paths import dataset_dir

    name = recipe.data.dataset
    root = dataset_dir(name, recipe.data.root)
    if name == "synthetic":
        from ..data.synthetic import ensure_synthetic

        ensure_synthetic(root)
    return root


def read_splits(recipe: Recipe) -> tuple[SplitFile, SplitFile]:
    """Validate both split files before anything is written (missing image, bad id, empty split)."""
    root = dataset_root(recipe)
    check = not recipe.data.skip_corrupt
    return read_split(root, recipe.train.split, check_files=check), read_split(root, recipe.eval.split, check_files=check)


def with_num_classes(recipe: Recipe, num_classes: int) -> Recipe:
    m = recipe.model
    if m.num_classes is not None and m.num_classes != num_classes:
        raise RecipeError(
            f"model.num_classes is {m.num_classes} but dataset {recipe.data.dataset!r} has {num_classes} classes; "
            "unset model.num_classes to take it from the dataset"
        )
    return recipe.model_copy(update={"model": m.model_copy(update={"num_classes": num_classes})})


def data_mean_std(recipe: Recipe, model: UfgirViT) -> tuple[tuple, tuple]:
    cfg = model.vit.pretrained_cfg or {}
    mean = recipe.model.mean or tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
    std = recipe.model.std or tuple(cfg.get("std", (0.5, 0.5, 0.5)))
    return tuple(mean), tuple(std)


def make_loader(split: SplitFile, recipe: Recipe, *, train: bool, batch_size: int, dist: DistContext,
                workers: int | None = None) -> DataLoader:
    d = recipe.data
    tf = Preprocess(recipe.model.image_size, train, d.resize_ratio, d.hflip, d.interpolation)
    ds = ImageFolderSplit(split, tf, seed=recipe.train.seed, skip_corrupt=d.skip_corrupt)
    sampler = EpochSampler(len(ds), shuffle=train, seed=recipe.train.seed, rank=dist.rank, world=dist.world, pad=train)
    workers = d.num_workers if workers is None else workers
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0 and train,
        worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(recipe.train.seed),
        prefetch_factor=4 if workers > 0 else None,
    )


# --------------------------------------------------------------------------------------------
# Run folder


def default_run_name(recipe: Recipe) -> str:
    return f"{recipe.data.dataset}_{recipe.model.method}_{time.strftime('%Y%m%d-%H%M%S')}"


def provenance(recipe: Recipe, model: UfgirViT, split: SplitFile, backbone_sha: str, device: str, precision: str) -> dict:
    import hashlib
    import platform
    import subprocess

    import timm
    import torchvision

    from .. import __version__
    from ..data.folder import read_info

    h = hashlib.sha256()
    for name in ("train", "val", "train_val", "test"):
        p = split.root / "splits" / f"{name}.csv"
        if p.is_file():
            h.update(p.read_bytes())
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "ufgir": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__, "git_commit": commit,
        "hardware": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(), "gpus": gpu, "device": device, "precision": precision},
        "dataset": {"name": recipe.data.dataset, "root": str(split.root), "splits_sha256": h.hexdigest(),
                    "archive_sha256": read_info(split.root).get("archive_sha256")},
        "backbone": {"name": recipe.model.backbone, "weights": recipe.model.weights, "sha256": backbone_sha},
    }


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
    """SIGINT/SIGTERM ask the loop to stop after the current step (installed in the main thread only)."""

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
# The loop


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch (0-based)
    consumed: int = 0  # samples of this rank's shard consumed in the current epoch
    best_top1: float | None = None
    nonfinite_skipped: int = 0
    history: list = field(default_factory=list)


def fit(
    recipe: Recipe,
    run_dir: Path,
    *,
    callbacks: list[Callback] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    fault_hook=None,
) -> dict:
    """Train ``recipe`` into ``run_dir`` (or continue it with ``resume``). Returns the summary."""
    callbacks = list(callbacks or [])
    device = resolve_device(recipe.train.device)
    dist = init_distributed(device)
    if device == "cuda" and dist.world > 1:
        device = f"cuda:{dist.local_rank}"
    precision = resolve_precision(recipe.train.precision, device)
    t_start = time.time()

    # 1. Data and recipe, validated before anything is written.
    train_split, eval_split = read_splits(recipe)
    recipe = with_num_classes(recipe, train_split.num_classes)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    resume_ckpt = None
    if resume:
        resume_ckpt = read_checkpoint(ckpt_path)
        if not resume_ckpt.get("train_state"):
            raise TrainingError(f"{ckpt_path} holds no training state; it cannot be resumed")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise TrainingError(f"run folder {run_dir} exists; pick another --name, pass --overwrite, or --resume it")

    seed_everything(recipe.train.seed + dist.rank, recipe.train.deterministic)

    # 2. Model.
    model = build_model(recipe.model, recipe.model.num_classes)
    backbone_sha = model.backbone_sha256()
    mean, std = data_mean_std(recipe, model)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if recipe.train.sync_bn and dist.world > 1 and device.startswith("cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = build_optimizer(model, recipe.optim)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.startswith("cuda"))
    state = TrainState()
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["state_dict"], strict=bool(resume_ckpt.get("full")))
        ts = resume_ckpt["train_state"]
        opt.load_state_dict(ts["optimizer"])
        if ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        state = TrainState(step=ts["step"], epoch=ts["epoch"], consumed=ts["consumed"], best_top1=ts.get("best_top1"),
                           nonfinite_skipped=ts.get("nonfinite_skipped", 0), history=list(ts.get("history", [])))
    fwd_model = model
    if dist.world > 1:
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    compile_ = recipe.train.compile if recipe.train.compile is not None else device.startswith("cuda")
    if compile_:
        fwd_model = torch.compile(fwd_model)

    # 3. Run folder (rank 0 writes).
    if dist.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.toml", dump_resolved(recipe))
        from ..io import atomic_write_json

        atomic_write_json(run_dir / "provenance.json",
                          provenance(recipe, model, train_split, backbone_sha, device, precision))
        callbacks.append(JsonlLogger(run_dir / "metrics.jsonl", resume_step=state.step if resume else None))
        if recipe.logging.tensorboard:
            callbacks.append(TensorBoardLogger(run_dir, resume_step=state.step if resume else None))
    else:
        callbacks = []

    # 4. Loaders and schedule.
    bs = recipe.train.batch_size
    train_loader = make_loader(train_split, recipe, train=True, batch_size=bs, dist=dist)
    eval_loader = make_loader(eval_split, recipe, train=False, batch_size=recipe.eval.batch_size or bs, dist=dist)
    sampler: EpochSampler = train_loader.sampler
    micro_per_epoch = math.ceil(len(sampler._order()) / bs)
    accum = recipe.train.grad_accum
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = recipe.train.epochs * steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    info = {"run_dir": str(run_dir), "device": device, "precision": precision, "epochs": recipe.train.epochs,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "start_step": state.step,
            "params_total": n_params, "params_trainable": n_train, "train_images": len(train_split.samples),
            "eval_images": len(eval_split.samples), "world": dist.world}
    for cb in callbacks:
        cb.on_train_start(info)

    def save(tag: str, metrics: dict | None = None) -> None:
        if not dist.is_main:
            return
        ts = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
              "step": state.step, "epoch": state.epoch, "consumed": state.consumed, "best_top1": state.best_top1,
              "nonfinite_skipped": state.nonfinite_skipped, "history": state.history, "rng": rng_state()}
        payload = checkpoint_payload(model, recipe, train_state=ts, metrics=metrics, backbone_sha256=backbone_sha)
        if fault_hook is not None:
            fault_hook("before_save", tag, state)
        save_checkpoint(run_dir / "checkpoints" / f"{tag}.pt", payload)

    if resume_ckpt is not None:
        set_rng_state(resume_ckpt["train_state"]["rng"])

    # 5. Loop.
    eval_result = None
    last_record: dict = {}
    loss_f = torch.nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing)
    with StopFlag() as stop:
        while state.epoch < recipe.train.epochs:
            epoch = state.epoch
            sampler.set_epoch(epoch, start=state.consumed)
            done_micro = state.consumed // bs
            for cb in callbacks:
                cb.on_epoch_start(epoch, steps_per_epoch, done_micro // accum)
            fwd_model.train()
            run_loss, run_n, t_log, img_log = 0.0, 0, time.time(), 0
            micro = done_micro
            opt.zero_grad(set_to_none=True)
            for x, y, _ in train_loader:
                x = normalize(x.to(device, non_blocking=True), mean, std)
                y = y.to(device, non_blocking=True)
                if recipe.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = lr_at(state.step, total_steps, recipe.optim.lr, recipe.schedule)
                set_lr(opt, lr)
                with autocast(device, precision):
                    logits = fwd_model(x)
                loss = loss_f(logits.float(), y)
                if not torch.isfinite(loss) and not (recipe.train.skip_nonfinite and scaler.is_enabled()):
                    raise TrainingError(
                        f"loss is {loss.item()} at step {state.step} (epoch {epoch + 1}, lr {lr:.3g}); the last good "
                        f"checkpoint is {ckpt_path}. Lower optim.lr, keep optim.clip_grad, or use train.precision=fp32"
                    )
                scaler.scale(loss / accum).backward()
                micro += 1
                state.consumed = micro * bs  # sampler keys of this rank's shard used so far
                run_loss += loss.item() * len(y)
                run_n += len(y)
                img_log += len(y) * dist.world
                if micro % accum and micro < micro_per_epoch:
                    continue
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(trainable, recipe.optim.clip_grad or float("inf"))
                if not torch.isfinite(gnorm):
                    if scaler.is_enabled() and recipe.train.skip_nonfinite:
                        state.nonfinite_skipped += 1
                    elif not scaler.is_enabled():
                        raise TrainingError(
                            f"gradient norm is {gnorm.item()} at step {state.step} (lr {lr:.3g}); the last good checkpoint "
                            f"is {ckpt_path}. Lower optim.lr or set optim.clip_grad"
                        )
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                state.step += 1
                logs = {"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": float(gnorm)}
                for cb in callbacks:
                    cb.on_step(state.step, logs)
                last_epoch_step = micro >= micro_per_epoch
                if state.step % recipe.logging.log_every == 0 and not last_epoch_step:
                    now = time.time()
                    rec = {"step": state.step, "epoch": epoch + micro / micro_per_epoch, "time": now,
                           "train/loss": run_loss / max(run_n, 1), "train/lr": lr, "train/grad_norm": float(gnorm),
                           "train/images_per_s": img_log / max(now - t_log, 1e-9)}
                    t_log, img_log = now, 0
                    for cb in callbacks:
                        cb.on_log(rec)
                if fault_hook is not None:
                    fault_hook("step", state.step, state)
                every = recipe.train.checkpoint_every
                if every and state.step % every == 0 and not last_epoch_step:
                    save("last")
                if broadcast_flag(stop.signum is not None, dist):
                    save("last")
                    signum = stop.signum or signal.SIGTERM
                    raise Interrupted(
                        f"interrupted at step {state.step}; checkpoint saved. Resume with: ufgir train --resume {run_dir}",
                        int(signum))

            # End of epoch: evaluate when due, checkpoint.
            state.epoch += 1
            state.consumed = 0
            now = time.time()
            record = {"step": state.step, "epoch": float(state.epoch), "time": now,
                      "train/loss": run_loss / max(run_n, 1), "train/lr": lr,
                      "train/images_per_s": img_log / max(now - t_log, 1e-9)}
            every = recipe.eval.every
            if state.epoch == recipe.train.epochs or (every and state.epoch % every == 0):
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
                    save("best", {"val/top1": state.best_top1, "epoch": state.epoch})
                elif split != "val":
                    state.best_top1 = eval_result.metrics["top1"]  # the paper protocol reports the final epoch
            state.history.append({k: v for k, v in record.items() if k != "time"})
            save("last", {k: v for k, v in record.items() if "/" in k})
            last_record = record
            for cb in callbacks:
                cb.on_log(record)
                cb.on_epoch_end(state.epoch, record)

    barrier(dist)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _cpu_peak_mb()
    from ..analysis.cost import count_flops

    macs = count_flops(model, recipe.model.image_size) // 2
    summary = {
        "run_dir": str(run_dir), "split": recipe.eval.split,
        "final_top1": eval_result.metrics["top1"] if eval_result else None,
        "best_top1": state.best_top1, "time_s": time.time() - t_start, "peak_memory_mb": peak,
        "params_trainable": n_train, "params_total": n_params, "macs": macs, "steps": state.step,
        "nonfinite_skipped": state.nonfinite_skipped, "last": last_record, "device": device, "precision": precision,
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


__all__ = ["Interrupted", "TrainState", "default_run_name", "fit", "make_loader", "read_splits"]
