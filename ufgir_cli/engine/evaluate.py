"""Evaluation: top-1/top-5, per-class accuracy and per-image predictions, sharded across ranks.

Each rank evaluates an unpadded shard; per-image results are gathered and the metrics computed once
on the union, so a distributed evaluation reports exactly the single-process numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import normalize
from .dist import all_gather_cat
from .runtime import Runtime


def compiled_for_inference(model: nn.Module) -> nn.Module:
    """``torch.compile`` for evaluation only, with the weights frozen into the graph as constants
    (inductor ``freezing``), which lets it pre-pack them for the CPU's matrix units. Compiling takes
    tens of seconds (ViT-B/16, 2 CPU cores: about 30 s), so it pays off over thousands of images."""
    return torch.compile(model, options={"freezing": True})


@dataclass
class EvalResult:
    metrics: dict
    indices: torch.Tensor  # dataset indices, in the order evaluated
    targets: torch.Tensor
    preds: torch.Tensor
    probs: torch.Tensor  # probability of the predicted class


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime, *, num_classes: int, on_batch=None,
             data_config: dict | None = None) -> EvalResult:
    """Every batch of ``loader`` through ``model`` (eval mode), normalised by its ``data_config()``
    (pass ``data_config`` when ``model`` is a compiled wrapper); under torchrun the ranks' shards are
    gathered, in dataset order, on every rank."""
    model.eval()
    data_cfg = data_config or model.data_config()
    idx_l, tgt_l, logit_l = [], [], []
    with runtime.weights_cast(model):
        for x, y, i in loader:
            x = normalize(x.to(runtime.device, non_blocking=True), data_cfg)
            with runtime.autocast():
                logits = model(x)
            logit_l.append(logits.float().cpu())
            tgt_l.append(y)
            idx_l.append(i)
            if on_batch is not None:
                on_batch(len(y))
    logits = torch.cat(logit_l) if logit_l else torch.zeros(0, num_classes)
    targets = torch.cat(tgt_l) if tgt_l else torch.zeros(0, dtype=torch.long)
    indices = torch.cat(idx_l) if idx_l else torch.zeros(0, dtype=torch.long)
    if runtime.dist.world > 1:
        logits, targets, indices = (all_gather_cat(t, runtime.dist) for t in (logits, targets, indices))
        order = torch.argsort(indices)  # canonical order: the union is the whole split
        logits, targets, indices = logits[order], targets[order], indices[order]
    return EvalResult(classification_metrics(logits, targets, num_classes), indices, targets,
                      logits.argmax(1), logits.softmax(1).max(1).values)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """Percent top-1/top-5, per-class mean/std (over classes present), mean loss, counts."""
    n = len(targets)
    if n == 0:
        return {"top1": 0.0, "top5": 0.0, "per_class_mean": 0.0, "per_class_std": 0.0, "loss": float("nan"),
                "num_images": 0, "num_classes": num_classes, "per_class": []}
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    correct1 = topk[:, 0] == targets
    correct5 = (topk == targets[:, None]).any(1)
    per_class = []
    for c in range(num_classes):
        m = targets == c
        per_class.append(float(correct1[m].float().mean() * 100) if m.any() else float("nan"))
    present = torch.tensor([a for a in per_class if a == a], dtype=torch.float64)
    return {
        "top1": float(correct1.float().mean() * 100),
        "top5": float(correct5.float().mean() * 100),
        "per_class_mean": float(present.mean()) if len(present) else 0.0,
        "per_class_std": float(present.std(unbiased=False)) if len(present) else 0.0,
        "loss": float(F.cross_entropy(logits, targets)),
        "num_images": n,
        "num_classes": num_classes,
        "per_class": per_class,
    }
