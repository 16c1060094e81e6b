"""Shipping a model: exports with a parity check, predictions, reference imports.

One module per job: ``safetensors`` (the full model or the PETL delta), ``graph`` (ONNX and
torch.export pt2), ``merge`` (``--merge``: the method's updates folded into the backbone), ``peft``
(peft adapter folders out and in: ``--format peft``, ``ufgir import-peft``), ``card`` (MODEL_CARD.md
and a Hub repo's README.md), ``predict`` (``ufgir predict``), ``upstream`` (``ufgir import-upstream``),
``runs`` (an imported model's run folder), ``hub`` (``ufgir push``), ``app`` (``ufgir serve``, Gradio,
imported on use); ``parity`` holds the check every export runs. Reading a
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
from ..paths import EXPORT_FORMATS, RunDir
from .card import human_bytes, model_card
from .graph import DEFAULT_OPSET, at_image_size, export_onnx, export_pt2, load_pt2
from .merge import MERGE_TOLERANCE, merged_model
from .parity import DEFAULT_TOLERANCE, ExportResult, parity_batch
from .peft import PEFT_TOLERANCE, export_peft, import_peft
from .predict import Prediction, Predictor, class_names, collect_images, load_predictor, predict_images
from .safetensors import export_safetensors
from .upstream import import_upstream


def export_model(source: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
                 checkpoint: str = "auto", adapter_only: bool = False, opset: int = DEFAULT_OPSET,
                 dynamic_batch: bool = True, image_size: int | None = None,
                 tolerance: float | None = None, merge: bool = False) -> ExportResult:
    """Load a run, checkpoint or safetensors export; write ``fmt`` (``merge``: the method's updates folded
    into the backbone, checked against the unmerged model first); check it; write MODEL_CARD.md (a peft
    folder carries its own README.md instead). ``tolerance``: the format's default when None."""
    source = Path(source)
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if adapter_only and fmt != "safetensors":
        raise ExportError("--adapter-only applies to --format safetensors (ONNX, pt2 and peft hold more)")
    if image_size is not None and fmt in ("safetensors", "peft"):
        raise ExportError(f"--image-size applies to onnx and pt2; {fmt} keeps the trained resolution")
    if merge and fmt == "peft":
        raise ExportError("--merge folds the adapter into the backbone, and --format peft keeps it apart; choose one")
    out = Path(out) if out is not None else RunDir.of(source).export_default(fmt, adapter_only, merge)
    if out.resolve() == source.resolve():
        raise ExportError(f"--out {out} is the source itself; choose another file")
    tolerance = tolerance if tolerance is not None else PEFT_TOLERANCE if fmt == "peft" else DEFAULT_TOLERANCE
    loaded = load_model(source, checkpoint)
    model, recipe, sha = loaded.model, loaded.recipe, loaded.backbone_sha256
    merged = merged_model(model)[0] if merge else None
    if fmt == "peft":
        return export_peft(model, recipe, out, tolerance=tolerance)
    if fmt == "safetensors":
        result = export_safetensors(model, recipe, out, adapter_only, backbone_sha256=sha, tolerance=tolerance,
                                    merged=merged)
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
    "MERGE_TOLERANCE", "PEFT_TOLERANCE", "ExportResult", "Prediction", "Predictor", "at_image_size",
    "class_names", "collect_images", "export_model", "export_onnx", "export_peft", "export_pt2", "export_safetensors",
    "human_bytes", "import_peft", "import_upstream", "load_delta", "load_predictor", "load_pt2", "merged_model",
    "parity_batch", "predict_images",
]
