"""What every export shares: the result record and the parity check against eager PyTorch.

Every export is run once more after it is written, from the file on disk, on a fixed seeded batch,
and compared with eager PyTorch: an artifact that does not reproduce the model is an
:class:`ExportError`, never a silent success. The file is written beside its target and renamed
into place only after that check, so a failed export leaves no file and keeps an earlier good one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from ..io import atomic_save
from ..model.vit import UfgirViT

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how closely the written file reproduces eager PyTorch."""

    path: Path
    format: str
    max_abs_diff: float
    tolerance: float
    size_bytes: int
    seconds: float
    sidecar: Path | None = None
    card: Path | None = None
    opset: int | None = None


def parity_batch(batch: int, image_size: int) -> torch.Tensor:
    """The fixed input every parity check uses: seeded, shaped like normalised images."""
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def model_image_size(model: UfgirViT) -> int:
    return int(model.vit.patch_embed.img_size[0])


@torch.no_grad()
def eager_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model.eval()(x.to(device)).float().cpu()


def check_parity(exported: torch.Tensor, eager: torch.Tensor, tolerance: float, what: str) -> float:
    """The max |exported - eager|, or an ExportError naming ``what`` when it exceeds ``tolerance``."""
    if tuple(exported.shape) != tuple(eager.shape):
        raise ExportError(f"{what} returns shape {tuple(exported.shape)}, eager PyTorch {tuple(eager.shape)}")
    diff = float((exported.float() - eager).abs().max()) if eager.numel() else 0.0
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"{what} differs from eager PyTorch by max |diff| {diff:.3g} > tolerance {tolerance:g}; "
            "the export is not faithful (report it with the model's recipe), or raise --tolerance knowingly"
        )
    return diff


def write_checked(out: Path, data: bytes | memoryview, run: Callable[[Path], torch.Tensor], model: nn.Module,
                  x: torch.Tensor, tolerance: float, what: str) -> float:
    """Write ``data`` beside ``out``, run the written file on ``x`` with ``run`` and compare with
    eager PyTorch; the file becomes ``out`` only when that check passes, so a failed export leaves
    no file at ``out`` and an earlier good export there survives. Returns the max |diff|."""
    tmp = out.with_name(f".{out.stem}.unverified{out.suffix}")
    try:
        atomic_save(tmp, lambda f: f.write(data))
        diff = check_parity(run(tmp), eager_logits(model, x), tolerance, what)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff
