"""ufgir: parameter-efficient ultra-fine-grained image recognition with ViTs and ILA.

The package root stays import-light (no torch) so that ``ufgir --help`` is instant; the Python API
entry points below import their heavy dependencies on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .recipe import Recipe


def load_run(path: str, checkpoint: str = "auto", device: str = "cpu") -> tuple[Any, Recipe]:
    """Model and recipe from a run folder, a checkpoint file, a safetensors export (full or adapter-only)
    or a model pushed to the Hugging Face Hub, ``hf://OWNER/NAME[@REVISION]``."""
    from .model.checkpoint import load_run as _load_run

    return _load_run(path, checkpoint=checkpoint, device=device)


__all__ = ["__version__", "load_run"]
