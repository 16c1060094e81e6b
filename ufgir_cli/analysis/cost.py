"""What a model costs: parameters, multiply-adds, FLOPs, and (measured) throughput.

Multiply-adds are counted with ``torch.utils.flop_counter`` on a *meta-device* copy of the model run
through the explicit attention path: on CPU the counter does not see the fused attention kernel
(it reads 16.85 G instead of 17.56 G for ViT-B/16), and on the meta device nothing is computed, so a
ViT-L at 448 px costs a fraction of a second to count. MACs = FLOPs / 2; both are reported, named
correctly (the paper's "FLOPs" are multiply-adds).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ParamCount:
    total: int
    trainable: int


def count_params(model: nn.Module) -> ParamCount:
    return ParamCount(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def meta_copy(model: nn.Module) -> nn.Module:
    """Deep-copy the module tree with every tensor replaced by a meta tensor (no storage copied)."""
    memo: dict[int, object] = {}
    for t in model.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
    for t in model.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(model, memo)


def count_flops(model: nn.Module, image_size: int, batch: int = 1, executed: bool = False,
                mode: str | None = None) -> int:
    """Forward FLOPs for ``batch`` images, counted on a meta-device copy.

    By default the whole network, every block on every token (the number papers report).
    ``executed=True`` counts what ``model(x)`` runs, the denominator of an honest FLOPs utilisation:
    `UfgirViT.forward` computes the last block for the CLS token alone where that is exact.
    ``mode``: one of the method's ``eval_modes``, counted instead of the recipe's."""
    meta = meta_copy(model).eval()
    x = torch.empty(batch, 3, image_size, image_size, device="meta")
    if hasattr(meta, "last_block_cls_only"):  # UfgirViT: every token through the last block unless executed
        meta.last_block_cls_only = executed
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x, eval_mode=mode) if mode else meta(x)
    return int(counter.get_total_flops())


@dataclass
class Throughput:
    images_per_s: float
    latency_ms: float
    peak_memory_mb: float | None
    batch_size: int
    device: str
    precision: str


def peak_memory_mb(device: str) -> float | None:
    """Peak CUDA allocation since the last reset, or the process's peak resident size on a CPU (None
    where unknown). The one place peak memory is read (training summary, inference, benchmarks)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


def median_seconds(fn, device: str, warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of ``fn()`` over ``iters`` runs after ``warmup`` untimed ones, synchronising
    CUDA around each (the one timing loop of inference measurement and the benchmarks)."""
    cuda = device.startswith("cuda")
    times = []
    for i in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def measure_inference(model: nn.Module, image_size: int, batch_size: int, device: str = "cpu",
                      precision: str = "fp32", warmup: int = 2, iters: int = 5) -> Throughput:
    """Median-of-runs inference speed on random input (eval mode)."""
    from ..model.precision import autocast, frozen_weights_cast

    model = model.eval().to(device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def batch() -> None:
        with autocast(device, precision):
            model(x)

    with frozen_weights_cast(model, precision):
        t = median_seconds(batch, device, warmup, iters)
    peak = peak_memory_mb(device) if cuda else None  # a CPU's peak RSS is the process's, not this model's
    return Throughput(batch_size / t, 1000 * t, peak, batch_size, device, precision)


def cost_summary(model: nn.Module, image_size: int) -> dict:
    """Parameters and per-image MACs/FLOPs as plain numbers (what `inspect` and `metrics` print)."""
    flops = count_flops(model, image_size)
    pc = count_params(model)
    out = {"params_total": pc.total, "params_trainable": pc.trainable, "flops": flops, "macs": flops // 2}
    method = getattr(model, "method", None)
    # A training step's forward runs other passes than evaluation (CAL: 3, not 8; GLSim: 2 and 2).
    out["train_macs"] = out["macs"] // method.passes() * method.train_passes if method is not None else out["macs"]
    if method is not None and method.eval_modes:  # CAL: what each mode costs; the recipe's own is counted above
        out["macs_by_eval_mode"] = {
            name: (flops if name == method.eval_mode else count_flops(model, image_size, mode=name)) // 2
            for name in method.eval_modes}
    return out


__all__ = ["ParamCount", "Throughput", "cost_summary", "count_flops", "count_params", "measure_inference",
           "median_seconds", "meta_copy", "peak_memory_mb"]
