"""Optimiser and learning-rate schedule.

The schedule is a pure function of the global step, so resume needs only the step count. It equals
timm's ``CosineLRScheduler(t_initial=total, warmup_t=w, warmup_lr_init=lr0, lr_min=min_lr,
warmup_prefix=False, t_in_epochs=False)`` updated per iteration, the reference's setting: the warmup
steps count inside the cosine (the cosine is evaluated at the global step, not step - warmup).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..recipe import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Trainable parameters in two groups: decayed weights and non-decayed ones (biases, norms,
    tokens, position embeddings, and whatever ``model.no_weight_decay()`` names). With
    ``layer_decay``, each group splits by layer (``model.param_layers()``: 0 = the embedding, i + 1 =
    block i, depth + 1 = the head) and a group's ``lr_scale`` is ``layer_decay ** (depth + 1 - layer)``:
    the head learns at the full rate, every block below at ``layer_decay`` times the one above."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decayed = layer_decay is not None and layer_decay != 1.0 and hasattr(model, "param_layers")
    layers = model.param_layers() if decayed else {}
    top = max(layers.values(), default=0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip
        layer = layers.get(name, 0)
        group = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay})
        if decayed:
            group["lr_scale"] = layer_decay ** (top - layer)
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def warmup_steps(cfg: ScheduleConfig, steps_per_epoch: int | None = None) -> int:
    """The warmup's length in steps: ``schedule.warmup_epochs`` epochs where set, else ``warmup_steps``."""
    if cfg.warmup_epochs is None:
        return cfg.warmup_steps
    if steps_per_epoch is None:
        raise ValueError("schedule.warmup_epochs needs the steps per epoch")
    return cfg.warmup_epochs * steps_per_epoch


def lr_at(step: int, total_steps: int, base_lr: float, cfg: ScheduleConfig, steps_per_epoch: int | None = None) -> float:
    """Learning rate for global iteration ``step`` (0-based) of ``total_steps``: the warmup (counted inside the
    cosine), the cosine down to ``min_lr`` over the steps before the last ``cooldown_epochs`` epochs, then
    ``min_lr`` (timm's ``cooldown_epochs``). ``steps_per_epoch`` turns the epoch keys into steps."""
    warm = warmup_steps(cfg, steps_per_epoch)
    if step < warm:
        return cfg.warmup_lr + step * (base_lr - cfg.warmup_lr) / warm
    if cfg.name == "constant":
        return base_lr
    if cfg.cooldown_epochs and steps_per_epoch is None:
        raise ValueError("schedule.cooldown_epochs needs the steps per epoch")
    span = max(1, total_steps - cfg.cooldown_epochs * (steps_per_epoch or 0))
    t = min(step, span) / span
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr``, times its ``lr_scale`` (layer-wise decay) where it has one."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
