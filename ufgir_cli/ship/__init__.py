"""Shipping a model: exports with a parity check, predictions, reference imports.

One module per job: ``safetensors`` (the full model or the PETL delta), ``graph`` (ONNX and
torch.export pt2), ``card`` (MODEL_CARD.md and a Hub repo's README.md), ``predict`` (``ufgir
predict``), ``upstream`` (``ufgir import-upstream``), ``hub`` (``ufgir push``), ``app`` (``ufgir
serve``, Gradio, imported on use); ``parity`` holds the check every export runs. Reading a
safetensors export or a pushed repo back is the model layer's (:mod:`ufgir_cli.model.delta`,
:mod:`ufgir_cli.model.hub`), since ``load_run`` needs it.
This package sits above ``engine`` and below ``cli``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import ExportError, RecipeError
from ..io import atomic_write_text
from ..model.checkpoint import load_model
from ..model.delta import load_delta
from ..paths import RunDir
from .card import human_bytes, model_card
from .graph import DEFAULT_OPSET, at_image_size, export_onnx, export_pt2, load_pt2
from .parity import DEFAULT_TOLERANCE, ExportResult, parity_batch
from .predict import Prediction, Predictor, class_names, collect_images, load_predictor, predict_images
from .safetensors import export_safetensors
from .upstream import import_upstream

FORMATS: tuple[str, ...] = ("safetensors", "onnx", "pt2")


def default_export_path(source: Path, fmt: str, adapter_only: bool) -> Path:
    """``<run>/export/model.<fmt>``, or ``adapter.safetensors`` for the PETL delta."""
    return RunDir.of(source).export("adapter.safetensors" if adapter_only else f"model.{fmt}")


def export_model(source: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
                 checkpoint: str = "auto", adapter_only: bool = False, opset: int = DEFAULT_OPSET,
                 dynamic_batch: bool = True, image_size: int | None = None,
                 tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Load a run, checkpoint or safetensors export; write ``fmt``; check it; write MODEL_CARD.md."""
    source = Path(source)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if adapter_only and fmt != "safetensors":
        raise ExportError("--adapter-only applies to --format safetensors (ONNX and pt2 hold the whole graph)")
    if image_size is not None and fmt == "safetensors":
        raise ExportError("--image-size applies to onnx and pt2; safetensors keeps the trained resolution")
    out = Path(out) if out is not None else default_export_path(source, fmt, adapter_only)
    if out.resolve() == source.resolve():
        raise ExportError(f"--out {out} is the source itself; choose another file")
    loaded = load_model(source, checkpoint)
    model, recipe, sha = loaded.model, loaded.recipe, loaded.backbone_sha256
    if fmt == "safetensors":
        result = export_safetensors(model, recipe, out, adapter_only, backbone_sha256=sha, tolerance=tolerance)
    else:
        try:
            model, recipe = at_image_size(model, recipe, image_size)
        except RecipeError as e:
            raise ExportError(f"--image-size {image_size}: {e}") from None
        if fmt == "onnx":
            result = export_onnx(model, recipe, out, opset=opset, dynamic_batch=dynamic_batch, tolerance=tolerance)
        else:
            result = export_pt2(model, recipe, out, dynamic_batch=dynamic_batch, tolerance=tolerance)
    card = out.parent / "MODEL_CARD.md"
    atomic_write_text(card, model_card(model, recipe, result, RunDir.of(source), sha))
    return dataclasses.replace(result, card=card)


__all__ = [
    "FORMATS", "ExportResult", "Prediction", "Predictor", "at_image_size", "class_names", "collect_images",
    "export_model", "export_onnx", "export_pt2", "export_safetensors", "human_bytes", "import_upstream",
    "load_delta", "load_predictor", "load_pt2", "parity_batch", "predict_images",
]
