"""Pretrain the small backbone that the CPU demo adapts (`ufgir pretrain-backbone`, `make backbone`).

PETL needs a pretrained backbone, and none of timm's can be fetched offline. So we pretrain our
own micro ViT, once, on synthetic leaves: full AdamW training to predict which of 16 lattice cells
carry a mark (uniformly random layouts, all mark colours). The demo's classes are fixed layouts
that this task never names, so the demo measures transfer, as a real PETL run does.
The weights ship as package data (safetensors, a few MB) and load through timm's pretrained path.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from ..data.synthetic import CELLS, pretraining_batch
from ..io import atomic_save
from ..model.precision import autocast, resolve_precision
from ..model.vit import MICRO


def _to_input(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)  # (N, 3, H, W)
    return (t - 0.5) / 0.5


def pretrain_backbone(
    out_dir: Path,
    *,
    images: int = 24_000,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Train, evaluate on held-out renders, and write ``<MICRO>.synthetic.safetensors`` (+ .sha256)."""
    from safetensors.torch import save

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    xs, ys = pretraining_batch(images, rng)
    xv, yv = pretraining_batch(2_000, np.random.default_rng(seed + 1))
    log(f"rendered {images} + 2000 images in {time.time() - t0:.0f}s")
    model = timm.create_model(MICRO, num_classes=CELLS, drop_path_rate=0.05)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps = epochs * (images // batch_size)
    warm = min(500, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    precision = resolve_precision("auto", "cpu")
    xv_t, yv_t = _to_input(xv), torch.from_numpy(yv)
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(images))
        for i in range(0, images - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            x, y = _to_input(xs[idx.numpy()]), torch.from_numpy(ys[idx.numpy()])
            with autocast("cpu", precision):
                loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                log(f"  step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        model.eval()
        with torch.no_grad(), autocast("cpu", precision):
            pred = torch.cat([model(xv_t[j : j + 500]).float() for j in range(0, len(xv_t), 500)]) > 0
        acc = (pred == yv_t.bool()).float().mean().item()
        exact = (pred == yv_t.bool()).all(1).float().mean().item()
        log(f"epoch {epoch + 1}/{epochs} step {step} loss {loss.item():.4f} held-out cell acc {acc:.4f} "
            f"exact layout {exact:.3f} ({time.time() - t0:.0f}s)")
    model.reset_classifier(0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata={"backbone": MICRO, "task": "synthetic-leaf mark attributes",
                                 "held_out_cell_acc": f"{acc:.4f}", "held_out_exact": f"{exact:.4f}"})
    out = Path(out_dir) / f"{MICRO}.synthetic.safetensors"
    atomic_save(out, lambda f: f.write(blob))
    digest = hashlib.sha256(blob).hexdigest()
    atomic_save(out.with_suffix(".sha256"), lambda f: f.write(f"{digest}  {out.name}\n".encode()))
    log(f"wrote {out} ({len(blob) / 2**20:.1f} MiB, sha256 {digest[:16]}...)")
    return out
