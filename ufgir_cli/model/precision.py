"""Precision: which autocast to use where, decided once per run."""

from __future__ import annotations

import contextlib

import torch


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 math (AVX-512 BF16 / AMX), where bf16 autocast is 2-4x faster."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return False
    return cap in ("AVX512_BF16", "AMX") or "AMX" in cap or _cpuinfo_has("avx512_bf16") or _cpuinfo_has("amx_bf16")


def _cpuinfo_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return any(flag in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 on CUDA with bf16 support or a bf16-capable CPU, else fp32 (fp16 must be asked)."""
    if precision != "auto":
        if precision == "fp16" and not device.startswith("cuda"):
            return "bf16" if cpu_supports_bf16() else "fp32"
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


class FrozenCast:
    """What `frozen_weights_cast` holds: ``count`` tensors cast, and ``originals()``, a context in
    which they are float32 again (a checkpoint written during the run must keep the real weights)."""

    def __init__(self, swapped: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]):
        self._swapped = swapped
        self.count = len(swapped)

    def _use(self, original: bool) -> None:
        for p, fp32, cast in self._swapped:
            p.data = fp32 if original else cast

    @contextlib.contextmanager
    def originals(self):
        self._use(True)
        try:
            yield
        finally:
            self._use(False)


@contextlib.contextmanager
def frozen_weights_cast(model: torch.nn.Module, precision: str):
    """Hold the frozen Linear and Conv weights in the autocast dtype while the block runs.

    Why: autocast caches its casts only for leaf tensors that require grad, so a frozen backbone's
    weights are cast again on every forward (about 10 % of a bf16 ViT-B/16 step on a CPU). A cast
    done once gives bit-identical inputs to every matmul. The float32 tensors come back on exit and
    inside `FrozenCast.originals`, so checkpoints, hashes and float32 analyses see the real weights."""
    swapped = []
    if precision != "fp32":
        dtype = autocast_dtype(precision)
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                swapped += [(p, p.data, p.data.to(dtype)) for p in mod.parameters(recurse=False)
                            if not p.requires_grad and p.dtype == torch.float32]
    cast = FrozenCast(swapped)
    cast._use(False)
    try:
        yield cast
    finally:
        cast._use(True)


def autocast(device: str, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=autocast_dtype(precision))


def float32_region(x: torch.Tensor):
    """Autocast off for the block, on ``x``'s device: for math that must run in float32 whatever the
    run's precision (covariance square roots, similarity top-k, boxes: fp16 ties move a selection)."""
    return torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False)


def autocast_dtype(precision: str) -> torch.dtype:
    """The reduced dtype of a resolved ``bf16`` or ``fp16`` precision."""
    return torch.bfloat16 if precision == "bf16" else torch.float16


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import RecipeError

        raise RecipeError(f"train.device {device!r} asked for CUDA but no GPU is visible; use cpu or auto")
    return device
