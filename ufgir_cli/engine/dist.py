"""torch.distributed through torchrun: nothing home-made beyond reading torchrun's environment.

``torchrun --nproc-per-node N -m ufgir_cli train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; we pick NCCL
on GPUs and gloo on CPU, with a timeout so that a dead rank makes the others fail instead of hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, timeout_s: float | None = None) -> DistContext:
    """Join the torchrun job when launched by torchrun; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("UFGIR_DIST_TIMEOUT", "600")))
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return DistContext(rank, world, local)


def all_gather_cat(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate a tensor of varying first dimension from every rank (unpadded shards)."""
    if ctx.world <= 1:
        return t
    dev = torch.device("cuda", ctx.local_rank) if tdist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
    tdist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    out = [torch.zeros_like(padded) for _ in range(ctx.world)]
    tdist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes, strict=True)]).cpu()


def all_gather_object(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if ctx.world <= 1:
        return [obj]
    out: list = [None] * ctx.world
    tdist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        tdist.barrier()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when any rank says True (e.g. a stop signal seen by one process)."""
    if ctx.world <= 1:
        return flag
    dev = torch.device("cuda", ctx.local_rank) if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], device=dev)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def cleanup(ctx: DistContext) -> None:
    if ctx.world > 1 and tdist.is_initialized():
        tdist.destroy_process_group()
