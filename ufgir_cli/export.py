"""Shipping a model: safetensors / ONNX / pt2 exports with a parity check, reference imports, predict.

Every export is run once more after it is written, from the file on disk (``load_delta``,
onnxruntime, ``torch.export.load``), on a fixed seeded batch, and compared with eager PyTorch: an
artifact that does not reproduce the model is an :class:`ExportError`, never a silent success.

safetensors exports carry their identity in the header metadata (resolved recipe TOML, backbone
name and sha256, method, classes, format version), so a file is self-describing. An adapter-only
export holds just the PETL delta (``UfgirViT.trainable_state_dict``) and re-attaches to the
backbone re-created from ``model.weights``, whose sha256 must match. ONNX and pt2 files get a
``<file>.json`` sidecar with the resolved recipe, because preprocessing and class names need it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import platform
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, DatasetError, ExportError, RecipeError
from .io import atomic_save, atomic_write_json, atomic_write_text, file_sha256
from .model.checkpoint import (
    checkpoint_payload,
    model_from_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from .model.state import load_strict
from .model.vit import UfgirViT, build_model, resize_input
from .paths import run_dir_of
from .recipe import Recipe, dump_resolved, recipe_from_dict, tomllib

FORMATS: tuple[str, ...] = ("safetensors", "onnx", "pt2")
SAFETENSORS_FORMAT = "ufgir-safetensors"
SIDECAR_FORMAT = "ufgir-export"
FORMAT_VERSION = 1
DEFAULT_OPSET = 18
MIN_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
_EXPORT_EXTRA_HINT = "pip install 'ufgir[export]'"


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


# --------------------------------------------------------------------------------------------
# Shared helpers


def sidecar_path(artifact: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the recipe and preprocessing an ONNX/pt2 file needs."""
    return artifact.with_name(artifact.name + ".json")


def parity_batch(batch: int, image_size: int) -> torch.Tensor:
    """The fixed input every parity check uses: seeded, shaped like normalised images."""
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def model_image_size(model: UfgirViT) -> int:
    return int(model.vit.patch_embed.img_size[0])


@torch.no_grad()
def _eager_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model.eval()(x.to(device)).float().cpu()


def _check_parity(exported: torch.Tensor, eager: torch.Tensor, tolerance: float, what: str) -> float:
    if tuple(exported.shape) != tuple(eager.shape):
        raise ExportError(f"{what} returns shape {tuple(exported.shape)}, eager PyTorch {tuple(eager.shape)}")
    diff = float((exported.float() - eager).abs().max()) if eager.numel() else 0.0
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"{what} differs from eager PyTorch by max |diff| {diff:.3g} > tolerance {tolerance:g}; "
            "the export is not faithful (report it with the model's recipe), or raise --tolerance knowingly"
        )
    return diff


@contextlib.contextmanager
def _verified(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` to write and check the export at; it becomes ``out`` only
    when the body (write + parity check) succeeds, so a failed export leaves no file at ``out``
    and an earlier good export there survives."""
    tmp = out.with_name(f".{out.stem}.unverified{out.suffix}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


class _Logits(nn.Module):
    """``forward(image) -> logits`` only: the exported graph gets one named input and one output,
    and the attention-maps path (a Python-list side channel) stays out of it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def at_image_size(model: UfgirViT, recipe: Recipe, image_size: int | None) -> tuple[UfgirViT, Recipe]:
    """The model and recipe at another input resolution (a resized copy; the original is untouched).

    Position embeddings are resampled the way the recipe says (``model.pos_embed_resize``); the
    recipe is re-validated so an ILA layout that cannot down-sample the new grid is a RecipeError.
    """
    if image_size is None or image_size == model_image_size(model):
        return model, recipe
    data = recipe.model_dump(mode="json")
    data["model"]["image_size"] = image_size
    new = recipe_from_dict(data)
    resized = copy.deepcopy(model)
    resize_input(resized.vit, image_size, new.model.pos_embed_resize)
    resized.cfg = new.model
    return resized, new


def _recipe_from_toml(text: str, source: Path) -> Recipe:
    try:
        return recipe_from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise CheckpointError(f"{source}: the stored recipe is not valid TOML ({e}); re-export the model") from None


# --------------------------------------------------------------------------------------------
# safetensors: full model or the PETL delta


def export_safetensors(model: UfgirViT, recipe: Recipe, out: str | os.PathLike, adapter_only: bool = False, *,
                       backbone_sha256: str | None = None, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Write the full state_dict, or with ``adapter_only`` the PETL delta, plus identity metadata.

    ``backbone_sha256`` is the hash of the backbone the run started from (a checkpoint stores it).
    It is not ``model.backbone_sha256()``: training updates backbone tensors such as the CLS token,
    so a trained model no longer hashes like the backbone its delta attaches to. When it is not
    given for an adapter-only export, the backbone is re-created from ``model.weights`` and hashed;
    a full export then records the hash of the model's own backbone tensors.
    """
    from safetensors.torch import save as st_save

    out = Path(out)
    t0 = time.perf_counter()
    m = recipe.model
    if adapter_only:
        if model.plan.train_backbone:
            raise ExportError(f"method {m.method!r} trains the whole backbone, so there is no adapter delta; "
                              "export without --adapter-only")
        if m.weights == "none":
            raise ExportError("--adapter-only needs a backbone re-creatable from model.weights, but this run used "
                              "weights = \"none\" (random init); export the full model instead")
        backbone_sha256 = backbone_sha256 or build_model(m, model.num_classes).backbone_sha256()
    state = model.trainable_state_dict() if adapter_only else model.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "adapter_only": "true" if adapter_only else "false",
        "method": m.method,
        "num_classes": str(model.num_classes),
        "backbone": m.backbone,
        "backbone_weights": m.weights,
        "backbone_sha256": backbone_sha256 or model.backbone_sha256(),
        "recipe": dump_resolved(recipe),
    }
    data = st_save(tensors, metadata=metadata)
    x = parity_batch(2, model_image_size(model))
    with _verified(out) as tmp:
        atomic_save(tmp, lambda f: f.write(data))
        reloaded, _ = load_delta(tmp)
        diff = _check_parity(_eager_logits(reloaded, x), _eager_logits(model, x), tolerance, f"safetensors export {out}")
    return ExportResult(out, "safetensors", diff, tolerance, out.stat().st_size, time.perf_counter() - t0)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a ufgir safetensors export; anything else is a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-export it") from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file without ufgir metadata; load exports written by "
            "`ufgir export --format safetensors`, or use plain backbone weights as model.weights"
        )
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer ufgir (format {meta['format_version']}); upgrade ufgir")
    return meta


def load_delta(path: str | os.PathLike, device: str = "cpu", weights: str | None = None) -> tuple[UfgirViT, Recipe]:
    """(model, recipe) from a safetensors export: an adapter-only delta or a full model.

    A delta is attached to the backbone re-created from the stored recipe's ``model.weights`` (or
    ``weights``, e.g. the same file at another path), after checking its sha256. A full export is
    rebuilt without fetching any backbone weights, since every tensor is in the file. Loading is
    strict: missing or unexpected tensors are errors that list them.
    """
    from safetensors import safe_open

    path = Path(path)
    meta = read_safetensors_metadata(path)
    recipe = _recipe_from_toml(meta["recipe"], path)
    if weights is not None:
        data = recipe.model_dump(mode="json")
        data["model"]["weights"] = str(weights)
        recipe = recipe_from_dict(data)
    m = recipe.model
    if meta.get("method") != m.method or meta.get("backbone") != m.backbone:
        raise CheckpointError(f"{path}: metadata says {meta.get('method')} on {meta.get('backbone')} but its recipe "
                              f"says {m.method} on {m.backbone}; the file was edited, re-export it")
    num_classes = int(meta["num_classes"])
    adapter_only = meta.get("adapter_only") == "true"
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}

    if adapter_only:
        model = build_model(m, num_classes)
        want, have = meta["backbone_sha256"], model.backbone_sha256()
        if want != have:
            raise CheckpointError(
                f"{path} was trained on backbone sha256 {want} but model.weights={m.weights!r} gives sha256 {have}; "
                "attach it to the original backbone weights (load_delta(path, weights=FILE))"
            )
        expected = model.trainable_state_dict().keys()
    else:
        model = build_model(m.model_copy(update={"weights": "none"}), num_classes)
        expected = None
    load_strict(model, state, str(path), expected=expected, hint="re-export it from its run")
    return model.to(device).eval(), recipe


# --------------------------------------------------------------------------------------------
# ONNX and pt2


def _require(modules: Iterable[str], what: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ExportError(f"{what} needs the optional package {name}: {_EXPORT_EXTRA_HINT}") from None


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


def export_onnx(model: UfgirViT, recipe: Recipe, out: str | os.PathLike, *, image_size: int | None = None,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """ONNX via the torch.export-based exporter (``dynamo=True``), checked with onnxruntime."""
    _require(("onnx", "onnxscript", "onnxruntime"), "ONNX export")
    import onnxruntime as ort

    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is too old: the exporter needs opset >= {MIN_OPSET}")
    out = Path(out)
    t0 = time.perf_counter()
    model, recipe = at_image_size(model, recipe, image_size)
    S = model_image_size(model)
    x, shapes, check = _export_inputs(model, S, dynamic_batch)
    try:
        program = torch.onnx.export(_Logits(model).eval(), (x,), dynamo=True, opset_version=opset,
                                    output_names=["logits"], dynamic_shapes=shapes, verbose=False)
        proto = program.model_proto
        data = proto.SerializeToString()
    except ValueError as e:
        if "2GB" in str(e) or "2 GB" in str(e):
            raise ExportError("the model exceeds ONNX's 2 GB protobuf limit; export --format pt2 or safetensors") from None
        raise
    written_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    with _verified(out) as tmp:
        atomic_save(tmp, lambda f: f.write(data))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["logits"], {"image": check.numpy()})[0])
        diff = _check_parity(got, _eager_logits(model, check), tolerance, f"ONNX export {out} (onnxruntime)")
    side = _write_sidecar(out, recipe, model, fmt="onnx", dynamic_batch=dynamic_batch, diff=diff, opset=written_opset)
    return ExportResult(out, "onnx", diff, tolerance, out.stat().st_size, time.perf_counter() - t0, side,
                        opset=written_opset)


def export_pt2(model: UfgirViT, recipe: Recipe, out: str | os.PathLike, *, image_size: int | None = None,
               dynamic_batch: bool = True, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """A ``torch.export`` ExportedProgram (TorchScript's successor), reloaded and checked."""
    out = Path(out)
    t0 = time.perf_counter()
    model, recipe = at_image_size(model, recipe, image_size)
    S = model_image_size(model)
    x, shapes, check = _export_inputs(model, S, dynamic_batch)
    with torch.no_grad():
        program = torch.export.export(_Logits(model).eval(), (x,), dynamic_shapes=shapes)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    data = buf.getbuffer()
    with _verified(out) as tmp:
        atomic_save(tmp, lambda f: f.write(data))
        with torch.no_grad():
            got = load_pt2(tmp)(check.to(next(model.parameters()).device)).float().cpu()
        diff = _check_parity(got, _eager_logits(model, check), tolerance, f"pt2 export {out}")
    side = _write_sidecar(out, recipe, model, fmt="pt2", dynamic_batch=dynamic_batch, diff=diff)
    return ExportResult(out, "pt2", diff, tolerance, out.stat().st_size, time.perf_counter() - t0, side)


def _check_pt2_payloads(path: Path) -> None:
    """Refuse a .pt2 archive that torch.export.load would unpickle.

    ``torch.export.load`` reads tensors safely, but falls back to unrestricted unpickling for payloads
    marked ``use_pickle``, custom/opaque objects, and ``.pt`` members that fail the safe load. We check those first, so loading a .pt2 never runs pickled code.
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


# --------------------------------------------------------------------------------------------
# MODEL_CARD.md


def _eval_rows(run_dir: Path | None) -> list[dict]:
    if run_dir is None or not (run_dir / "eval").is_dir():
        return []
    rows = []
    for f in sorted((run_dir / "eval").glob("*/metrics.json")):
        try:
            rows.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue  # a half-written or foreign file does not block an export
    return rows


def _export_rows(result: ExportResult) -> list[str]:
    """One table row per export in the card's folder, so exporting several formats into one folder
    keeps them all on the card; earlier ONNX/pt2 parity comes from their sidecars."""
    rows = []
    for f in sorted(result.path.parent.iterdir()):
        if f.suffix not in (".safetensors", ".onnx", ".pt2") or not f.is_file():
            continue
        opset, parity = None, "—"
        if f == result.path:
            opset, parity = result.opset, f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:g})"
        elif sidecar_path(f).is_file():
            try:
                side = json.loads(sidecar_path(f).read_text(encoding="utf-8"))
                opset, parity = side.get("opset"), f"{side['max_abs_diff']:.3g}"
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                pass  # a foreign or damaged sidecar only costs this row its parity figure
        fmt = f.suffix[1:] + (f" (opset {opset})" if opset else "")
        rows.append(f"| `{f.name}` | {fmt} | {human_bytes(f.stat().st_size)} | {parity} |")
    return rows


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def model_card(model: UfgirViT, recipe: Recipe, result: ExportResult, run_dir: Path | None,
               backbone_sha256: str) -> str:
    """MODEL_CARD.md text: what the model is, what it costs, how well it did, how to run it."""
    from .analysis.cost import count_flops, count_params

    m, d = recipe.model, recipe.data
    data_cfg = model.data_config()
    mean, std = data_cfg["mean"], data_cfg["std"]
    S = model_image_size(model)
    pc = count_params(model)
    macs = count_flops(model, S) // 2
    share = 100 * pc.trainable / pc.total if pc.total else 0.0
    resize = int(d.resize_ratio * S)
    lines = [
        f"# {m.method} · {m.backbone} · {d.dataset}",
        "",
        recipe.description or "A Vision Transformer with a parameter-efficient adapter method, trained with ufgir.",
        "",
        "| | |",
        "|---|---|",
        f"| Method | `{m.method}` |",
        f"| Backbone | `{m.backbone}` (weights `{m.weights}`, sha256 `{backbone_sha256}`) |",
        f"| Dataset | `{d.dataset}` ({model.num_classes} classes) |",
        f"| Image size | {S} px: square resize to {resize} px ({d.interpolation}), centre crop {S}, "
        f"normalise mean {list(mean)} std {list(std)} |",
        f"| Parameters | {pc.trainable:,} trainable of {pc.total:,} total ({share:.2f} %) |",
        f"| MACs | {macs / 1e9:.3f} G per image (FLOPs = 2 × MACs) |",
        "",
        "## Evaluation",
        "",
    ]
    rows = _eval_rows(run_dir)
    if rows:
        lines += ["| split | checkpoint | top-1 % | top-5 % | per-class mean % | images |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.get('split')} | {r.get('checkpoint')} | {r.get('top1', float('nan')):.2f} | "
                         f"{r.get('top5', float('nan')):.2f} | {r.get('per_class_mean', float('nan')):.2f} | "
                         f"{r.get('num_images')} |")
    else:
        lines.append("No evaluation results yet: run `ufgir eval RUN` and export again.")
    lines += [
        "",
        "## Exports",
        "",
        "| file | format | size | max abs diff vs eager PyTorch |",
        "|---|---|---|---|",
        *_export_rows(result),
        "",
        f"Predict: `ufgir predict {result.path.name} IMAGE_OR_FOLDER... --topk 5`",
        "",
        "## Recipe",
        "",
        "```toml",
        dump_resolved(recipe).rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The `ufgir export` entry point


def default_export_path(source: Path, fmt: str, adapter_only: bool) -> Path:
    name = "adapter.safetensors" if adapter_only else f"model.{fmt}"
    return run_dir_of(source) / "export" / name


def load_source(source: Path, checkpoint: str = "auto") -> tuple[UfgirViT, Recipe, str]:
    """(model, recipe, backbone sha256 the run started from) from a run, checkpoint or safetensors."""
    if source.suffix == ".safetensors":
        meta = read_safetensors_metadata(source)
        model, recipe = load_delta(source)
        return model, recipe, meta["backbone_sha256"]
    f = resolve_checkpoint(source, checkpoint)
    ckpt = read_checkpoint(f)
    model, recipe = model_from_checkpoint(ckpt, source=str(f))
    return model, recipe, ckpt["backbone"]["sha256"]


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
    model, recipe, sha = load_source(source, checkpoint)
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
    atomic_write_text(card, model_card(model, recipe, result, run_dir_of(source), sha))
    return dataclasses.replace(result, card=card)


# --------------------------------------------------------------------------------------------
# `ufgir import-upstream`


def import_upstream(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                    dataset: str | None = None) -> tuple[UfgirViT, Recipe]:
    """Turn a reference-implementation checkpoint into a run folder every ufgir command accepts.

    ``dataset`` replaces the dataset name taken from the reference config: the checkpoint stores
    its recipe, so this is the moment to name the dataset folder that ``ufgir eval`` should use.
    The folder is assembled beside ``out`` and renamed into place, so a failed import leaves no
    half-written run; ``overwrite`` replaces a whole existing run (a stale ``best.pt`` or eval
    result of another model must not survive next to the imported weights).
    """
    import timm

    from . import __version__
    from .model.convert import load_upstream_checkpoint

    src, out = Path(src), Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a folder for the new run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"run folder {out} exists and is not empty; pass --overwrite to replace it, or another --out")
    model, recipe = load_upstream_checkpoint(src)
    if dataset is not None:
        data = recipe.model_dump(mode="json")
        data["data"]["dataset"] = dataset
        recipe = recipe_from_dict(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        atomic_write_text(tmp / "recipe.toml", dump_resolved(recipe))
        save_checkpoint(tmp / "checkpoints" / "last.pt", checkpoint_payload(model, recipe))
        atomic_write_json(tmp / "provenance.json", {
            "imported_from": {"path": str(src.resolve()), "sha256": file_sha256(src),
                              "format": "reference implementation (fgir_vit) checkpoint"},
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ufgir": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__,
            "backbone": {"name": recipe.model.backbone, "weights": recipe.model.weights,
                         "sha256": model.backbone_sha256()},
        })
        if out.exists():
            old = out.parent / f".{out.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, recipe


# --------------------------------------------------------------------------------------------
# `ufgir predict`


@dataclass
class Predictor:
    """Anything ufgir predicts with: normalised float (B, 3, S, S) -> (B, C) logits, plus what
    preprocessing and class names need. ``batch_size`` is set for static-batch exports, which
    take exactly that many images per call (batches are then cut to that size)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    recipe: Recipe
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int | None = None


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[int, str, float]]  # (class id, name, probability), best first


def _read_sidecar(artifact: Path) -> dict[str, Any]:
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


def load_predictor(source: str | os.PathLike) -> Predictor:
    """A CPU predictor for a run folder, checkpoint, safetensors, ONNX or pt2 export."""
    from .model.checkpoint import load_run

    source = Path(source)
    if source.suffix in (".onnx", ".pt2"):
        if not source.is_file():
            raise CheckpointError(f"export {source} does not exist")
        meta = _read_sidecar(source)
        recipe = recipe_from_dict(meta["recipe"])
        if source.suffix == ".onnx":
            _require(("onnxruntime",), "predicting with an ONNX export")
            import onnxruntime as ort

            session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])

            def forward(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run([meta["output"]], {meta["input"]: x.numpy()})[0])
        else:
            forward = load_pt2(source)
        return Predictor(forward, recipe, int(meta["num_classes"]), tuple(meta["mean"]), tuple(meta["std"]),
                         meta.get("batch_size"))
    model, recipe = load_run(source)
    data_cfg = model.data_config()
    mean, std = data_cfg["mean"], data_cfg["std"]
    return Predictor(model, recipe, model.num_classes, mean, std)


def class_names(recipe: Recipe, num_classes: int) -> tuple[list[str], Path | None]:
    """Names from the dataset's classes.csv when that folder is here (nothing is downloaded or
    generated); class ids otherwise. Returns the names and the file they came from."""
    from .data.folder import read_classes
    from .paths import dataset_dir

    root = dataset_dir(recipe.data.dataset, recipe.data.root)
    if (root / "classes.csv").is_file():
        names = read_classes(root)
        if len(names) == num_classes:
            return names, root / "classes.csv"
    return [str(i) for i in range(num_classes)], None


def collect_images(inputs: Iterable[str | os.PathLike], on_skip: Callable[[Path, str], None]) -> list[Path]:
    """Files as given, folders searched recursively for image extensions (natural order)."""
    from .data.folder import natural_key

    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted((p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                            and not p.name.startswith(".")), key=lambda p: natural_key(str(p.relative_to(item))))
            if not found:
                on_skip(item, f"no {'/'.join(sorted(e[1:] for e in IMAGE_EXTS))} files in this folder")
            out += found
        elif item.is_file():
            out.append(item)
        else:
            on_skip(item, "no such file or folder")
    return out


@torch.inference_mode()
def predict_images(predictor: Predictor, images: list[Path], *, topk: int = 5, batch_size: int | None = None,
                   on_skip: Callable[[Path, str], None]) -> list[Prediction]:
    """Top-k classes per image with the run's eval preprocessing (square resize to
    int(ratio * S), centre crop S, normalise); unreadable files go to ``on_skip``, not fatal.
    ``batch_size`` defaults to the recipe's evaluation batch size."""
    from .data.datasets import load_image, normalize, preprocess_for

    r = predictor.recipe
    tf = preprocess_for(r, train=False)
    names, _ = class_names(r, predictor.num_classes)
    k = max(1, min(topk, predictor.num_classes))
    step = predictor.batch_size or batch_size or r.eval.batch_size or r.train.batch_size
    out: list[Prediction] = []
    for start in range(0, len(images), step):
        kept, batch = [], []
        for p in images[start : start + step]:
            try:
                batch.append(tf(load_image(str(p)), None))
                kept.append(p)
            except DatasetError:
                on_skip(p, "not a readable image")
        if not batch:
            continue
        x = normalize(torch.stack(batch), predictor.mean, predictor.std)        # (B, 3, S, S) float
        probs = predictor.forward(x).float().softmax(-1)                      # (B, C)
        p, idx = probs.topk(k, dim=-1)
        for path, pp, ii in zip(kept, p.tolist(), idx.tolist(), strict=True):
            out.append(Prediction(path, [(c, names[c], q) for c, q in zip(ii, pp, strict=True)]))
    return out


__all__ = [
    "ExportResult", "Prediction", "Predictor", "class_names", "collect_images", "export_model", "export_onnx",
    "export_pt2", "export_safetensors", "import_upstream", "load_delta", "load_predictor", "load_pt2",
    "predict_images",
]
