"""Where and how this process computes: one small object instead of (device, dist, precision)
threaded through every signature. A new runtime knob is one field here."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..model.precision import autocast, frozen_weights_cast, resolve_device, resolve_precision
from ..recipe import Recipe
from .dist import DistContext, init_distributed


@dataclass(frozen=True)
class Runtime:
    device: str = "cpu"
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16
    dist: DistContext = field(default_factory=DistContext)

    @classmethod
    def for_training(cls, recipe: Recipe) -> Runtime:
        """The recipe's device and precision; under torchrun each rank joins the job and takes its local GPU."""
        device = resolve_device(recipe.train.device)
        dist = init_distributed(device)
        if device == "cuda" and dist.world > 1:
            device = f"cuda:{dist.local_rank}"
        return cls(device, resolve_precision(recipe.train.precision, device), dist)

    @classmethod
    def single(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        """One process (evaluation, analysis): ``auto`` resolves as training does."""
        device = resolve_device(device)
        return cls(device, resolve_precision(precision, device))

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def autocast(self):
        """Autocast to the runtime's precision (a no-op for fp32)."""
        return autocast(self.device, self.precision)

    def weights_cast(self, model: nn.Module):
        """Frozen weights held in the autocast dtype while the block runs (`precision.frozen_weights_cast`)."""
        return frozen_weights_cast(model, self.precision)


__all__ = ["Runtime"]
