"""What the tests against a reference implementation's checkpoint share: loading it with the notices the
import gave, and the largest difference between two tensors."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ufgir_cli.errors import RecipeNotice
from ufgir_cli.model import load_upstream_checkpoint


def load_with_notices(path: Path) -> tuple[torch.nn.Module, object, list[str]]:
    """Model and recipe of a reference checkpoint, and every notice the import gave (each once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, recipe = load_upstream_checkpoint(path)
    return model, recipe, [str(w.message) for w in caught if issubclass(w.category, RecipeNotice)]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
