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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed weights and non-decayed ones (biases, norms,
    tokens, position embeddings, and whatever ``model.no_weight_decay()`` names)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, total_steps: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for global iteration ``step`` (0-based) of ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + step * (base_lr - cfg.warmup_lr) / cfg.warmup_steps
    if cfg.name == "constant":
        return base_lr
    t = min(step, total_steps) / max(1, total_steps)
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
