"""Graph exports: ONNX (torch.export-based exporter, checked with onnxruntime) and ``torch.export``
pt2 (reloaded and checked), each with a ``<file>.json`` sidecar holding the resolved recipe, since
preprocessing and class names need it; and ``load_pt2``, which refuses pickled payloads.
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ExportError
from ..io import atomic_write_json
from ..model.delta import FORMAT_VERSION
from ..model.vit import UfgirViT
from ..recipe import Recipe
from .parity import DEFAULT_TOLERANCE, ExportResult, model_image_size, parity_batch, write_checked

SIDECAR_FORMAT = "ufgir-export"
DEFAULT_OPSET = 18
MIN_OPSET = 17
_EXPORT_EXTRA_HINT = "pip install 'ufgir[export]'"


def require(modules: Iterable[str], what: str) -> None:
    """An ExportError naming the ``export`` extra when an optional package is not installed."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ExportError(f"{what} needs the optional package {name}: {_EXPORT_EXTRA_HINT}") from None


def sidecar_path(artifact: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the recipe and preprocessing an ONNX/pt2 file needs."""
    return artifact.with_name(artifact.name + ".json")


class _Logits(nn.Module):
    """``forward(image) -> logits`` only: the exported graph gets one named input and one output,
    and the attention-maps path (a Python-list side channel) stays out of it. It holds the method's
    export model (LoRA and SSF merged into the weights: the plain ViT's graph); the parity check
    compares the file with the model as trained."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def at_image_size(model: UfgirViT, recipe: Recipe, image_size: int | None) -> tuple[UfgirViT, Recipe]:
    """The model and recipe at another input resolution (a resized copy; the original is untouched).

    Position embeddings are resampled the way the recipe says (``model.pos_embed_resize``); an ILA
    layout that cannot down-sample the new grid is a RecipeError (`UfgirViT.set_input_size`).
    """
    if image_size is None or image_size == model_image_size(model):
        return model, recipe
    resized = copy.deepcopy(model)
    resized.set_input_size(image_size)
    return resized, recipe.model_copy(update={"model": resized.cfg})


def _export_inputs(model: UfgirViT, image_size: int, dynamic_batch: bool) -> tuple[torch.Tensor, dict | None, torch.Tensor]:
    """(trace input, dynamic_shapes, check input). A dynamic export is traced at batch 2 and
    checked at batch 3, so the parity check also proves the batch axis really is dynamic; a
    static export is batch 1, the shape a static deployment feeds."""
    device = next(model.parameters()).device
    if not dynamic_batch:
        x = parity_batch(1, image_size).to(device)
        return x, None, x
    shapes = {"image": {0: torch.export.Dim("batch", min=1)}}
    return parity_batch(2, image_size).to(device), shapes, parity_batch(3, image_size)


def _write_sidecar(artifact: Path, recipe: Recipe, model: UfgirViT, *, fmt: str, dynamic_batch: bool,
                   diff: float, opset: int | None = None) -> Path:
    """``<artifact>.json``: what running the graph needs besides it (input/output names, batch
    size, preprocessing, class count, the resolved recipe) and the parity it reached."""
    data_cfg = model.data_config()
    mean, std = data_cfg["mean"], data_cfg["std"]
    side = sidecar_path(artifact)
    atomic_write_json(side, {
        "format": SIDECAR_FORMAT,
        "format_version": FORMAT_VERSION,
        "artifact": artifact.name,
        "artifact_format": fmt,
        "input": "image",
        "output": "logits",
        "batch_size": None if dynamic_batch else 1,
        "image_size": recipe.model.image_size,
        "num_classes": model.num_classes,
        "mean": list(mean),
        "std": list(std),
        "opset": opset,
        "max_abs_diff": diff,
        "recipe": recipe.model_dump(mode="json"),
    })
    return side


def read_sidecar(artifact: Path) -> dict[str, Any]:
    """The sidecar of an ONNX/pt2 export, checked to be one ufgir wrote."""
    side = sidecar_path(artifact)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{artifact} has no {side.name} beside it (recipe and preprocessing); "
                              "keep it with the export, or re-export with `ufgir export`") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{side} is not valid JSON ({e}); re-export with `ufgir export`") from None
    if meta.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{side} is not a ufgir export sidecar; re-export with `ufgir export`")
    return meta


def _traceable(model: UfgirViT, fmt: str) -> None:
    """Refuse, in one line, a model no traced graph can hold: GLSim, RAMS and CAL crop a box that a first
    pass computes (its size depends on the image) and resize it image by image."""
    if not model.method.traceable:
        raise ExportError(f"--format {fmt}: {model.method.name} crops a box chosen by its first pass (a size that "
                          "depends on the image), which a traced graph cannot hold; export --format safetensors "
                          "and run it with PyTorch (ufgir predict reads it)")


def export_onnx(model: UfgirViT, recipe: Recipe, out: str | os.PathLike, *, image_size: int | None = None,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """ONNX via the torch.export-based exporter (``dynamo=True``), checked with onnxruntime."""
    _traceable(model, "onnx")
    require(("onnx", "onnxscript", "onnxruntime"), "ONNX export")
    import onnxruntime as ort

    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is too old: the exporter needs opset >= {MIN_OPSET}")
    out = Path(out)
    t0 = time.perf_counter()
    model, recipe = at_image_size(model, recipe, image_size)
    S = model_image_size(model)
    x, shapes, check = _export_inputs(model, S, dynamic_batch)
    try:
        program = torch.onnx.export(_Logits(model.method.export_model(model)).eval(), (x,), dynamo=True, opset_version=opset,
                                    output_names=["logits"], dynamic_shapes=shapes, verbose=False)
        proto = program.model_proto
        data = proto.SerializeToString()
    except ValueError as e:
        if "2GB" in str(e) or "2 GB" in str(e):
            raise ExportError("the model exceeds ONNX's 2 GB protobuf limit; export --format pt2 or safetensors") from None
        raise
    written_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)

    def run(f: Path) -> torch.Tensor:
        session = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"image": check.numpy()})[0])

    diff = write_checked(out, data, run, model, check, tolerance, f"ONNX export {out} (onnxruntime)")
    side = _write_sidecar(out, recipe, model, fmt="onnx", dynamic_batch=dynamic_batch, diff=diff, opset=written_opset)
    return ExportResult(out, "onnx", diff, tolerance, out.stat().st_size, time.perf_counter() - t0, side,
                        opset=written_opset)


def export_pt2(model: UfgirViT, recipe: Recipe, out: str | os.PathLike, *, image_size: int | None = None,
               dynamic_batch: bool = True, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """A ``torch.export`` ExportedProgram (TorchScript's successor), reloaded and checked."""
    _traceable(model, "pt2")
    out = Path(out)
    t0 = time.perf_counter()
    model, recipe = at_image_size(model, recipe, image_size)
    S = model_image_size(model)
    x, shapes, check = _export_inputs(model, S, dynamic_batch)
    with torch.no_grad():
        program = torch.export.export(_Logits(model.method.export_model(model)).eval(), (x,), dynamic_shapes=shapes)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    data = buf.getbuffer()

    @torch.no_grad()
    def run(f: Path) -> torch.Tensor:
        return load_pt2(f)(check.to(next(model.parameters()).device)).float().cpu()

    diff = write_checked(out, data, run, model, check, tolerance, f"pt2 export {out}")
    side = _write_sidecar(out, recipe, model, fmt="pt2", dynamic_batch=dynamic_batch, diff=diff)
    return ExportResult(out, "pt2", diff, tolerance, out.stat().st_size, time.perf_counter() - t0, side)


def _check_pt2_payloads(path: Path) -> None:
    """Refuse a .pt2 archive that torch.export.load would unpickle.

    ``torch.export.load`` reads tensors safely, but falls back to unrestricted unpickling for payloads
    marked ``use_pickle``, custom/opaque objects, and ``.pt`` members that fail the safe load. We
    check those first, so loading a .pt2 never runs pickled code.
    """
    refused = f"{path}: {{}} holds pickled objects; refused (only tensors and plain values are loaded), re-export it with ufgir"
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path} is not a .pt2 archive (not a zip file); re-export it with ufgir") from None
    with z:
        for name in z.namelist():
            if name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(z.read(name)), map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001 - unpickling errors come in many types
                    raise CheckpointError(refused.format(name)) from None
            elif name.endswith(("_weights_config.json", "_constants_config.json")):
                for fqn, meta in json.loads(z.read(name)).get("config", {}).items():
                    if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise CheckpointError(refused.format(f"tensor {fqn!r}"))


def load_pt2(path: Path) -> nn.Module:
    """The callable module of a .pt2 file, after refusing any pickled payload."""
    if not path.is_file():
        raise CheckpointError(f"pt2 file {path} does not exist")
    _check_pt2_payloads(path)
    return torch.export.load(path).module()


