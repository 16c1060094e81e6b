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


def autocast(device: str, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import RecipeError

        raise RecipeError(f"train.device {device!r} asked for CUDA but no GPU is visible; use cpu or auto")
    return device
